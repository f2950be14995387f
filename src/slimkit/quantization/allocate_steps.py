"""Recipe step handler for gguf_allocate: measure each tensor's sensitivity, allocate its GGML
type to the budget, then write calibrated codes in those types (one pass)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from slimkit.calibration.runner import run_calibrated
from slimkit.calibration.stats import StatsRequest
from slimkit.errors import RecipeError
from slimkit.numerics.ggml_grids import ALLOCATED_FTYPE
from slimkit.quantization.allocation import (
    Allocation,
    Choice,
    Frontier,
    Item,
    best_under,
    best_within,
    smallest_within,
)
from slimkit.quantization.config import GGUFAllocateConfig
from slimkit.quantization.gguf_mix import FILE_TYPES, query_groups, tensor_type
from slimkit.quantization.gguf_steps import outer_tensors, quantize_linear, round_outer
from slimkit.quantization.sensitivity import (
    KLDProbe,
    measure_gain,
    proxy_errors,
    rounded,
    tensor_bytes,
    tiling_types,
)
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step


def _types_of(config: GGUFAllocateConfig, name: str, module: nn.Module) -> list[str]:
    types = tiling_types(config.types, module.weight.shape[1])
    if not types:
        raise RecipeError(f"{name}: rows of {module.weight.shape[1]} weights fit none of the types {config.types}")
    return types


def _linear_proxies(config: GGUFAllocateConfig, ctx: StepContext) -> dict[str, tuple[dict[str, float], torch.Tensor]]:
    """Pass 1 (weights unchanged): every linear's proxy error at each of its candidate types, and
    the importance (diag H) its grids are fitted with."""
    proxies: dict[str, tuple[dict[str, float], torch.Tensor]] = {}

    def block(work, selected):
        for name, module in ctx.run.progress.track(list(selected.items()), f"block {work.index}: sensitivity"):
            hessian = work.stats[name].hessian
            proxies[name] = (proxy_errors(module.weight, hessian, _types_of(config, name, module)),
                             torch.diagonal(hessian).float().clone())

    run_calibrated(config, ctx, StatsRequest(hessian=True), block, lambda n, m: _types_of(config, n, m))
    return proxies


def _items(config: GGUFAllocateConfig, ctx: StepContext, proxies: dict) -> list[Item]:
    """Each tensor's choices with predicted KLD: linears by their gain curve x proxy, the outer
    tensors measured at every type."""
    model = ctx.state.model
    probe = KLDProbe(model, ctx.run.calibration()[: config.probe_windows])
    items = []
    linears = dict(model.named_modules())
    for name, (errors, importance) in ctx.run.progress.track(list(proxies.items()),
                                                             "sensitivity: two KLDs per linear"):
        weight = linears[name].weight
        gain = measure_gain(probe, weight, errors, importance)
        items.append(Item(name, (name,), tuple(Choice(t, tensor_bytes(t, *weight.shape), gain.kld(e))
                                                for t, e in errors.items())))
    for name, module in outer_tensors(ctx, config.ignore).items():
        weight, types = module.weight, _types_of(config, name, module)
        klds = [probe.kld_with(weight, rounded(weight, t)) for t in
                ctx.run.progress.track(types, f"sensitivity: {name} at {len(types)} types")]
        items.append(Item(name, (name,), tuple(Choice(t, tensor_bytes(t, *weight.shape), k)
                                                for t, k in zip(types, klds))))
    return items


def _fixed_bytes(ctx: StepContext, items: list[Item]) -> int | None:
    """The GGUF's bytes outside the allocated tensors: header, hyper-parameters, tokenizer (the
    run's `file_overhead`), and the tensors written in F32 (norms, biases); None outside `compress`."""
    if ctx.run.file_overhead is None:
        return None
    model = ctx.state.model
    allocated = {id(model.get_submodule(m).weight) for item in items for m in item.members}
    rest = sum(p.numel() * 4 for p in model.parameters() if id(p) not in allocated)
    return ctx.run.file_overhead(model) + rest


def _decode_cost(ctx: StepContext, items: list[Item], costs) -> dict[str, dict[str, float]]:
    """Each item's decode ms/token at each type, over the reference file's (costs: DecodeCosts)."""
    model = ctx.state.model

    def multiplied(member: str) -> int:  # an untied embedding is read one row a token: no matmul
        module = model.get_submodule(member)
        return 0 if isinstance(module, nn.Embedding) else module.weight.numel()

    return {item.name: {c.qtype: costs.of(c.qtype, sum(multiplied(m) for m in item.members)) for c in item.choices}
            for item in items}


