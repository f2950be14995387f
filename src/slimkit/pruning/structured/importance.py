"""Importance of heads, MLP channels, hidden channels and whole blocks, from calibration data.

Scores are plain tensors, one entry per prunable unit; higher means keep. Four ways to get them:
- `activation` (Minitron): the size of each unit's activation, mean over the sequence and L2 over
  the batch: a head's output before the output projection, an MLP channel's input to the down
  projection, a hidden channel's value after every norm;
- `magnitude`: the squared weights that belong to a unit;
- `taylor`: first-order Taylor, |gradient x weight| summed over the unit's weights (needs a loss:
  causal LMs only);
- Block Influence for whole blocks: 1 - cos(block input, block output), mean over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.models.adapters import ArchitectureAdapter, submodule_at

METHODS = ("activation", "magnitude", "taylor")


@dataclass
class Importance:
    """Per-unit scores. heads: [layers, query heads]; mlp: [layers, intermediate]; hidden: [hidden]."""

    method: str
    heads: torch.Tensor
    mlp: torch.Tensor
    hidden: torch.Tensor

    def kv_groups(self, num_kv_heads: int) -> torch.Tensor:
        """A KV group's score: the sum of its query heads' scores ([layers, kv heads])."""
        layers, heads = self.heads.shape
        return self.heads.view(layers, num_kv_heads, heads // num_kv_heads).sum(-1)


def _batches_mask(batch: dict) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.to(torch.float32)


class _SeqL2:
    """Accumulates per-unit scores: mean over valid tokens of |x|, then L2 over the batch."""

    def __init__(self) -> None:
        self.sumsq: torch.Tensor | None = None

    def add(self, per_token: torch.Tensor, mask: torch.Tensor | None) -> None:
        # per_token: [batch, seq, units] of non-negative values
        if mask is None:
            per_seq = per_token.mean(1)
        else:
            per_seq = (per_token * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        sq = per_seq.double().pow(2).sum(0)
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq

    def result(self) -> torch.Tensor:
        return self.sumsq.sqrt().float()


@torch.no_grad()
def activation_importance(model: nn.Module, adapter: ArchitectureAdapter, batches: Iterable[dict]) -> Importance:
    """Minitron's activation-based scores from a pass over `batches` (dicts of model inputs)."""
    layout = adapter.heads(model)
    blocks = adapter.get_blocks(model)
    o_name, down_name = adapter.o_proj, adapter.mlp_output
    heads = [_SeqL2() for _ in blocks]
    mlp = [_SeqL2() for _ in blocks]
    hidden = _SeqL2()
    state: dict = {}
    hooks = []

    def head_hook(i):
        def hook(_m, args):
            x = args[0]
            per_head = x.view(*x.shape[:-1], layout.num_heads, -1).norm(dim=-1)
            heads[i].add(per_head, state["mask"])
        return hook

    def mlp_hook(i):
        def hook(_m, args):
            mlp[i].add(args[0].abs(), state["mask"])
        return hook

    def norm_hook(_m, _args, out):
        hidden.add(out.abs(), state["mask"])

    for i, block in enumerate(blocks):
        hooks.append(adapter.block_module(block, o_name).register_forward_pre_hook(head_hook(i)))
        if down_name:  # an MoE block without a dense MLP has no channels to score
            hooks.append(adapter.block_module(block, down_name).register_forward_pre_hook(mlp_hook(i)))
        for norm in adapter.block_norms:
            hooks.append(adapter.block_module(block, norm).register_forward_hook(norm_hook))
    for path in ([adapter.final_norm] if adapter.final_norm else []) + list(adapter.hidden_norms):
        hooks.append(submodule_at(model.base_model, path).register_forward_hook(norm_hook))
    try:
        for batch in batches:
            state["mask"] = _batches_mask(batch)
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if hidden.sumsq is None:
        raise SlimkitError("importance needs at least one calibration batch")
    mlp_scores = torch.stack([m.result() for m in mlp]) if down_name else torch.zeros(len(blocks), 0)
    return Importance("activation", torch.stack([h.result() for h in heads]), mlp_scores, hidden.result())


