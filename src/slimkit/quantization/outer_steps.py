"""Recipe step handler for quantize_outer: the head and the token embedding on llama.cpp's grids.

No Hessian reaches them in the block-by-block solvers, so they are rounded to nearest on the grid
their GGML type fits (as llama-quantize does without an imatrix for them); the blocks are recorded,
so `pack` and `export --to gguf` store exactly these codes, and a tied embedding reads the head's.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from slimkit.models.adapters import submodule_at
from slimkit.numerics.ggml_grids import OUTER_FTYPE, TYPES
from slimkit.quantization.config import QuantizeOuterConfig
from slimkit.quantization.gguf_steps import round_outer
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step

FALLBACK = {"Q6_K": "Q8_0", "Q5_0": "Q8_0", "Q4_0": "Q8_0"}  # where a type's blocks do not tile the row


def fitting_type(qtype: str, cols: int) -> str | None:
    """`qtype`, or the type llama.cpp falls back to when its blocks do not tile a row of `cols`."""
    while cols % TYPES[qtype].row_multiple:
        if qtype not in FALLBACK:
            return None
        qtype = FALLBACK[qtype]
    return qtype


def outer_targets(config: QuantizeOuterConfig, ctx: StepContext) -> list[tuple[str, nn.Module, str]]:
    """(name, module, GGML type) of the head and the token embedding; one entry, under the head's
    name, for a tied pair."""
    model, adapter = ctx.state.model, ctx.state.adapter
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = submodule_at(model, adapter.lm_head) if adapter.lm_head else None
    names = {id(m): n for n, m in model.named_modules()}
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    wanted = [(head, config.head), *([] if tied else [(embedding, config.embedding)])]
    out = []
    for module, qtype in wanted:
        if module is None or qtype == "dense" or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        name = names[id(module)]
        fitted = fitting_type(qtype, module.weight.shape[1])
        if fitted is not None and not any(fnmatch(name, p) for p in config.ignore):
            out.append((name, module, fitted))
    return out


@register_step(QuantizeOuterConfig)
def apply_quantize_outer(config: QuantizeOuterConfig, ctx: StepContext) -> None:
    for name, module, qtype in ctx.run.progress.track(outer_targets(config, ctx), "head and embedding"):
        round_outer(ctx, name, module, qtype, OUTER_FTYPE, "quantize_outer")
