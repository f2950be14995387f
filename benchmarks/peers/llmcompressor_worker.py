"""Runs inside llm-compressor's own venv (`make peers`); imports nothing from slimkit.

    python llmcompressor_worker.py MODEL_DIR WINDOWS.safetensors METHOD OUT.json [AUTOROUND_ITERS]

WINDOWS holds `calibration` [n, L] and `evaluation` [m, L] token windows made by slimkit, so
both tools see identical data and are scored by the identical NLL computation below.
"""

import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def _weights(bits: int) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}}


def recipe_for(method: str, iters: int = 200):
    if method in ("gptq-int4-g64", "gptq-int3-g64", "rot-gptq-int4-g64"):
        from llmcompressor.modifiers.quantization import GPTQModifier

        gptq = GPTQModifier(config_groups=_weights(3 if "int3" in method else 4), ignore=["lm_head"],
                            dampening_frac=0.01, block_size=128)
        if not method.startswith("rot-"):
            return gptq
        from llmcompressor.modifiers.transform import SpinQuantModifier

        # random-hadamard: built from known matrices (576 = 144 x 4); "hadamard" needs a power of 2
        return [SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"), gptq]
    if method in ("autoround-int4-g64", "autoround-int3-g64"):
        import functools

        import llmcompressor.modifiers.autoround.base as autoround_base
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        # on a CPU auto-round tunes in bf16 ("amp") and leaves the block in bf16, which the next
        # block's fp32 forward refuses (float != BFloat16); fp32 tuning, as slimkit's
        autoround_base.AutoRound = functools.partial(autoround_base.AutoRound, amp=False)
        return AutoRoundModifier(config_groups=_weights(3 if "int3" in method else 4), ignore=["lm_head"],
                                 iters=iters, batch_size=8, enable_torch_compile=False)
    if method == "sparsegpt-50":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=0.5, mask_structure="0:0", dampening_frac=0.01, block_size=128,
                                 targets=[r"re:.*layers\.\d+$"], ignore=["lm_head"])
    raise SystemExit(f"unknown method {method}")


@torch.no_grad()
def perplexity(model, windows):
    nll, count = 0.0, 0
    for w in windows.split(1):
        logits = model(input_ids=w).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(nll / count), count


def main():
    model_dir, windows_file, method, out = sys.argv[1:5]
    iters = int(sys.argv[5]) if len(sys.argv) > 5 else 200
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    tensors = load_file(windows_file)
    cal = tensors["calibration"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    dataset = Dataset.from_dict({"input_ids": cal.tolist(), "attention_mask": torch.ones_like(cal).tolist()})
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe_for(method, iters), num_calibration_samples=cal.shape[0],
            max_seq_length=cal.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    ppl, tokens = perplexity(model.eval(), tensors["evaluation"])
    import llmcompressor

    json.dump({"tool": "llm-compressor", "version": llmcompressor.__version__, "method": method,
               "seconds": seconds, "ppl": ppl, "eval_tokens": tokens, "threads": torch.get_num_threads()},
              open(out, "w"))


if __name__ == "__main__":
    main()
