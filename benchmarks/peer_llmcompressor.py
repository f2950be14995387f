"""Side by side with llm-compressor: the same windows, the same methods, one table.

    make peers     # once: llm-compressor 0.14 in its own venv (.peers/llmcompressor)
    python -m benchmarks.peer_llmcompressor --windows 16 --seqlen 256 --eval-windows 16

slimkit draws the calibration and evaluation windows once and hands them to llm-compressor's
worker (run with the peer venv's Python), so both tools calibrate on identical tokens and are
scored by the same NLL on identical windows. Methods: GPTQ int4 / int3 g64 symmetric
(llm-compressor's g128 preset refuses SmolLM2's 576-wide inputs), SparseGPT 50% unstructured,
rotation + GPTQ int4 (llm-compressor's SpinQuantModifier, R1 + R2 random Hadamard) and AutoRound int4 /
int3 g64 (its AutoRoundModifier, Intel's auto-round; torch.compile off on both sides). `--iters`
sets AutoRound's steps per block on both sides (default: the built-ins' 200). Wall time is the
compression call alone (model loading excluded) for both tools.

A method may also be a pair `OURS=PEER`: slimkit runs OURS (a built-in or a recipe file) and
llm-compressor its method PEER, for slimkit's best against the peer's best at one bit width, e.g.
`--methods rot-gptq-scales-int4-g64=autoround-int4-g64`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimkit.data import calibration_windows, load_split
from slimkit.evaluation import eval_windows, window_nll
from slimkit.models import load_model
from slimkit.models.snapshot import ModelSnapshot
from slimkit.protocol import parse_windows
from slimkit.recipes import Recipe, RunResources, compress, get_recipe

WORKER = Path(__file__).parent / "peers" / "llmcompressor_worker.py"
METHODS = ("gptq-int4-g64", "sparsegpt-50")
ALL_METHODS = ("gptq-int4-g64", "gptq-int3-g64", "sparsegpt-50", "rot-gptq-int4-g64", "autoround-int4-g64",
               "autoround-int3-g64")


def slimkit_recipe(method: str, iters: int | None) -> Recipe:
    """The built-in of that name, without its quantize_outer step (llm-compressor leaves the head and
    the embedding alone: the same tensors are quantized on both sides); with `iters`, its AutoRound
    steps set to that count."""
    recipe = get_recipe(method)
    recipe = recipe.model_copy(update={"steps": tuple(s for s in recipe.steps if s.method != "quantize_outer")})
    if iters is None or not any(s.method == "autoround" for s in recipe.steps):
        return recipe
    steps = [s.model_copy(update={"iters": iters}) if s.method == "autoround" else s for s in recipe.steps]
    return recipe.model_copy(update={"steps": tuple(steps), "name": f"{recipe.name}-{iters}"})


def pair(method: str) -> tuple[str, str]:
    """(slimkit's recipe, llm-compressor's method) of a `--methods` entry: `NAME` or `OURS=PEER`."""
    ours, _, peer = method.partition("=")
    peer = peer or ours
    if peer not in ALL_METHODS:
        raise SystemExit(f"llm-compressor's side has no method '{peer}': one of {', '.join(ALL_METHODS)}")
    return ours, peer


def ppl_on(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in windows.split(1):
        a, b = window_nll(model, w)
        nll, count = nll + a, count + b
    return math.exp(nll / count)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=parse_windows, default=16,
                   help="first N windows of the fixed protocol (seqlen 512), or all")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, of {', '.join(ALL_METHODS)}; or OURS=PEER pairs (OURS any slimkit recipe)")
    p.add_argument("--iters", type=int, default=None, help="AutoRound steps per block, both tools (default 200)")
    p.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    p.add_argument("--peer-python", default=".peers/llmcompressor/bin/python")
    p.add_argument("--peer-only", action="store_true",
                   help="run llm-compressor's side alone (slimkit's row measured elsewhere on the same windows, "
                        "e.g. `slimkit compress ... --full` against --windows 128 --seqlen 512 --eval-windows all)")
    args = p.parse_args(argv)
    if not Path(args.peer_python).exists():
        raise SystemExit(f"{args.peer_python} not found: run `make peers` first")

    lm = load_model(args.model)
    split = load_split()
    cal = calibration_windows(lm.tokenizer, split, args.windows, args.seqlen, seed=args.seed)
    ev = eval_windows(lm.tokenizer, split, 512)[: args.eval_windows]
    original = ModelSnapshot.of(lm.model)  # a rotation unties the head: each method starts from the loaded model
    dense = ppl_on(lm.model, ev)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tensors = Path(tmp) / "windows.safetensors"
        save_file({"calibration": cal.contiguous(), "evaluation": ev.contiguous()}, str(tensors))
        for method, peer_method in map(pair, args.methods.split(",")):
            ours = None if args.peer_only else run_ours(lm, original, slimkit_recipe(method, args.iters), cal, ev)
            peer = run_peer(args, lm.hf_dir, tensors, peer_method, Path(tmp) / f"{peer_method}.json")
            if peer is None:  # reported, and the other methods still run
                continue
            row = {"method": method, "peer_method": peer_method, "calibration": f"{args.windows}x{args.seqlen}",
                   "eval_tokens": ev[:, 1:].numel(), "dense_ppl": dense,
                   "slimkit_seconds": ours and ours["seconds"], "slimkit_ppl": ours and ours["ppl"],
                   "peer": f"llm-compressor {peer['version']}", "peer_seconds": peer["seconds"],
                   "peer_ppl": peer["ppl"], "speedup": ours and peer["seconds"] / ours["seconds"],
                   "threads": torch.get_num_threads()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print_table(rows)


def run_ours(lm, original: ModelSnapshot, recipe: Recipe, cal: torch.Tensor, ev: torch.Tensor) -> dict:
    """slimkit's side from the loaded model: compression seconds and ppl on `ev`."""
    original.restore(lm.model)
    start = time.perf_counter()
    compress(lm.model, recipe, lm.adapter, RunResources(calibration=lambda: cal))
    return {"seconds": time.perf_counter() - start, "ppl": ppl_on(lm.model, ev)}


def run_peer(args, hf_dir: Path, tensors: Path, method: str, out: Path) -> dict | None:
    """llm-compressor's side, in its own venv: its JSON, or None (reported) when it failed."""
    iters = [] if args.iters is None else [str(args.iters)]
    proc = subprocess.run([args.peer_python, str(WORKER), str(hf_dir), str(tensors), method, str(out), *iters],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-4000:], file=sys.stderr)
        print(f"llm-compressor failed on {method} (exit {proc.returncode})", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def _num(value, fmt: str, unit: str = "") -> str:
    return "-" if value is None else format(value, fmt) + unit


def print_table(rows: list[dict]) -> None:
    print("| slimkit | llm-compressor | calibration | slimkit s | llm-compressor s | speedup | slimkit ppl | "
          "llm-compressor ppl | dense ppl |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['peer_method']} | {r['calibration']} | {_num(r['slimkit_seconds'], '.1f')} | "
              f"{r['peer_seconds']:.1f} | {_num(r['speedup'], '.2f', 'x')} | {_num(r['slimkit_ppl'], '.3f')} | "
              f"{r['peer_ppl']:.3f} | {r['dense_ppl']:.3f} |")

if __name__ == "__main__":
    main()