def _time_budget(config: GGUFAllocateConfig, ctx: StepContext, items: list[Item]) -> tuple[Allocation, float, str]:
    if ctx.run.decode_costs is None:
        raise RecipeError("gguf_allocate's max_decode_ms needs llama.cpp's measured decode costs: run it through "
                          "`slimkit compress --max-decode-ms`")
    costs = ctx.run.decode_costs(list(config.types))
    cost = _decode_cost(ctx, items, costs)
    if config.max_decode_ms <= costs.reference_ms + sum(min(c.values()) for c in cost.values()) - 1e-9:
        fastest = costs.reference_ms + sum(min(c.values()) for c in cost.values())
        raise RecipeError(f"no mix of these types is predicted to decode within {config.max_decode_ms:g} ms/token "
                          f"here (the fastest: {fastest:.2f} ms with llama.cpp at {costs.threads} threads)")
    allocation = best_within(items, cost, config.max_decode_ms - costs.reference_ms)
    predicted = costs.reference_ms + sum(cost[n][c.qtype] for n, c in allocation.chosen.items())
    return allocation, predicted, (f"predicted llama.cpp decode {predicted:.2f} ms/token at {costs.threads} threads (all-Q8_0 "
                        f"file measured {costs.reference_ms:.2f} ms; each type's cost measured with llama-bench)")


FILLED = 0.995  # a target size or bpw is filled to within 1% (half of it: the fixed part is an estimate), not only kept under


def _allocate(config: GGUFAllocateConfig, ctx: StepContext, items: list[Item]
              ) -> tuple[Allocation, int | None, list[str], dict]:
    """The allocation for the step's budget, the file's fixed bytes, notes, and any prediction
    beyond bytes and KLD (the decode time of a time budget)."""
    fixed = _fixed_bytes(ctx, items)
    if config.max_kld is not None:
        return smallest_within(items, config.max_kld), fixed, [], {}
    if config.max_decode_ms is not None:
        allocation, decode_ms, note = _time_budget(config, ctx, items)
        return allocation, fixed, [note], {"llamacpp_decode_ms": decode_ms}
    if fixed is None:
        raise RecipeError("gguf_allocate's size budgets need the GGUF's fixed size (its tokenizer and metadata): "
                          "run it through `slimkit compress`, or give --max-kld")
    parameters = sum(p.numel() for p in ctx.state.model.parameters())
    total = config.target_size if config.target_size is not None else int(config.target_bpw * parameters / 8)
    if total <= fixed:
        raise RecipeError(f"the budget, {total / 1e6:.2f} MB, is not more than the file's fixed part "
                          f"({fixed / 1e6:.2f} MB: tokenizer, metadata and F32 norms)")
    allocation = best_under(items, total - fixed, floor=int(FILLED * total) - fixed)
    least = best_under(items, total - fixed)
    notes = [] if least.bytes >= allocation.bytes or least.predicted_kld >= allocation.predicted_kld else [
        f"the least predicted KLD, {least.predicted_kld:.4f}, takes {(least.bytes + fixed) / 1e6:.2f} MB: the budget is "
        f"filled from {FILLED:.1%} of it with the least KLD predicted there (more bits where the sensitivities "
        "cannot tell them apart)"]
    return allocation, fixed, notes, {}


