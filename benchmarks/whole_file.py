"""The whole file, against llama.cpp's: every int4/int3 built-in recipe's packed model and GGUF beside
llama-quantize's Q4_0 and Q3_K_S of the same weights: bytes, bits per weight of everything shipped
(embedding, head, norms, metadata) over the model's parameters, and, judged by llama-perplexity on
the evaluation text, ppl and KLD from the F32 base.

    make peers     # once: llama.cpp's tools in .peers/llama.cpp/bin
    python -m benchmarks.whole_file -o out/whole-file                    # SmolLM2-135M (tied, 49k vocab)
    python -m benchmarks.whole_file -o out/whole-file-200k --model random-200k

`random-200k`: a random 4-block LLaMA, hidden 256, vocabulary 201,088 (SmolLM2's tokenizer, padded
with unused pieces as big vocabularies are), head tied to the embedding: 94% of its weights are the
embedding, as in the small models of 200k+ vocabularies (its ppl means nothing; its KLD does).
AutoRound, scale tuning and reconstruction run with `--learned-steps` steps per block (their sizes do
not depend on the budget; their quality rows say the budget was cut).
Writes whole_file.json (a row per file) and whole_file.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.budgets import cut_recipe
from slimkit.benchmarks.llamacpp import llamacpp_quantize
from slimkit.benchmarks.llamacpp_model import evaluation_text, gguf_of, gguf_quality

INT4_INT3 = ["rtn-int4-g64", "gptq-int4-g64", "awq-int4-g64", "autoround-int4-g64", "autoround-scales-int4-g64",
             "magnitude-2of4-int4", "rot-gptq-int4-g64", "rot-gptq-scales-int4-g64",
             "rtn-int3-g64", "gptq-int3-g64", "autoround-int3-g64", "autoround-scales-int3-g64"]
REFERENCE = {4: "Q4_0", 3: "Q3_K_S"}  # llama-quantize's file of the same width


def random_200k(work: Path) -> str:
    """A random tied LLaMA with a 201,088-row embedding and SmolLM2's tokenizer, saved in `work`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimkit.models import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=201_088, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    path = work / "random-200k"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def parameters_of(model: str) -> int:
    from slimkit.models import load_model

    return sum(p.numel() for p in load_model(model).model.parameters())  # a tied matrix once


def row(label: str, made_by: str, path: Path, parameters: int, width: int, cut: bool = False) -> dict:
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*") if path.is_dir() else []))
    return {"label": label, "made_by": made_by, "path": str(path), "bytes": size, "parameters": parameters,
            "bits_per_weight": size * 8 / parameters, "width": width, "budget_cut": cut}


def slimkit_rows(model: str, recipes: list[str], work: Path, parameters: int, learned_steps: int) -> list[dict]:
    """Compress with every recipe, pack each output and export it to GGUF (`auto`: the codes kept)."""
    from slimkit.compression.memory import compress_to_dir
    from slimkit.compression.pack_dir import pack_to_dir
    from slimkit.protocol import EvalSettings

    chosen = [cut_recipe(name, 2, learned_steps) for name in recipes]
    settings = EvalSettings(max_windows=2, calibration_windows=16, calibration_seqlen=256)
    compress_to_dir(model, [r for r, _ in chosen], work / "compressed", settings, log=print)
    rows = []
    for recipe, cut in chosen:
        width = 3 if "int3" in recipe.name else 4
        packed = work / "packed" / recipe.name
        pack_to_dir(str(work / "compressed" / recipe.name), packed)
        rows.append(row(recipe.name, "slimkit pack", packed, parameters, width, cut))
        rows.append(row(recipe.name, "slimkit export --to gguf", gguf_of(str(packed), work, False), parameters,
                        width, cut))
    return rows


def judge(rows: list[dict], base: Path, text: Path, work: Path, chunks: int, threads: int) -> None:
    """ppl and KLD of every GGUF row by llama-perplexity, against the F32 base's distributions."""
    logits = work / "base.kld"
    gguf_quality(base, logits, text, chunks, threads, baseline=True)
    for r in rows:
        if r["path"].endswith(".gguf"):
            r.update(gguf_quality(Path(r["path"]), logits, text, chunks, threads, baseline=False))
    references = {r["width"]: r for r in rows if r["made_by"].startswith("llama.cpp")}
    for r in rows:
        r["bpw_vs_llamacpp"] = r["bits_per_weight"] / references[r["width"]]["bits_per_weight"]


def table(rows: list[dict]) -> str:
    lines = ["| file | made by | MB | bpw (whole file) | vs llama.cpp | ppl | mean KLD | p99 KLD |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        quality = [f"{r[k]:.4g}" if k in r else "" for k in ("ppl", "mean_kld", "p99_kld")]
        label = r["label"] + (" (budget cut)" if r["budget_cut"] and "ppl" in r else "")
        lines.append(f"| {label} | {r['made_by']} | {r['bytes'] / 1e6:.1f} | {r['bits_per_weight']:.3f} | "
                     f"{r['bpw_vs_llamacpp']:.3f} | {' | '.join(quality)} |")
    return "\n".join(lines)


def run(model: str, output: Path, recipes: list[str], chunks: int, threads: int, learned_steps: int) -> list[dict]:
    from slimkit.io.outputs import output_directory

    with output_directory(output, False, inputs=[], command="whole_file") as tmp:
        source = random_200k(tmp) if model == "random-200k" else model
        parameters = parameters_of(source)
        base = gguf_of(source, tmp, baseline=True)
        rows = [row(f"llama-quantize {t}", "llama.cpp", llamacpp_quantize(base, tmp / f"llamacpp-{t}.gguf", t),
                    parameters, width) for width, t in REFERENCE.items()]
        rows += slimkit_rows(source, recipes, tmp, parameters, learned_steps)
        judge(rows, base, evaluation_text(tmp / "evaluation.txt"), tmp, chunks, threads)
        (tmp / "whole_file.json").write_text(json.dumps(rows, indent=2))
        text = table(rows)
        (tmp / "whole_file.md").write_text(
            f"# The whole file on {model} ({parameters / 1e6:.1f} M parameters)\n\n{text}\n\n- bpw: file bytes x 8 / "
            f"parameters (a tied matrix counted once), everything shipped; vs llama.cpp: over llama-quantize's file "
            f"of the same width (Q4_0 for int4, Q3_K_S for int3)\n- ppl, KLD: llama-perplexity, {chunks} chunks of "
            f"512 tokens of the evaluation text, KLD from the F32 base\n")
        for bulky in [*tmp.glob("export-*"), tmp / "compressed", tmp / "packed"]:  # GBs; the rows keep their sizes
            shutil.rmtree(bulky, ignore_errors=True)
    print(text)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a zoo name, an HF dir, or random-200k")
    p.add_argument("-o", "--output", type=Path, required=True, help="output dir (written atomically)")
    p.add_argument("--recipes", default=",".join(INT4_INT3))
    p.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks of 512 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--learned-steps", type=int, default=4, help="AutoRound / scale-tuning steps per block")
    args = p.parse_args(argv)
    run(args.model, args.output, args.recipes.split(","), args.chunks, args.threads, args.learned_steps)


if __name__ == "__main__":
    main()
