"""Cut heads, MLP channels, hidden channels and whole blocks out of a model.

The result is a *standard* transformers model of the same class, built from an updated config
(`num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`, `hidden_size`,
`num_hidden_layers`) and loaded with the sliced tensors, so `save_pretrained` output reloads with
plain `from_pretrained` and no slimkit code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.errors import ShapeError
from slimkit.models.adapters import ArchitectureAdapter


@dataclass(frozen=True)
class StructuredPlan:
    """What to keep, as sorted index tensors per original layer (None: keep all)."""

    keep_heads: tuple[torch.Tensor, ...] | None = None  # query heads kept, per layer
    keep_kv_heads: tuple[torch.Tensor, ...] | None = None  # KV heads kept, per layer
    keep_mlp: tuple[torch.Tensor, ...] | None = None  # intermediate channels kept, per layer
    keep_hidden: torch.Tensor | None = None  # residual channels kept (all layers)
    drop_layers: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def head_units(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole units (heads) of `size` rows each."""
    return (idx[:, None] * size + torch.arange(size)).flatten()


class _Slicer:
    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd

    def take(self, key: str, dim: int, idx: torch.Tensor) -> None:
        if key in self.sd:
            self.sd[key] = self.sd[key].index_select(dim, idx).contiguous()

    def linear_out(self, prefix: str, idx: torch.Tensor) -> None:  # rows + bias
        self.take(prefix + ".weight", 0, idx)
        self.take(prefix + ".bias", 0, idx)

    def linear_in(self, prefix: str, idx: torch.Tensor) -> None:  # columns
        self.take(prefix + ".weight", 1, idx)

    def vector(self, prefix: str, idx: torch.Tensor) -> None:  # norms: weight and bias
        self.take(prefix + ".weight", 0, idx)
        self.take(prefix + ".bias", 0, idx)


def _uniform(per_layer: tuple[torch.Tensor, ...] | None, what: str) -> int | None:
    if per_layer is None:
        return None
    sizes = {len(t) for t in per_layer}
    if len(sizes) != 1 or 0 in sizes:
        raise ShapeError(f"every layer must keep the same non-zero number of {what}; got {sorted(sizes)}")
    return sizes.pop()


def apply_plan(model: nn.Module, adapter: ArchitectureAdapter, plan: StructuredPlan) -> nn.Module:
    """Return a new, smaller model of the same class; `model` is left unchanged."""
    cfg = copy.deepcopy(model.config)
    layout = adapter.heads(model)
    d = layout.head_dim
    names = {id(m): n for n, m in model.named_modules()}
    base = names[id(model.base_model)]
    base = base + "." if base else ""
    blocks = f"{base}{adapter.blocks}"
    n_layers = len(adapter.get_blocks(model))
    q, k, v, o = adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj
    mlp_in, down = adapter.mlp_inputs, adapter.mlp_output
    s = _Slicer({key: t.detach().clone() for key, t in model.state_dict().items()})

    n_heads = _uniform(plan.keep_heads, "attention heads")
    n_kv = _uniform(plan.keep_kv_heads, "KV heads")
    if (n_heads is None) != (n_kv is None):
        raise ShapeError("keep_heads and keep_kv_heads go together")
    if n_heads is not None:
        if n_heads % n_kv:
            raise ShapeError(f"{n_heads} query heads cannot be shared evenly by {n_kv} KV heads")
        for i in range(n_layers):
            p = f"{blocks}.{i}."
            s.linear_out(p + q, head_units(plan.keep_heads[i], d))
            s.linear_out(p + k, head_units(plan.keep_kv_heads[i], d))
            s.linear_out(p + v, head_units(plan.keep_kv_heads[i], d))
            s.linear_in(p + o, head_units(plan.keep_heads[i], d))
        setattr(cfg, adapter.heads_attr, n_heads)
        if adapter.kv_heads_attr:
            setattr(cfg, adapter.kv_heads_attr, n_kv)
        elif n_kv != n_heads:
            raise ShapeError(f"{adapter.name} has no KV groups: keep as many KV heads as query heads")
        if adapter.free_head_dim:
            cfg.head_dim = d

    n_mlp = _uniform(plan.keep_mlp, "MLP channels")
    if n_mlp is not None:
        for i in range(n_layers):
            p = f"{blocks}.{i}."
            for name in mlp_in:
                s.linear_out(p + name, plan.keep_mlp[i])
            s.linear_in(p + down, plan.keep_mlp[i])
        cfg.intermediate_size = n_mlp

    if plan.keep_hidden is not None:
        h = plan.keep_hidden
        for i in range(n_layers):
            p = f"{blocks}.{i}."
            for name in (q, k, v, *mlp_in):
                s.linear_in(p + name, h)
            for name in (o, down):
                s.linear_out(p + name, h)
            for name in adapter.block_norms:
                s.vector(p + name, h)
        for path in adapter.embeddings:
            s.take(f"{base}{path}.weight", 1, h)
        for path in ([adapter.final_norm] if adapter.final_norm else []) + list(adapter.hidden_norms):
            s.vector(base + path, h)
        for path in adapter.hidden_square_linears:
            s.linear_out(base + path, h)
            s.linear_in(base + path, h)
        if adapter.lm_head:
            s.linear_in(adapter.lm_head, h)
        cfg.hidden_size = len(h)

    heads_now = getattr(cfg, adapter.heads_attr)
    if not adapter.free_head_dim and cfg.hidden_size != heads_now * d:
        raise ShapeError(
            f"{adapter.name} derives the head size from hidden_size / {adapter.heads_attr}: keeping "
            f"{heads_now} heads of {d} needs hidden_size {heads_now * d}, not {cfg.hidden_size}"
        )

    if plan.drop_layers:
        drop = sorted(set(plan.drop_layers))
        if drop[0] < 0 or drop[-1] >= n_layers or len(drop) >= n_layers:
            raise ShapeError(f"cannot drop layers {drop} of a {n_layers}-layer model")
        kept = [i for i in range(n_layers) if i not in drop]
        renumber = {old: new for new, old in enumerate(kept)}
        sd = {}
        for key, t in s.sd.items():
            if key.startswith(blocks + "."):
                idx, rest = key[len(blocks) + 1 :].split(".", 1)
                if int(idx) not in renumber:
                    continue
                key = f"{blocks}.{renumber[int(idx)]}.{rest}"
            sd[key] = t
        s.sd = sd
        cfg.num_hidden_layers = len(kept)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = [cfg.layer_types[i] for i in kept]

    try:  # the config class validates itself on construction (e.g. LLaMA: hidden % heads == 0)
        cfg = type(cfg).from_dict(cfg.to_dict())
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds
        cause = getattr(exc, "__cause__", None) or exc
        raise ShapeError(f"transformers rejects the pruned shape: {cause}. Choose head/hidden targets "
                         f"that {type(cfg).__name__} accepts") from None
    dtype = next(model.parameters()).dtype
    new = type(model)(cfg).to(dtype)
    missing, unexpected = new.load_state_dict(s.sd, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ShapeError(f"structured surgery left the state dict inconsistent: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
