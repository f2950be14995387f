"""Rotate a model's residual stream and attention values in place (`rotation.py`'s functions,
applied through the adapter's roles), and check that the function did not change.

Works on pre-norm transformers whose norms are RMSNorm (LLaMA, Mistral, Qwen2/3, Phi-3, Mixtral,
Qwen-MoE, ...). A norm that is not RMSNorm (LayerNorm subtracts the mean; Gemma scales by 1 + w),
or a norm after a projection, is refused: the rotation would change the function.
A tied head cannot stay tied under a residual rotation: the final norm's weight must be folded into
the head but not into the embedding, so the two matrices differ afterwards (SmolLM2-135M: +28.3M
parameters, a second vocabulary matrix in every file). So on a tied model the residual stream is
rotated only when asked to untie (`untie=True`); by default only the values are, and the tie stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.errors import UnsupportedArchitectureError
from slimkit.models.adapters import ArchitectureAdapter, submodule_at
from slimkit.models.experts import EXPERT_PROJECTIONS
from slimkit.models.snapshot import model_configs
from slimkit.quantization.rotation import (
    fold_into_inputs,
    randomized_hadamard,
    rotate_head_inputs,
    rotate_head_outputs,
    rotate_inputs,
    rotate_outputs,
)


@dataclass
class RotationReport:
    hidden: int
    head_dim: int | None  # None: values not rotated (fused qkv, or heads: false)
    untied_head: bool = False
    stream_rotated: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class StreamRoles:
    """One block's modules by what they do to the residual stream."""

    norms: list[nn.Module]  # the norm before attention, the norm before the MLP
    readers: list[list[nn.Module]]  # the linears reading each norm's output (MoE routers included)
    writers: list[nn.Module]  # the linears whose output is added to the stream


def block_roles(block: nn.Module, adapter: ArchitectureAdapter) -> StreamRoles:
    """The norms, readers and writers of one pre-norm block, from the adapter's roles; a block
    whose attention does not read its first norm (post-norm, parallel or extra norms) is refused."""
    attention_inputs = tuple(dict.fromkeys((adapter.q_proj, adapter.k_proj, adapter.v_proj)))
    producers = {g.producer for g in adapter.groups if set(g.projections) & set(attention_inputs)}
    if len(adapter.block_norms) != 2 or producers != {adapter.block_norms[0]}:
        raise UnsupportedArchitectureError(
            f"{adapter.name}: the rotation needs pre-norm blocks (one norm read by q/k/v, one before the MLP); "
            f"this model's block norms are {list(adapter.block_norms)} and its attention reads "
            f"{sorted(map(str, producers))}")
    down = "." + EXPERT_PROJECTIONS[-1]
    mlp_readers = [*adapter.mlp_inputs, *(p for p in adapter.experts if not p.endswith(down)), *adapter.routers]
    writers = [adapter.o_proj, *([adapter.mlp_output] if adapter.mlp_output else []),
               *(p for p in adapter.experts if p.endswith(down))]

    def at(paths):
        return [submodule_at(block, p) for p in paths]

    return StreamRoles(at(adapter.block_norms), [at(attention_inputs), at(mlp_readers)], at(writers))


def check_rms_norm(norm: nn.Module, name: str) -> None:
    """Refuse a norm that, with unit weight, does not compute x / rms(x) (so does not commute with Q)."""
    weight = getattr(norm, "weight", None)
    if weight is None or getattr(norm, "bias", None) is not None:
        raise UnsupportedArchitectureError(
            f"the rotation needs RMSNorm with a weight and no bias; {name} ({type(norm).__name__}) is not one")
    saved = weight.data.clone()
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    weight.data.fill_(1.0)
    try:
        y = norm(x)
    finally:
        weight.data.copy_(saved)
    expected = x / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt().to(x.dtype)
    if not torch.allclose(y.float(), expected.float(), rtol=1e-2, atol=1e-3):
        raise UnsupportedArchitectureError(
            f"{name} ({type(norm).__name__}) does not compute x / rms(x) * w (LayerNorm subtracts the mean, "
            "Gemma's norm scales by 1 + w): the residual rotation needs RMSNorm and is not applied")


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    return list({id(m): m for m in modules}.values())


def fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Move the norm's weight into the linears reading it; the norm keeps a unit weight."""
    scale = norm.weight.detach().double()
    for linear in _unique(readers):
        _set(linear.weight, fold_into_inputs(linear.weight.double(), scale.to(linear.weight.device)))
    norm.weight.data.fill_(1.0)


def is_tied(head: nn.Linear, embeddings: dict[str, nn.Embedding]) -> bool:
    return any(head.weight is e.weight or head.weight.data_ptr() == e.weight.data_ptr() for e in embeddings.values())


