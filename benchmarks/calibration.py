"""Benchmark: how long each calibrated method takes, against the FLOP bound of its work.

    python -m benchmarks.calibration --windows 128 --seqlen 512 \
        --recipes sparsegpt-50,wanda-50,gptq-int4-g64,awq-int4-g64 --eval-windows all

The FLOP bound counts the work the engine cannot avoid, at the dense fp32 matmul rate measured
in the same run: Hessian accumulation (2*tokens*d_in^2 per distinct input), two passes of every
block (the dense pass for statistics, the compressed pass for the next block's inputs: linears
plus causal attention), and the solver (GPTQ/SparseGPT: 2*out*in^2 for the updates plus
in^3 for the factorisations; AWQ: 2*out*in^2 per grid point). Prints one JSON row per method
and a table; ppl on the fixed protocol unless --eval-windows is 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from slimkit.data import calibration_windows, load_split
from slimkit.evaluation import PerplexityProtocol, perplexity
from slimkit.models import load_model
from slimkit.models.snapshot import ModelSnapshot
from slimkit.protocol import parse_windows
from slimkit.recipes import RunResources, compress, get_recipe


def measured_peak_flops(repeats: int = 5) -> float:
    """Best dense fp32 matmul rate over a few shapes, the engine's own among them
    (576 x 4096 @ 4096 x 576 is a Hessian update; 4096 x 576 @ 576 x 1536 a block linear)."""
    best = 0.0
    for m, k, n in ((1536, 1536, 1536), (576, 4096, 576), (4096, 576, 1536), (4096, 1536, 576)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        best = max(best, 2 * m * k * n / statistics.median(times))
    return best


def flop_budget(model, adapter, tokens: int, seqlen: int, method: str, grid: int = 20) -> dict[str, float]:
    blocks = adapter.get_blocks(model)
    heads = adapter.heads(model)
    hess = fwd = solver = 0.0
    for block in blocks:
        linears = adapter.block_linears(block)
        for group in adapter.groups:
            d_in = linears[group.projections[0]].in_features
            hess += 2 * tokens * d_in**2
        params = sum(m.in_features * m.out_features for m in linears.values())
        attn = 2 * tokens * seqlen * heads.num_heads * heads.head_dim  # QK^T and AV, causal half
        fwd += 2 * (2 * tokens * params + attn)
        for m in linears.values():
            o, i = m.out_features, m.in_features
            if method in ("sparsegpt", "gptq"):
                solver += 2 * o * i**2 + i**3
            elif method == "awq":
                solver += grid * 2 * o * i**2
    if method == "wanda":
        hess = 0.0  # column norms only
    return {"hessian": hess, "forward": fwd, "solver": solver}


def finalize(rows: list[dict], peaks: list[float]) -> None:
    """Bounds use the best matmul rate seen in this run (a busy machine only lowers a reading)."""
    peak = max(peaks)
    for row in rows:
        row["peak_gflops"] = peak / 1e9
        row["peak_gflops_readings"] = [p / 1e9 for p in peaks]
        if row["gflop"]:
            row["bound_seconds"] = row["gflop"] * 1e9 / peak
            row["ratio_to_bound"] = row["seconds"] / row["bound_seconds"]


def run(args) -> list[dict]:
    torch.manual_seed(0)
    lm = load_model(args.model)
    split = load_split(args.data)
    windows = calibration_windows(lm.tokenizer, split, args.windows, args.seqlen, args.seed)
    original = ModelSnapshot.of(lm.model)  # weights and head tying (a rotation unties)
    peak = measured_peak_flops()
    rows = []
    protocol = PerplexityProtocol(512, args.eval_windows)
    dense_ppl = perplexity(lm.model, lm.tokenizer, split, protocol).ppl if args.eval_windows != 0 else None
    for name in args.recipes.split(","):
        recipe = get_recipe(name)
        original.restore(lm.model)
        start = time.perf_counter()
        result = compress(lm.model, recipe, lm.adapter, RunResources(calibration=lambda: windows))
        seconds = time.perf_counter() - start
        method = recipe.steps[-1].method
        calibrated = bool(result.engine_reports)
        budget = flop_budget(lm.model, lm.adapter, windows.numel(), args.seqlen, method) if calibrated else {}
        total_flops = sum(budget.values())
        bound = total_flops / peak if calibrated else None
        engine = [{"stats_s": e.stats_seconds, "algorithm_s": e.algorithm_seconds, "forward_s": e.forward_seconds}
                  for e in result.engine_reports]
        row = {
            "recipe": name,
            "method": recipe.summary(),
            "calibration": f"{args.windows}x{args.seqlen}",
            "tokens": windows.numel(),
            "seconds": seconds,
            "seconds_per_block": seconds / len(lm.adapter.get_blocks(lm.model)),
            "gflop": total_flops / 1e9,
            "gflop_by_part": {k: v / 1e9 for k, v in budget.items()},
            "peak_gflops": peak / 1e9,
            "bound_seconds": bound,
            "ratio_to_bound": seconds / bound if bound else None,
            "threads": torch.get_num_threads(),
        }
        if engine:
            row["engine"] = engine
        per_layer = {n: float((lm.model.get_submodule(n).weight == 0).float().mean()) for n in result.records}
        numel = {n: lm.model.get_submodule(n).weight.numel() for n in result.records}
        row["sparsity_overall"] = sum(per_layer[n] * numel[n] for n in per_layer) / sum(numel.values())
        row["sparsity_min_max_layer"] = [min(per_layer.values()), max(per_layer.values())]
        row["sparsity_per_layer"] = {n: round(v, 4) for n, v in per_layer.items()}
        if args.eval_windows != 0:
            r = perplexity(lm.model, lm.tokenizer, split, protocol)
            row.update(ppl=r.ppl, dense_ppl=dense_ppl, eval_tokens=r.tokens, split_hash=r.split_hash)
        rows.append(row)
        print(f"done {name}: {seconds:.1f}s" + (f", ppl {row['ppl']:.2f}" if "ppl" in row else ""),
              file=sys.stderr, flush=True)
    peaks = [peak, measured_peak_flops()]
    finalize(rows, peaks)
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = "| recipe | calibration | sparsity (min-max layer) | seconds | s/block | GFLOP | bound s | ratio | ppl |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['ppl']:.2f} (dense {r['dense_ppl']:.2f})" if "ppl" in r else "-"
        bound = f"{r['bound_seconds']:.1f} | {r['ratio_to_bound']:.2f}x" if r["bound_seconds"] else "- | -"
        lo, hi = r["sparsity_min_max_layer"]
        sparsity = f"{r['sparsity_overall']:.1%} ({lo:.1%}-{hi:.1%})"
        lines.append(f"| {r['recipe']} | {r['calibration']} | {sparsity} | {r['seconds']:.1f} | {r['seconds_per_block']:.2f} | "
                     f"{r['gflop']:.0f} | {bound} | {ppl} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default="sparsegpt-50,wanda-50,gptq-int4-g64,awq-int4-g64")
    p.add_argument("--windows", type=int, default=16, help="calibration windows (128 for the real protocol)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (512 for real)")
    p.add_argument("--eval-windows", type=lambda t: parse_windows(t, allow_zero=True), default=0,
                   help="ppl windows after each method (0: skip, all: the full protocol)")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = run(args)
    print(table(rows))


if __name__ == "__main__":
    main()