def _weight_importance(model: nn.Module, adapter: ArchitectureAdapter, method: str,
                       score: Callable[[nn.Parameter], torch.Tensor]) -> Importance:
    """Sum an element-wise score over the weights each head, channel and hidden unit owns."""
    layout = adapter.heads(model)
    group = layout.num_heads // layout.num_kv_heads
    q, k, v, o = adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj
    mlp_in, down = adapter.mlp_inputs, adapter.mlp_output
    d = layout.head_dim
    heads, mlp = [], []
    hidden = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for block in adapter.get_blocks(model):
        lin = adapter.block_linears(block)
        s = {name: score(mod.weight).double() for name, mod in lin.items()}
        h = s[q].sum(1).view(layout.num_heads, d).sum(1) + s[o].sum(0).view(layout.num_heads, d).sum(1)
        kv = (s[k].sum(1) + s[v].sum(1)).view(layout.num_kv_heads, d).sum(1)
        heads.append(h + (kv / group).repeat_interleave(group))
        if down:
            mlp.append(sum(s[n].sum(1) for n in mlp_in) + s[down].sum(0))
            hidden += sum(s[n].sum(0) for n in (q, k, v, *mlp_in)) + s[o].sum(1) + s[down].sum(1)
        else:  # an MoE block without a dense MLP has no channels to score
            hidden += sum(s[n].sum(0) for n in (q, k, v)) + s[o].sum(1)
    for emb in adapter.embedding_modules(model).values():
        hidden += score(emb.weight).double().sum(0)
    mlp_scores = torch.stack(mlp).float() if mlp else torch.zeros(len(heads), 0)
    return Importance(method, torch.stack(heads).float(), mlp_scores, hidden.float())


def magnitude_importance(model: nn.Module, adapter: ArchitectureAdapter) -> Importance:
    return _weight_importance(model, adapter, "magnitude", lambda w: w.detach().pow(2))


def taylor_importance(model: nn.Module, adapter: ArchitectureAdapter, batches: Iterable[dict]) -> Importance:
    """|grad x weight| with the gradient of the next-token loss summed over `batches`."""
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise SlimkitError("taylor importance needs a training loss; it supports causal LMs only "
                           "(use importance: activation or magnitude for encoders)")
    was_training = model.training
    model.eval()
    grads = {}
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        n = 0
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(**batch, labels=batch["input_ids"])
            out.loss.backward()
            for p in params:
                if p.grad is not None:
                    grads[p] = grads.get(p, 0) + p.grad.detach()
            n += 1
        if not n:
            raise SlimkitError("importance needs at least one calibration batch")
        result = _weight_importance(model, adapter, "taylor",
                                    lambda w: (grads[w] / n * w.detach()).abs() if w in grads else torch.zeros_like(w))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return result


def compute_importance(model: nn.Module, adapter: ArchitectureAdapter, method: str,
                       batches: Callable[[], Iterable[dict]]) -> Importance:
    if method == "activation":
        return activation_importance(model, adapter, batches())
    if method == "magnitude":
        return magnitude_importance(model, adapter)
    if method == "taylor":
        return taylor_importance(model, adapter, batches())
    raise SlimkitError(f"unknown importance '{method}'; known: {', '.join(METHODS)}")


@torch.no_grad()
def block_influence(model: nn.Module, adapter: ArchitectureAdapter, batches: Iterable[dict]) -> torch.Tensor:
    """Block Influence per block: 1 - cos(input, output) of its hidden states, mean over tokens.

    Low influence = the block barely changes the residual stream = the cheapest one to drop.
    """
    blocks = adapter.get_blocks(model)
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    state: dict = {"tokens": 0.0}
    hooks = []

    def hook(i):
        def fn(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [batch, seq]
            mask = state["mask"]
            totals[i] += float(((1 - cos) * mask).sum()) if mask is not None else float((1 - cos).sum())
        return fn

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(hook(i), with_kwargs=True))
    try:
        for batch in batches:
            mask = _batches_mask(batch)
            state["mask"] = mask
            state["tokens"] += float(mask.sum()) if mask is not None else batch["input_ids"].numel()
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if not state["tokens"]:
        raise SlimkitError("block influence needs at least one calibration batch")
    return (totals / state["tokens"]).float()
