"""MoE experts as one `nn.Linear` per projection per expert, and back.

Since transformers 5, a sparse MoE block keeps its experts as two 3-D parameters
(`gate_up_proj` [experts, 2 x inner, hidden] and `down_proj` [experts, hidden, inner]) and loops over
the experts the router picked. Everything in slimkit that compresses, packs or exports works on
linears, so at load the experts module is swapped for `ExpertLinears`: the same loop over
`gate_proj`, `up_proj` and `down_proj` linears of each expert. Each expert's linears then see only
the tokens routed to it, so the calibration engine's hooks gather per-expert statistics with no
extra code. The swap is checked on a few random tokens against the original module, and
`fused_experts` swaps the 3-D parameters back for a Hugging Face save.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from slimkit.errors import UnsupportedArchitectureError

STACKED = ("gate_up_proj", "down_proj")  # the 3-D parameters transformers' experts modules hold
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # each ExpertMLP's linears


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down
        self.__dict__["act_fn"] = act_fn  # shared by every expert, not a submodule of each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertLinears(nn.ModuleList):
    """A transformers experts module (3-D parameters) as a list of `ExpertMLP`s with its forward:
    (hidden [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, hidden]."""

    def __init__(self, experts: list[ExpertMLP], fused: nn.Module):
        super().__init__(experts)
        self.__dict__["fused"] = fused  # the original module, emptied: its class and act_fn for `fused_experts`

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            position, token = torch.where((top_k_index == e).T)  # the order transformers' loop uses
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, position, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def is_stacked_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D gate_up_proj and down_proj parameters."""
    params = dict(module.named_parameters(recurse=False))
    return all(k in params and params[k].dim() == 3 for k in STACKED)


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return linear


def split_experts(module: nn.Module) -> ExpertLinears:
    """`module`'s experts as linears; an experts module with anything else is refused by name."""
    params = dict(module.named_parameters(recurse=False))
    other = sorted(set(params) - set(STACKED))
    if other or getattr(module, "is_transposed", False) or not hasattr(module, "act_fn"):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__}: experts with {other or 'a transposed layout or no act_fn'} besides "
            "gate_up_proj and down_proj are not supported; slimkit knows the gate/up/down SwiGLU experts only")
    gate_up, down = params["gate_up_proj"].detach(), params["down_proj"].detach()
    inner = gate_up.shape[1] // 2
    experts = [ExpertMLP(_linear(gate_up[e, :inner]), _linear(gate_up[e, inner:]), _linear(down[e]), module.act_fn)
               for e in range(gate_up.shape[0])]
    _empty(module)
    return ExpertLinears(experts, module)


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> int:
    """Swap every stacked experts module of `model` for `ExpertLinears`; the number swapped.
    The first swap is checked against the original on random tokens (not on `meta`)."""
    names = [n for n, m in model.named_modules() if is_stacked_experts(m)]
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        check = i == 0 and module.gate_up_proj.device.type != "meta"
        sample = _routing_sample(module) if check else None
        reference = module(*sample) if check else None
        swapped = split_experts(module)
        if check:
            _check_same(type(module).__name__, reference, swapped(*sample))
        model.set_submodule(name, swapped)
    return len(names)


@torch.no_grad()
def _routing_sample(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    experts, _, hidden = module.gate_up_proj.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * experts, hidden, generator=g).to(module.gate_up_proj)
    index = torch.stack([torch.arange(3 * experts) % experts, (torch.arange(3 * experts) + 1) % experts], dim=1)
    weights = torch.rand(3 * experts, 2, generator=g).to(x)
    return x, index.to(x.device), weights


def _check_same(name: str, reference: torch.Tensor, swapped: torch.Tensor) -> None:
    scale = reference.abs().max().clamp_min(1e-6)
    if not torch.allclose(reference, swapped, rtol=1e-3, atol=1e-4 * float(scale)):
        raise UnsupportedArchitectureError(
            f"{name}: its experts do not compute down(act(gate(x)) * up(x)) weighted by the router, so slimkit "
            f"cannot split them into linears (max difference {float((reference - swapped).abs().max()):.3g})")


def expert_modules(model: nn.Module) -> dict[str, ExpertLinears]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertLinears)}


@contextmanager
def fused_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model`'s experts are transformers' own modules again (3-D parameters
    stacked from the linears), so that `save_pretrained` writes the checkpoint layout transformers reads."""
    swapped = expert_modules(model)
    for name, module in swapped.items():
        model.set_submodule(name, _stacked(name, module))
    try:
        yield model
    finally:
        for name, module in swapped.items():
            model.set_submodule(name, module)
            _empty(module.fused)


def _empty(fused: nn.Module) -> None:
    for name in STACKED:  # the original keeps no copy of the weights
        setattr(fused, name, nn.Parameter(torch.empty(0, device=getattr(fused, name).device), requires_grad=False))


def _stacked(name: str, module: ExpertLinears) -> nn.Module:
    fused = module.fused
    try:
        gate_up = [torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in module]
        down = [e.down_proj.weight for e in module]
    except AttributeError:
        raise UnsupportedArchitectureError(f"{name}: packed experts cannot be saved as a Hugging Face checkpoint; "
                                           "export the packed model with `slimkit export`") from None
    fused.gate_up_proj = nn.Parameter(torch.stack(gate_up).detach(), requires_grad=False)
    fused.down_proj = nn.Parameter(torch.stack(down).detach(), requires_grad=False)
    return fused


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """slimkit's key of every tensor (experts as linears: `...experts.3.up_proj.weight`) -> the key a
    checkpoint of this model type uses (Mixtral: `...block_sparse_moe.experts.3.w3.weight`), found by
    running transformers' own save-time conversion on marker tensors: no name list per model."""
    from transformers.core_model_loading import revert_weight_conversion

    markers: dict[str, torch.Tensor] = {}  # the fused layout's keys, each holding numbered markers
    ours: list[str] = []  # marker number -> slimkit key
    swapped = expert_modules(model)
    for key in model.state_dict(keep_vars=True):
        if not any(key.startswith(p + ".") for p in swapped):
            markers[key] = torch.tensor([float(len(ours))], dtype=torch.float64)
            ours.append(key)
    for path, experts in swapped.items():
        gate_up, down = [], []
        for e in range(len(experts)):
            gate_up.append([len(ours), len(ours) + 1])
            down.append([len(ours) + 2])
            ours += [f"{path}.{e}.{p}.weight" for p in EXPERT_PROJECTIONS]
        markers[f"{path}.gate_up_proj"] = torch.tensor(gate_up, dtype=torch.float64).unsqueeze(-1)
        markers[f"{path}.down_proj"] = torch.tensor(down, dtype=torch.float64).unsqueeze(-1)
    reverted = revert_weight_conversion(model, markers)
    names = {ours[int(t.flatten()[0])]: key for key, t in reverted.items()}
    if len(names) != len(ours):
        raise UnsupportedArchitectureError(f"{type(model).__name__}: transformers' checkpoint conversion did not "
                                           "map every tensor one to one, so slimkit cannot name them in an export")
    return names
