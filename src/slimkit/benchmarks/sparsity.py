"""`slimkit bench sparsity`: "Unstructured sparsity: theory vs reality", on this machine.

For the linears of the first blocks of a model (SmolLM2: q/k/v/o, gate/up/down), at each
sparsity and batch size, the time of one pass over the block's linears with:

- dense: the original weight (the reference);
- zeros-in-dense: the pruned weight kept dense (the "sparsity illusion");
- torch CSR: MKL sparse, int32 indices, computed as W @ x^T;
- torch BSR 16x16: a block-sparse mask at the same sparsity (whole 16x16 blocks pruned);
- slimkit sparse: the packed format's module end to end: slimkit's bitmask kernel (AVX2) up to
  80% sparsity, MKL CSR above (or everywhere when the kernel is not built), dequantize + GEMM
  for the row counts where that was measured faster;
- slimkit 2:4 (50% only): the 2:4 format's module (the bitmask kernel, or the fallback that
  rebuilds the weight when the kernel is not built).

Theory says 1 / (1 - sparsity). Each measurement is the median of interleaved repeats
(method A, B, C, ... then again), so drift hits every method alike.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slimkit.formats import format_class
from slimkit.formats.kernel_rows import choose_kernel_rows
from slimkit.numerics.magnitude import nm_mask, unstructured_mask

SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
BATCHES = (1, 8, 128)
BLOCK = 16


def _block_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    rows, cols = w.shape
    norms = w.reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).pow(2).sum((1, 3))
    keep = unstructured_mask(norms, sparsity)
    return keep.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)


def _csr(w: torch.Tensor) -> torch.Tensor:
    c = w.to_sparse_csr()
    return torch.sparse_csr_tensor(c.crow_indices().int(), c.col_indices().int(), c.values(), w.shape)


def _methods(weights: list[torch.Tensor], sparsity: float) -> dict:
    """name -> list of callables x -> y, one per linear of the block."""
    masks = [unstructured_mask(w, sparsity) for w in weights]
    pruned = [w * m for w, m in zip(weights, masks)]
    csrs = [_csr(p) for p in pruned]
    bsrs = [(w * _block_mask(w, sparsity)).to_sparse_bsr((BLOCK, BLOCK)) for w in weights]
    packed = [format_class("sparse").from_dense(w, mask=m) for w, m in zip(weights, masks)]
    choose_kernel_rows(packed)  # as packing does: kernel or dequantize + GEMM by rows, measured here
    methods = {
        "dense": [lambda x, w=w: F.linear(x, w) for w in weights],
        "zeros-in-dense": [lambda x, w=p: F.linear(x, w) for p in pruned],
        "torch CSR": [lambda x, c=c: (c @ x.T).T for c in csrs],
        "torch BSR 16x16": [lambda x, b=b: (b @ x.T).T for b in bsrs],
        "slimkit sparse": [lambda x, m=m: m(x) for m in packed],
    }
    if sparsity == 0.5:
        two4 = [format_class("2:4").from_dense(w, mask=nm_mask(w, 2, 4)) for w in weights]
        choose_kernel_rows(two4)
        methods["slimkit 2:4"] = [lambda x, m=m: m(x) for m in two4]
    return methods


@torch.no_grad()
def measure(weights: list[torch.Tensor], sparsities=SPARSITIES, batches=BATCHES, repeats: int = 15,
            progress=None) -> list[dict]:
    rows = []
    grid = [(s, b) for s in sparsities for b in batches]
    if progress is not None:
        grid = progress.track(grid, "bench sparsity")
    by_sparsity: dict[float, dict] = {}
    for sparsity, batch in grid:
        if sparsity not in by_sparsity:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's "sparse CSR/BSR support is in beta"
                by_sparsity = {sparsity: _methods(weights, sparsity)}
        methods = by_sparsity[sparsity]
        inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(2):  # warm-up
            for fns in methods.values():
                for f, w in zip(fns, weights):
                    f(inputs[w.shape[1]])
        for _ in range(repeats):
            for name, fns in methods.items():
                t0 = time.perf_counter()
                for f, w in zip(fns, weights):
                    f(inputs[w.shape[1]])
                times[name].append(time.perf_counter() - t0)
        dense = statistics.median(times["dense"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"sparsity": sparsity, "batch": batch, "method": name, "median_ms": med * 1e3,
                         "measured_speedup": dense / med, "theoretical_speedup": 1 / (1 - sparsity),
                         "repeats": repeats})
    return rows


def table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    head = "| sparsity | batch | theory | " + " | ".join(methods) + " | dense ms |"
    lines = [head, "|" + "---|" * (len(methods) + 4)]
    keys = list(dict.fromkeys((r["sparsity"], r["batch"]) for r in rows))
    for s, b in keys:
        cell = {r["method"]: r for r in rows if r["sparsity"] == s and r["batch"] == b}
        vals = [f"{cell[m]['measured_speedup']:.2f}x" if m in cell else "-" for m in methods]
        lines.append(f"| {s:.0%} | {b} | {1 / (1 - s):.1f}x | " + " | ".join(vals) + f" | {cell['dense']['median_ms']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.2), sharey=True, squeeze=False)
    sparsities = sorted({r["sparsity"] for r in rows})
    for ax, b in zip(axes[0], batches):
        ax.plot([s * 100 for s in sparsities], [1 / (1 - s) for s in sparsities], "k--", label="theory 1/(1-s)")
        for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            pts = sorted((r["sparsity"], r["measured_speedup"]) for r in rows if r["method"] == m and r["batch"] == b)
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "s", label=m)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("sparsity (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("speed-up vs dense fp32 (log)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def block_weights(model_name: str, blocks: int = 4) -> tuple[list[torch.Tensor], str]:
    """The linears of the first `blocks` blocks: several blocks, so that the weights outgrow
    the L3 cache as in a real forward pass (one SmolLM2 block, 14 MB in fp32, would not)."""
    from slimkit.models import load_model

    lm = load_model(model_name)
    all_blocks = lm.adapter.get_blocks(lm.model)[:blocks]
    linears = lm.adapter.block_linears(all_blocks[0])
    shapes = ", ".join(f"{n}{tuple(m.weight.shape)}" for n, m in linears.items())
    weights = [m.weight.detach().float().contiguous() for i, b in enumerate(all_blocks)
               for m in lm.adapter.for_block(i).block_linears(b).values()]
    return weights, f"{shapes}; {len(all_blocks)} blocks ({sum(w.numel() for w in weights) * 4 / 2**20:.0f} MB fp32)"


@dataclass(frozen=True)
class SparsityGrid:
    """What `slimkit bench sparsity` times: each sparsity at each batch size, the median of
    `repeats` interleaved runs, over the linears of the first `blocks` blocks."""

    sparsities: tuple[float, ...] = SPARSITIES
    batches: tuple[int, ...] = BATCHES
    repeats: int = 15
    blocks: int = 4


def run(model: str, output: Path, grid: SparsityGrid = SparsityGrid(), progress=None, overwrite: bool = False) -> dict:
    from slimkit.io.outputs import output_directory
    from slimkit.paths import MeasureDir

    weights, shapes = block_weights(model, grid.blocks)
    rows = measure(weights, list(grid.sparsities), list(grid.batches), grid.repeats, progress)
    title = (f"Unstructured sparsity, theory vs reality: {model}, linears of {grid.blocks} blocks, "
             f"{torch.get_num_threads()} threads, median of {grid.repeats} interleaved repeats")
    md = "\n".join([f"# {title}", "", f"Shapes: {shapes}", "", table(rows), "",
                    "Cells: measured speed-up over dense fp32 (same inputs, same run). theory = 1/(1-s).",
                    "BSR prunes whole 16x16 blocks at the same sparsity (a different mask, same count).", ""])
    with output_directory(output, overwrite, inputs=[model], command="bench sparsity") as tmp:
        written = MeasureDir(tmp, "sparsity")
        written.json.write_text(json.dumps({"model": model, "shapes": shapes, "rows": rows}, indent=2))
        written.md.write_text(md)
        plot(rows, written.png, title)
    return {"rows": rows, "markdown": md, "output": str(output)}
