"""Recipe step handler for `rotate`: rotate the model in place, then prove the function unchanged."""

from __future__ import annotations

import torch

from slimkit.errors import UnsupportedArchitectureError
from slimkit.quantization.config import RotateConfig
from slimkit.quantization.rotate_model import rotate_model
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step
from slimkit.recipes.targets import select_targets

PROBE_TOKENS = 32


def relative_tolerance(dtype: torch.dtype) -> float:
    """How far the rotated model's logits may move, relative to their largest magnitude (the weights
    are rotated in float64 and stored back in their own dtype)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _rotated_linears(names: list[str], adapter, report) -> list[str]:
    """The targets whose weights the rotation changed: all of them, or with the stream left alone
    only the values' v_proj and o_proj (none where values were not rotated either)."""
    if report.stream_rotated:
        return list(names)
    if report.head_dim is None:
        return []
    return [n for n in names if n.endswith("." + adapter.v_proj) or n.endswith("." + adapter.o_proj)]


@register_step(RotateConfig)
@torch.no_grad()
def apply_rotate(config: RotateConfig, ctx: StepContext) -> None:
    model = ctx.state.model
    weight = next(model.parameters())
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, PROBE_TOKENS),
                        generator=torch.Generator().manual_seed(config.seed)).to(weight.device)
    before = _logits(model, ids)
    parameters_before = sum(p.numel() for p in model.parameters())
    ctx.run.progress.note(f"{config.summary()}: folding norms and rotating")
    report = rotate_model(model, ctx.state.adapter, config.seed, config.heads, untie=config.tied == "untie")
    change = float((_logits(model, ids) - before).abs().max() / before.abs().max())
    if change > relative_tolerance(weight.dtype):
        raise UnsupportedArchitectureError(
            f"the rotated {model.config.model_type} model computes another function (logits moved by {change:.2e} "
            "of their largest value): a norm or projection of this architecture does not commute with the rotation")
    rotated = (config.summary() if report.stream_rotated
               else f"rotate (values per head only: the tied head kept, seed {config.seed})")
    for name in _rotated_linears(select_targets(model, ctx.state.adapter, config, ctx.state.records),
                                 ctx.state.adapter, report):
        ctx.state.records[name].methods.append(rotated)
    notes = [f"logits on {PROBE_TOKENS} random tokens moved by {change:.1e} of their largest value", *report.notes]
    changes = {"tie_word_embeddings": (True, False)} if report.untied_head else {}
    if report.untied_head:
        notes.append("the tied head was untied: the final norm's weight is folded into the head, not the embedding")
    ctx.state.details.append({"step": config.summary(), "parameters_before": parameters_before,
                              "parameters_after": sum(p.numel() for p in model.parameters()),
                              "config_changes": changes, "notes": notes})