def untie_head(model: nn.Module, head: nn.Linear, embeddings: dict[str, nn.Embedding]) -> bool:
    """Give the head its own copy of a tied embedding matrix; whether it was tied."""
    if not is_tied(head, embeddings):
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in model_configs(model):
        config.tie_word_embeddings = False
    return True


def rotate_stream(roles: list[StreamRoles], embeddings: list[nn.Embedding], head: nn.Linear, q: torch.Tensor) -> None:
    """x -> x Q everywhere on the residual stream: embeddings E Q, readers W Q, writers Q^T W."""
    def on(weight):
        return q.to(weight.device)

    for embedding in embeddings:
        _set(embedding.weight, rotate_inputs(embedding.weight.double(), on(embedding.weight)))
    for r in roles:
        for linear in _unique([m for readers in r.readers for m in readers]):
            _set(linear.weight, rotate_inputs(linear.weight.double(), on(linear.weight)))
        for linear in _unique(r.writers):
            _set(linear.weight, rotate_outputs(linear.weight.double(), on(linear.weight)))
            if linear.bias is not None:
                _set(linear.bias, rotate_outputs(linear.bias.double().unsqueeze(1), on(linear.bias)).squeeze(1))
    _set(head.weight, rotate_inputs(head.weight.double(), on(head.weight)))


def rotate_values(blocks: nn.ModuleList, adapter: ArchitectureAdapter, h: torch.Tensor) -> None:
    """Each head's values by H: v_proj's rows (and bias) of every kv head, o_proj's columns of every head."""
    for i, block in enumerate(blocks):
        roles = adapter.for_block(i)
        v, o = submodule_at(block, roles.v_proj), submodule_at(block, roles.o_proj)
        hv = h.to(v.weight.device)
        _set(v.weight, rotate_head_outputs(v.weight.double(), hv))
        if v.bias is not None:
            _set(v.bias, rotate_head_outputs(v.bias.double().unsqueeze(1), hv).squeeze(1))
        _set(o.weight, rotate_head_inputs(o.weight.double(), h.to(o.weight.device)))


def _rotate_residual_stream(model, adapter, roles, ends: tuple[nn.Module, nn.Linear], seed: int, untie: bool,
                            report: RotationReport) -> None:
    """Fold every norm and rotate the residual stream, unless that would untie a tied head unasked;
    `ends`: the final norm and the head."""
    final_norm, head = ends
    embeddings = adapter.embedding_modules(model)
    if is_tied(head, embeddings) and not untie:
        report.stream_rotated = False
        report.notes.append("residual stream not rotated: the head is tied to the embedding, and the final norm "
                            "folded into the head would make them two matrices (a second vocabulary matrix in "
                            "the file); `tied: untie` rotates it anyway")
        return
    report.untied_head = untie_head(model, head, embeddings)
    for r in roles:
        for norm, readers in zip(r.norms, r.readers):
            fold_norm(norm, readers)
    fold_norm(final_norm, [head])
    rotate_stream(roles, list(embeddings.values()), head, randomized_hadamard(report.hidden, seed))


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: ArchitectureAdapter, seed: int = 0, heads: bool = True,
                 untie: bool = False) -> RotationReport:
    """Fold every norm into its readers and rotate the residual stream and each head's values in place
    (a tied head: the values only, unless `untie`). Everything is checked before any weight changes."""
    blocks = adapter.get_blocks(model)
    problem = adapter.restructure_problem(model)
    if problem:
        raise UnsupportedArchitectureError(f"{adapter.name}: the rotation cannot run: {problem}; use a recipe "
                                           "without it")
    roles = [block_roles(block, adapter.for_block(i)) for i, block in enumerate(blocks)]
    final_norm = submodule_at(model.base_model, adapter.final_norm) if adapter.final_norm else None
    head = submodule_at(model, adapter.lm_head) if adapter.lm_head else None
    if final_norm is None or not isinstance(head, nn.Linear):
        raise UnsupportedArchitectureError(f"{adapter.name}: the rotation needs a final norm and an output head "
                                           "(a causal LM)")
    for i, r in enumerate(roles):
        for path, norm in zip(adapter.block_norms, r.norms):
            check_rms_norm(norm, f"{adapter.blocks}.{i}.{path}")
    check_rms_norm(final_norm, adapter.final_norm)
    report = RotationReport(model.config.hidden_size, None)
    _rotate_residual_stream(model, adapter, roles, (final_norm, head), seed, untie, report)
    fused = len({adapter.q_proj, adapter.k_proj, adapter.v_proj}) < 3
    if heads and fused:
        report.notes.append(f"values not rotated: {adapter.v_proj} is a fused projection")
    elif heads:
        report.head_dim = adapter.heads(model).head_dim
        rotate_values(blocks, adapter, randomized_hadamard(report.head_dim, seed + 1))
    return report
