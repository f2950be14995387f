"""Recipe step handler for gguf_quantize: llama.cpp's types with calibrated codes."""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from slimkit.calibration.runner import run_calibrated
from slimkit.calibration.stats import StatsRequest
from slimkit.errors import RecipeError
from slimkit.formats.ggml import pack_blocks
from slimkit.numerics.ggml_grids import GGMLCodes, fit_grid, grid_values, round_codes
from slimkit.quantization.config import GGUFQuantizeConfig, GridSolverFields
from slimkit.quantization.gguf_mix import query_groups, tensor_type
from slimkit.quantization.grid_gptq import gptq_on_grid
from slimkit.recipes.context import LayerRecord, StepContext
from slimkit.recipes.registry import register_step


def quantize_linear(config: GridSolverFields, qtype: str, ftype: str, module: nn.Module, hessian: torch.Tensor,
                    record: LayerRecord, name: str) -> None:
    """A linear's codes on its fitted grid of `qtype` (GPTQ or imatrix rounding), recorded as llama.cpp blocks."""
    w = module.weight.detach().float()
    grid = fit_grid(qtype, w, torch.diagonal(hessian))
    if config.solver == "gptq":
        codes, damp = gptq_on_grid(w, hessian, grid, config.percdamp, config.blocksize, config.act_order, name)
        if damp > config.percdamp:
            record.notes.append(f"{config.summary()}: damping raised to {damp:.3g}")
    else:
        codes = round_codes(w, grid)
    module.weight.data.copy_(grid_values(codes, grid).to(module.weight.dtype))
    record.ggml = GGMLCodes(qtype, ftype, torch.from_numpy(pack_blocks(codes, grid)))
    record.methods.append(f"{config.summary()}: {qtype}")


def outer_tensors(ctx: StepContext, ignore: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The token embedding and the head, a tied pair once under the head's name (as quantize_outer
    records it: pack stores the head's blocks, and the embedding reads their rows)."""
    model, adapter = ctx.state.model, ctx.state.adapter
    tensors = dict(adapter.embedding_modules(model))
    for name, head in adapter.linears(model, include_lm_head=True).items():
        if adapter.tensor_kind(name + ".weight") == "lm_head":
            tensors = {n: e for n, e in tensors.items() if e.weight is not head.weight}
            tensors[name] = head
    return {n: m for n, m in tensors.items() if not any(fnmatch(n, p) for p in ignore)}


def round_outer(ctx: StepContext, name: str, module: nn.Module, qtype: str, ftype: str, summary: str) -> None:
    """An outer tensor rounded to nearest on its fitted grid of `qtype`, recorded as llama.cpp blocks."""
    w = module.weight.detach().float()
    grid = fit_grid(qtype, w)
    codes = round_codes(w, grid)
    module.weight.data.copy_(grid_values(codes, grid).to(module.weight.dtype))
    record = ctx.state.record_for(name, module)
    record.ggml = GGMLCodes(qtype, ftype, torch.from_numpy(pack_blocks(codes, grid)))
    record.methods.append(f"{summary}: {qtype}, round to nearest")


def _quantize_outer(config: GGUFQuantizeConfig, ctx: StepContext, n_layers: int) -> None:
    """The token embedding and the head get their types of the mix too, round to nearest (no
    Hessian reaches them), so that the model evaluated here is the file."""
    tied = bool(getattr(ctx.state.model.config, "tie_word_embeddings", False))
    for name, module in outer_tensors(ctx, config.ignore).items():
        qtype = tensor_type(config.gguf_type, name, n_layers, module.weight.shape[1], tied)
        if qtype != "F16":
            round_outer(ctx, name, module, qtype, config.gguf_type, config.summary())


@register_step(GGUFQuantizeConfig)
def apply_gguf_quantize(config: GGUFQuantizeConfig, ctx: StepContext) -> None:
    n_layers = ctx.state.model.config.num_hidden_layers
    gqa = query_groups(ctx.state.model.config)

    def qtype_of(name: str, module: nn.Module) -> str:  # calibrated codes: llama-quantize's mix with an imatrix
        qtype = tensor_type(config.gguf_type, name, n_layers, module.weight.shape[1], gqa=gqa, imatrix=True)
        if qtype == "F16":
            raise RecipeError(f"{name}: rows of {module.weight.shape[1]} weights fit no GGML block type")
        return qtype

    def block(work, selected):
        for name, module in ctx.run.progress.track(list(selected.items()), f"block {work.index}: linears"):
            if ctx.state.records[name].mask is not None:
                raise RecipeError(f"{name}: gguf_quantize after pruning is not supported (GGUF has no sparse type)")
            quantize_linear(config, qtype_of(name, module), config.gguf_type, module, work.stats[name].hessian,
                            ctx.state.records[name], name)

    run_calibrated(config, ctx, StatsRequest(hessian=True), block, qtype_of)
    _quantize_outer(config, ctx, n_layers)
