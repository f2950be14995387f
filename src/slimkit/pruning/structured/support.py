"""Whether a model's structure allows the structured pruning asked for, and if not, why.

Structured surgery slices q/k/v by head, gate/up by MLP channel and every block alike. A discovered
architecture can break those assumptions (fused projections, norms across all heads, an MLP width the
config calls something else, blocks that differ); each is refused up front with its reason.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from slimkit.errors import UnsupportedArchitectureError
from slimkit.models.adapters import ArchitectureAdapter
from slimkit.models.fold_check import out_width
from slimkit.pruning.structured.config import StructuredPruneConfig

# config fields that name a width (OPT's word_embed_proj_dim, ALBERT's embedding_size), not a length
WIDTH_WORDS = re.compile(r"dim|size|embd|embed")
NOT_WIDTHS = re.compile(r"position|vocab|max_|window|chunk")


def _head_problems(model: nn.Module, block: nn.Module, adapter: ArchitectureAdapter) -> list[str]:
    if adapter.q_proj == adapter.k_proj:
        return [f"q, k and v are one fused projection ({adapter.q_proj})"]
    head_dim = adapter.heads(model).head_dim
    attention = adapter.q_proj.rsplit(".", 1)[0] + "." if "." in adapter.q_proj else ""
    across = [name for name, m in block.named_modules() if name.startswith(attention)
              and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1
              and m.weight.numel() > head_dim]
    return [f"{', '.join(across)} normalise q or k across all heads"] if across else []


def _mlp_problems(model: nn.Module, block: nn.Module, adapter: ArchitectureAdapter) -> list[str]:
    width = getattr(model.config, "intermediate_size", None)
    if not width:
        return ["its config has no intermediate_size (the MLP width goes by another name)"]
    return _fused_mlp(block, adapter, width)


def _fused_mlp(block: nn.Module, adapter: ArchitectureAdapter, width: int | None) -> list[str]:
    if not width:
        return []
    fused = [p for p in adapter.mlp_inputs if out_width(block.get_submodule(p)) != width]
    return [f"{', '.join(fused)} is wider than intermediate_size={width} (fused MLP inputs)"] if fused else []


def _hidden_problems(model: nn.Module) -> list[str]:
    config = model.config
    names = {"hidden_size", getattr(config, "attribute_map", {}).get("hidden_size")}  # GPT-J stores it as n_embd
    alike = [k for k, v in config.to_dict().items() if v == config.hidden_size and k not in names and type(v) is int
             and WIDTH_WORDS.search(k) and not NOT_WIDTHS.search(k)]
    return [f"its config has other fields equal to hidden_size ({', '.join(alike)}) that slimkit cannot tell "
            "whether to change"] if alike else []


def _layer_problems(adapter: ArchitectureAdapter, model: nn.Module) -> list[str]:
    shapes = [{k: tuple(v.shape) for k, v in b.state_dict().items()} for b in adapter.get_blocks(model)]
    differ = [i for i, s in enumerate(shapes) if s != shapes[-1]]
    return [f"its blocks are not all alike (blocks {differ} differ from the last)"] if differ else []


def check_structured_support(model: nn.Module, adapter: ArchitectureAdapter, config: StructuredPruneConfig) -> None:
    block = adapter.get_blocks(model)[0]
    heads = config.heads is not None or config.num_heads is not None
    hidden = config.hidden is not None or config.hidden_size is not None
    hidden = hidden or (heads and not adapter.head_dim_is_free(model.config))  # the head size follows hidden
    problems = [f"blocks {list(adapter.variants[0][0])[:5]} are built differently from block 0 (structured "
                "pruning plans every block alike)"] if adapter.variants else []
    restructure = adapter.restructure_problem(model)
    mlp = config.mlp is not None or config.intermediate_size is not None
    if restructure and (heads or hidden or mlp):
        problems.append(restructure)
    elif heads or hidden:
        problems += _head_problems(model, block, adapter)
    if mlp and not restructure:
        problems += _mlp_problems(model, block, adapter)
    if adapter.experts and (hidden or config.mlp is not None or config.intermediate_size is not None):
        problems.append("its MLP is a set of MoE experts: remove whole experts (`experts`/`num_experts`) "
                        "rather than MLP or hidden channels")
    if not adapter.experts and (config.experts is not None or config.num_experts is not None):
        problems.append("it has no MoE experts to remove")
    if hidden:
        problems += _fused_mlp(block, adapter, getattr(model.config, "intermediate_size", None))
        problems += _hidden_problems(model)
    if config.layers is not None or config.drop_layers is not None:
        problems += _layer_problems(adapter, model)
    if problems:
        raise UnsupportedArchitectureError(
            f"structured pruning of {adapter.name} cannot do what the recipe asks: {'; '.join(problems)}. "
            "Unstructured pruning and quantization work on it; of the structured kinds, use only those not "
            "named here.")
