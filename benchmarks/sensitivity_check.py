"""Does gguf_allocate's predicted KLD rank and add up like the measured one? On one model:

    python -m benchmarks.sensitivity_check -o out/sensitivity [--model smollm2-135m] [--pairs 60]

- sensitivities as gguf_allocate measures them (a gain curve per linear from measured KLDs at its
  worst and best types, times the Hessian-weighted proxy at the others; head and embedding
  measured at every type);
- ranking: `--pairs` (tensor, type) pairs drawn at random among the linears' types other than the
  two their gain was measured at; each pair's KLD measured with that tensor alone rounded to that
  type; Spearman's rank correlation between predicted and measured;
- additivity: the allocations for a few budgets applied all at once (round to nearest), the
  model's measured KLD beside the predicted sum.

Writes sensitivity_check.json and sensitivity_check.md into the output dir.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = torch.tensor(x).argsort()
        r = torch.empty(len(x))
        r[order] = torch.arange(len(x), dtype=torch.float32)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _context(model: str, windows: int, seqlen: int):
    from slimkit.data import calibration_windows, load_split
    from slimkit.models import load_model
    from slimkit.models.adapters import adapter_for
    from slimkit.recipes.context import ModelState, RunResources, StepContext

    lm = load_model(model)
    cal = calibration_windows(lm.tokenizer, load_split(), windows, seqlen, 0)
    return StepContext(ModelState(lm.model, adapter_for(lm.model)),
                       RunResources(calibration=lambda: cal, tokenizer=lm.tokenizer))


@torch.no_grad()
def importances(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """diag(H) of every linear on the calibration windows (sum of x^2 per input column), the
    importance gguf_allocate fits its grids with."""
    sums, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def add(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
            hooks.append(module.register_forward_pre_hook(add))
    try:
        for window in windows:
            model(window[None])
    finally:
        for h in hooks:
            h.remove()
    return sums


@torch.no_grad()
def _ranking(ctx, items, probe, pairs: int, seed: int) -> dict:
    from slimkit.quantization.sensitivity import rounded

    modules = dict(ctx.state.model.named_modules())
    importance = importances(ctx.state.model, ctx.run.calibration())
    linears = [i for i in items if i.name in modules and isinstance(modules[i.name], torch.nn.Linear)
               and len(i.choices) > 1 and i.name != "lm_head"]
    rng = random.Random(seed)
    drawn = []
    for _ in range(pairs):
        item = rng.choice(linears)
        ends = (max(item.choices, key=lambda c: c.kld), min(item.choices, key=lambda c: c.kld))  # measured
        choice = rng.choice([c for c in item.choices if c not in ends] or list(ends))
        weight = modules[item.name].weight
        drawn.append({"tensor": item.name, "type": choice.qtype, "predicted": choice.kld,
                      "measured": probe.kld_with(weight, rounded(weight, choice.qtype, importance[item.name]))})
    return {"pairs": drawn, "spearman": spearman([d["predicted"] for d in drawn], [d["measured"] for d in drawn])}


@torch.no_grad()
def _additivity(ctx, items, probe, fractions: list[float]) -> list[dict]:
    from slimkit.quantization.allocation import best_under
    from slimkit.quantization.sensitivity import rounded

    low = sum(min(c.bytes for c in i.choices) for i in items)
    high = sum(max(c.bytes for c in i.choices) for i in items)
    modules = dict(ctx.state.model.named_modules())
    from slimkit.quantization.gguf_steps import outer_tensors

    importance = importances(ctx.state.model, ctx.run.calibration())
    for name in outer_tensors(ctx):  # rounded without importance, as gguf_allocate rounds them
        importance.pop(name, None)
    rows = []
    for f in fractions:
        allocation = best_under(items, int(low + f * (high - low)))
        saved = {n: modules[n].weight.detach().clone() for n in allocation.types}
        for name, qtype in allocation.types.items():
            modules[name].weight.data.copy_(rounded(modules[name].weight, qtype, importance.get(name)))
        measured = probe.kld()
        for name, w in saved.items():
            modules[name].weight.data.copy_(w)
        rows.append({"bytes": allocation.bytes, "predicted": allocation.predicted_kld, "measured": measured})
    return rows


def run(model: str, output: Path, pairs: int, windows: int, seqlen: int, seed: int = 0,
        candidates: tuple[str, ...] | None = None) -> dict:
    from slimkit.io.outputs import output_directory
    from slimkit.quantization.allocate_steps import measured_items
    from slimkit.quantization.config import GGUFAllocateConfig
    from slimkit.quantization.sensitivity import KLDProbe

    ctx = _context(model, windows, seqlen)
    config = GGUFAllocateConfig(target_bpw=4.0, **({"types": candidates} if candidates else {}))
    items = measured_items(config, ctx)
    probe = KLDProbe(ctx.state.model, ctx.run.calibration()[: config.probe_windows])
    result = {"model": model, "ranking": _ranking(ctx, items, probe, pairs, seed),
              "additivity": _additivity(ctx, items, probe, [0.1, 0.3, 0.6])}
    lines = [f"# Sensitivity check on {model}", "",
             f"- Spearman rank correlation, predicted vs measured KLD of one tensor at one type, {pairs} pairs "
             f"(not the types the gain was measured at): **{result['ranking']['spearman']:.3f}**", "",
             "| allocation MB (tensors) | predicted KLD (sum) | measured KLD (all at once, RTN) |", "|---|---|---|",
             *[f"| {r['bytes'] / 1e6:.2f} | {r['predicted']:.4f} | {r['measured']:.4f} |" for r in result["additivity"]],
             "", f"- KLD on {config.probe_windows} calibration windows of {seqlen} tokens; candidate types: "
             f"{', '.join(config.types)}"]
    with output_directory(output, False, inputs=[model], command="sensitivity_check") as tmp:
        (tmp / "sensitivity_check.json").write_text(json.dumps(result, indent=2))
        (tmp / "sensitivity_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("-o", "--output", type=Path, required=True, help="output dir (written atomically)")
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--windows", type=int, default=16, help="calibration windows (the Hessians)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--candidates", default="", help="candidate GGML types (default: gguf_allocate's)")
    a = p.parse_args(argv)
    run(a.model, a.output, a.pairs, a.windows, a.seqlen, candidates=tuple(a.candidates.split(",")) if a.candidates else None)


if __name__ == "__main__":
    main()
