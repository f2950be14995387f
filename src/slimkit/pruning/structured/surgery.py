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
from slimkit.models.layouts import as_linears
from slimkit.pruning.structured.experts import cut_experts


@dataclass(frozen=True)
class StructuredPlan:
    """What to keep, as sorted index tensors per original layer (None: keep all)."""

    keep_heads: tuple[torch.Tensor, ...] | None = None  # query heads kept, per layer
    keep_kv_heads: tuple[torch.Tensor, ...] | None = None  # KV heads kept, per layer
    keep_mlp: tuple[torch.Tensor, ...] | None = None  # intermediate channels kept, per layer
    keep_hidden: torch.Tensor | None = None  # residual channels kept (all layers)
    drop_layers: tuple[int, ...] = ()
    keep_experts: tuple[torch.Tensor, ...] | None = None  # MoE experts kept, per layer
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


@dataclass
class _Surgery:
    """One model's state dict being cut down, its config being updated, and where things are."""

    slicer: _Slicer
    cfg: object
    adapter: ArchitectureAdapter
    base: str  # the base model's prefix in the state dict ("model." or "")
    blocks: str  # the block list's prefix
    n_layers: int
    head_dim: int

    def block(self, i: int) -> str:
        return f"{self.blocks}.{i}."


def _cut_heads(op: _Surgery, plan: StructuredPlan) -> None:
    a, s, d = op.adapter, op.slicer, op.head_dim
    n_heads = _uniform(plan.keep_heads, "attention heads")
    n_kv = _uniform(plan.keep_kv_heads, "KV heads")
    if (n_heads is None) != (n_kv is None):
        raise ShapeError("keep_heads and keep_kv_heads go together")
    if n_heads is None:
        return
    if n_heads % n_kv:
        raise ShapeError(f"{n_heads} query heads cannot be shared evenly by {n_kv} KV heads")
    for i in range(op.n_layers):
        p = op.block(i)
        s.linear_out(p + a.q_proj, head_units(plan.keep_heads[i], d))
        s.linear_out(p + a.k_proj, head_units(plan.keep_kv_heads[i], d))
        s.linear_out(p + a.v_proj, head_units(plan.keep_kv_heads[i], d))
        s.linear_in(p + a.o_proj, head_units(plan.keep_heads[i], d))
    setattr(op.cfg, a.heads_attr, n_heads)
    if a.kv_heads_attr:
        setattr(op.cfg, a.kv_heads_attr, n_kv)
    elif n_kv != n_heads:
        raise ShapeError(f"{a.name} has no KV groups: keep as many KV heads as query heads")
    if a.head_dim_is_free(op.cfg):
        op.cfg.head_dim = d


def _cut_mlp(op: _Surgery, plan: StructuredPlan) -> None:
    n_mlp = _uniform(plan.keep_mlp, "MLP channels")
    if n_mlp is None:
        return
    for i in range(op.n_layers):
        for name in op.adapter.mlp_inputs:
            op.slicer.linear_out(op.block(i) + name, plan.keep_mlp[i])
        op.slicer.linear_in(op.block(i) + op.adapter.mlp_output, plan.keep_mlp[i])
    op.cfg.intermediate_size = n_mlp


def _cut_hidden(op: _Surgery, h: torch.Tensor | None) -> None:
    """The residual width: every reader and writer of the hidden state, its norms and embeddings."""
    a, s, base = op.adapter, op.slicer, op.base
    if h is not None:
        for i in range(op.n_layers):
            p = op.block(i)
            for name in (a.q_proj, a.k_proj, a.v_proj, *a.mlp_inputs):
                s.linear_in(p + name, h)
            for name in (a.o_proj, a.mlp_output):
                s.linear_out(p + name, h)
            for name in a.block_norms:
                s.vector(p + name, h)
        for path in a.embeddings:
            s.take(f"{base}{path}.weight", 1, h)
        for path in ([a.final_norm] if a.final_norm else []) + list(a.hidden_norms):
            s.vector(base + path, h)
        for path in a.hidden_square_linears:
            s.linear_out(base + path, h)
            s.linear_in(base + path, h)
        if a.lm_head:
            s.linear_in(a.lm_head, h)
        op.cfg.hidden_size = len(h)
    heads_now = getattr(op.cfg, a.heads_attr)
    if not a.head_dim_is_free(op.cfg) and op.cfg.hidden_size != heads_now * op.head_dim:
        raise ShapeError(
            f"{a.name} derives the head size from hidden_size / {a.heads_attr}: keeping "
            f"{heads_now} heads of {op.head_dim} needs hidden_size {heads_now * op.head_dim}, not {op.cfg.hidden_size}"
        )


def _drop_layers(op: _Surgery, drop_layers) -> None:
    if not drop_layers:
        return
    drop = sorted(set(drop_layers))
    if drop[0] < 0 or drop[-1] >= op.n_layers or len(drop) >= op.n_layers:
        raise ShapeError(f"cannot drop layers {drop} of a {op.n_layers}-layer model")
    kept = [i for i in range(op.n_layers) if i not in drop]
    renumber = {old: new for new, old in enumerate(kept)}
    sd = {}
    for key, t in op.slicer.sd.items():
        if key.startswith(op.blocks + "."):
            idx, rest = key[len(op.blocks) + 1 :].split(".", 1)
            if int(idx) not in renumber:
                continue
            key = f"{op.blocks}.{renumber[int(idx)]}.{rest}"
        sd[key] = t
    op.slicer.sd = sd
    op.cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(op.cfg, "layer_types", None), list):
        op.cfg.layer_types = [op.cfg.layer_types[i] for i in kept]


def _rebuild(model: nn.Module, op: _Surgery) -> nn.Module:
    """The same transformers class built from the updated config, holding the cut tensors."""
    cfg = op.cfg
    try:  # the config class validates itself on construction (e.g. LLaMA: hidden % heads == 0)
        cfg = type(cfg).from_dict(cfg.to_dict())
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds
        cause = getattr(exc, "__cause__", None) or exc
        raise ShapeError(f"transformers rejects the pruned shape: {cause}. Choose head/hidden targets "
                         f"that {type(cfg).__name__} accepts") from None
    dtype = next(model.parameters()).dtype
    new = type(model)(cfg).to(dtype)
    as_linears(new)  # the state dict holds one linear per expert projection, no Conv1D
    missing, unexpected = new.load_state_dict(op.slicer.sd, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ShapeError(f"structured surgery left the state dict inconsistent: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def apply_plan(model: nn.Module, adapter: ArchitectureAdapter, plan: StructuredPlan) -> nn.Module:
    """Return a new, smaller model of the same class; `model` is left unchanged."""
    names = {id(m): n for n, m in model.named_modules()}
    base = names[id(model.base_model)]
    base = base + "." if base else ""
    op = _Surgery(_Slicer({key: t.detach().clone() for key, t in model.state_dict().items()}),
                  copy.deepcopy(model.config), adapter, base, f"{base}{adapter.blocks}",
                  len(adapter.get_blocks(model)), adapter.heads(model).head_dim)
    _cut_heads(op, plan)
    _cut_mlp(op, plan)
    _cut_hidden(op, plan.keep_hidden)
    if plan.keep_experts is not None:  # before blocks are renumbered
        cut_experts(op.slicer.sd, op.blocks, adapter, plan.keep_experts, op.cfg)
    _drop_layers(op, plan.drop_layers)
    return _rebuild(model, op)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
