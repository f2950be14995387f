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
from slimkit.quantization.config import GGUFQuantizeConfig
from slimkit.quantization.gguf_mix import query_groups, tensor_type
from slimkit.quantization.grid_gptq import gptq_on_grid
from slimkit.recipes.context import LayerRecord, StepContext
from slimkit.recipes.registry import register_step


def _quantize_linear(config: GGUFQuantizeConfig, qtype: str, module: nn.Module, hessian: torch.Tensor,
                     record: LayerRecord, name: str) -> None:
    w = module.weight.detach().float()
    grid = fit_grid(qtype, w, torch.diagonal(hessian))
    if config.solver == "gptq":
        codes, damp = gptq_on_grid(w, hessian, grid, config.percdamp, config.blocksize, config.act_order, name)
        if damp > config.percdamp:
            record.notes.append(f"{config.summary()}: damping raised to {damp:.3g}")
    else:
        codes = round_codes(w, grid)
    module.weight.data.copy_(grid_values(codes, grid).to(module.weight.dtype))
    record.ggml = GGMLCodes(qtype, config.gguf_type, torch.from_numpy(pack_blocks(codes, grid)))
    record.methods.append(f"{config.summary()}: {qtype}")


def _quantize_outer(config: GGUFQuantizeConfig, ctx: StepContext, n_layers: int) -> None:
    """The token embedding and the head get their types of the mix too, round to nearest (no
    Hessian reaches them), so that the model evaluated here is the file. A tied pair is one tensor,
    recorded under the head's name (as quantize_outer records it: pack stores the head's blocks,
    and the embedding reads their rows)."""
    model, adapter = ctx.state.model, ctx.state.adapter
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = dict(adapter.embedding_modules(model))
    for name, head in adapter.linears(model, include_lm_head=True).items():
        if adapter.tensor_kind(name + ".weight") == "lm_head":
            tensors = {n: e for n, e in tensors.items() if e.weight is not head.weight}
            tensors[name] = head
    for name, module in tensors.items():
        if any(fnmatch(name, p) for p in config.ignore):
            continue
        w = module.weight.detach().float()
        qtype = tensor_type(config.gguf_type, name, n_layers, w.shape[1], tied)
        if qtype == "F16":
            continue
        grid = fit_grid(qtype, w)
        codes = round_codes(w, grid)
        module.weight.data.copy_(grid_values(codes, grid).to(module.weight.dtype))
        record = ctx.state.record_for(name, module)
        record.ggml = GGMLCodes(qtype, config.gguf_type, torch.from_numpy(pack_blocks(codes, grid)))
        record.methods.append(f"{config.summary()}: {qtype}, round to nearest")


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
            _quantize_linear(config, qtype_of(name, module), module, work.stats[name].hessian,
                             ctx.state.records[name], name)

    run_calibrated(config, ctx, StatsRequest(hessian=True), block, qtype_of)
    _quantize_outer(config, ctx, n_layers)