def mix_predictions(items: list[Item], model: nn.Module) -> dict[str, tuple[int, float]]:
    """llama.cpp's file types (with an imatrix) as the same sensitivities predict them: (tensor bytes,
    predicted KLD) for each mix whose every tensor type is among the candidates."""
    config, modules = model.config, dict(model.named_modules())
    n_layers, gqa = config.num_hidden_layers, query_groups(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    mixes = {}
    for ftype in FILE_TYPES:
        chosen = []
        for item in items:
            qtype = tensor_type(ftype, item.name, n_layers, modules[item.name].weight.shape[1], tied, gqa=gqa,
                                imatrix=True)
            chosen.append(next((c for c in item.choices if c.qtype == qtype), None))
        if all(chosen):
            mixes[ftype] = (sum(c.bytes for c in chosen), sum(c.kld for c in chosen))
    return mixes


def _quantize(config: GGUFAllocateConfig, ctx: StepContext, types: dict[str, str]) -> None:
    """Pass 2: every linear's codes in its allocated type, GPTQ on the fitted grid; the outer
    tensors rounded to nearest on theirs."""
    def block(work, selected):
        for name, module in ctx.run.progress.track(list(selected.items()), f"block {work.index}: linears"):
            quantize_linear(config, types[name], ALLOCATED_FTYPE, module, work.stats[name].hessian,
                            ctx.state.records[name], name)

    run_calibrated(config, ctx, StatsRequest(hessian=True), block)
    for name, module in outer_tensors(ctx, config.ignore).items():
        round_outer(ctx, name, module, types[name], ALLOCATED_FTYPE, config.summary())


def _detail(config: GGUFAllocateConfig, items: list[Item], allocation: Allocation, fixed: int | None,
            model: nn.Module) -> dict:
    """The report's record: each tensor's type, bytes and predicted KLD; the predicted frontier and
    llama.cpp's mixes on it (whole-file bytes where the file's fixed part is known)."""
    parameters = sum(p.numel() for p in model.parameters())
    base = fixed or 0
    counts: dict[str, int] = {}
    for choice in allocation.chosen.values():
        counts[choice.qtype] = counts.get(choice.qtype, 0) + 1
    whole = f", whole GGUF {(allocation.bytes + base) / 1e6:.2f} MB, {(allocation.bytes + base) * 8 / parameters:.3f} bpw"
    return {"step": config.summary(), "config_changes": {},
            "allocation": {name: {"type": c.qtype, "bytes": c.bytes, "predicted_kld": c.kld}
                           for name, c in allocation.chosen.items()},
            "predicted": {"bytes": allocation.bytes + base, "kld": allocation.predicted_kld, "whole_file": fixed is not None,
                          "frontier": [[b + base, k] for b, k in Frontier(items).curve()],
                          "llamacpp_mixes": {t: [b + base, k] for t, (b, k) in mix_predictions(items, model).items()}},
            "notes": [f"allocated {', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}: tensors "
                      f"{allocation.bytes / 1e6:.2f} MB" + (whole if fixed is not None else ""),
                      f"predicted mean KLD {allocation.predicted_kld:.4f} (sum of the tensors' measured "
                      f"sensitivities, on calibration windows)"]}


_MEASURED: dict[tuple, list[Item]] = {}  # sensitivities of this process's runs (several budgets, one model)
BUDGETS = ("target_bpw", "target_size", "max_kld", "max_decode_ms")


@torch.no_grad()
def _measurement_key(config: GGUFAllocateConfig, ctx: StepContext) -> tuple:
    """What the sensitivities depend on: the weights (a checksum), the step's settings but its
    budget, and the calibration windows."""
    weights = tuple(float(p.double().sum()) for p in ctx.state.model.parameters())
    settings = tuple(sorted((k, str(v)) for k, v in config.model_dump().items() if k not in BUDGETS))
    return weights, settings, hashlib.sha256(ctx.run.calibration().numpy().tobytes()).hexdigest()


def measured_items(config: GGUFAllocateConfig, ctx: StepContext) -> list[Item]:
    """Every tensor's choices with their predicted KLD, measured once per model, settings and
    calibration windows in a process (a run with several budgets measures once)."""
    key = _measurement_key(config, ctx)
    if key in _MEASURED:
        ctx.run.progress.note(f"{config.summary()}: the sensitivities measured for another budget of this run")
        return _MEASURED[key]
    ctx.run.progress.note(f"{config.summary()}: measuring each tensor's sensitivity")
    with torch.no_grad():
        items = _items(config, ctx, _linear_proxies(config, ctx))
    _MEASURED.clear()  # one model's at a time
    _MEASURED[key] = items
    return items


@register_step(GGUFAllocateConfig)
def apply_gguf_allocate(config: GGUFAllocateConfig, ctx: StepContext) -> None:
    progress = ctx.run.progress
    items = measured_items(config, ctx)
    allocation, fixed, notes, predicted = _allocate(config, ctx, items)
    detail = _detail(config, items, allocation, fixed, ctx.state.model)
    detail["notes"] += notes
    detail["predicted"] |= predicted
    progress.note(f"{config.summary()}: {'; '.join(detail['notes'])}")
    _quantize(config, ctx, allocation.types)
    ctx.state.details.append(detail)
