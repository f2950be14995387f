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
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from slimkit.errors import UnsupportedArchitectureError

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # each ExpertMLP's linears, in the common layout
FIRST = ("gate_up_proj", "up_proj")  # the first 3-D parameter: gated experts, or experts with no gate


@dataclass(frozen=True)
class ExpertsLayout:
    """How a transformers experts module stores its weights (the flags of `use_experts_implementation`):
    `first` (gate_up_proj or up_proj) and down_proj, each [experts, out, in], or [experts, in, out]
    when transposed, with or without biases (`<name>_bias`); a gated module's gate and up halves are
    concatenated ([gate; up]) or interleaved (gate0, up0, gate1, ...), and combined by its
    `_apply_gate`; `split`: the common case, cut into gate_proj and up_proj linears."""

    first: str
    transposed: bool
    bias: bool
    split: bool
    post_norm: bool
    pre_routed: bool = False  # forward(routed): every expert's rows already routed and scaled (Llama 4)

    @property
    def stacked(self) -> tuple[str, ...]:
        return (self.first, "down_proj") + ((f"{self.first}_bias", "down_proj_bias") if self.bias else ())

    def first_linears(self) -> tuple[str, ...]:
        return ("gate_proj", "up_proj") if self.split else (self.first,)


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers experts module (3-D parameters), or None for any other module."""
    params = dict(module.named_parameters(recurse=False))
    first = next((k for k in FIRST if k in params and params[k].dim() == 3), None)
    if first is None or "down_proj" not in params or params["down_proj"].dim() != 3:
        return None
    gate_fn = getattr(type(module), "_apply_gate", None)  # transformers installs its default ([gate; up], act_fn)
    custom_gate = gate_fn is not None and getattr(gate_fn, "__name__", "") != "_default_apply_gate"
    gated = first == "gate_up_proj"
    split = gated and not custom_gate and getattr(module, "is_concatenated", True)
    pre_routed = _is_pre_routed(module)
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:  # a pre-routed module multiplies x @ W: [experts, in, out], in = down's out
        transposed = pre_routed and params[first].shape[1] == params["down_proj"].shape[2]
    return ExpertsLayout(first, bool(transposed), "down_proj_bias" in params, split,
                         bool(getattr(module, "has_post_expert_norm", False)), pre_routed)


def _is_pre_routed(module: nn.Module) -> bool:
    """Experts called with (hidden, top_k_index, top_k_weights) route the tokens themselves; a module
    called with one tensor receives them routed and scaled, one equal block of rows per expert
    (Llama 4's: every token in every block, weighted 0 where the router did not pick the expert)."""
    return _positional_inputs(module) == 1


def _positional_inputs(module: nn.Module) -> int:
    """How many tensors the module's forward takes by position (3 for *args)."""
    import inspect

    kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 3
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def _refuse_other_calls(module: nn.Module) -> None:
    """Experts are split when called (hidden, top_k_index, top_k_weights) or (routed rows,); any other
    call (Inkling's (hidden, gammas)) is refused by name."""
    import inspect

    if _positional_inputs(module) in (0, 2):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__}: its experts are called as forward{inspect.signature(module.forward)}, "
            "neither (hidden, top_k_index, top_k_weights) nor (routed rows,); slimkit cannot split them into "
            "per-expert linears yet")


def is_stacked_experts(module: nn.Module) -> bool:
    """A transformers experts module with 3-D parameters (gate_up_proj or up_proj, and down_proj)."""
    return experts_layout(module) is not None


class ExpertMLP(nn.Module):
    """One expert: its first linears (gate_proj and up_proj, or one gate_up_proj, or up_proj), its
    gate or activation as the experts module computes it, down_proj, and the module's post-norm."""

    def __init__(self, linears: dict[str, nn.Linear], owner: nn.Module, layout: ExpertsLayout):
        super().__init__()
        for name, linear in linears.items():
            setattr(self, name, linear)
        self.__dict__["owner"], self.__dict__["layout"] = owner, layout  # shared by every expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner, layout = self.owner, self.layout
        if layout.split:
            hidden = owner.act_fn(self.gate_proj(x)) * self.up_proj(x)
        elif layout.first == "gate_up_proj":
            hidden = owner._apply_gate(self.gate_up_proj(x))
        else:
            hidden = owner.act_fn(self.up_proj(x))
        out = self.down_proj(hidden)
        return owner.post_expert_norm(out) if layout.post_norm else out


class ExpertLinears(nn.ModuleList):
    """A transformers experts module (3-D parameters) as a list of `ExpertMLP`s with its forward:
    (hidden [tokens, hidden], top_k_index [tokens, k], top_k_weights [tokens, k]) -> [tokens, hidden]."""

    def __init__(self, experts: list[ExpertMLP], fused: nn.Module, layout: ExpertsLayout):
        super().__init__(experts)
        self.__dict__["fused"] = fused  # the original module, emptied: its class and act_fn for `fused_experts`
        self.__dict__["layout"] = layout

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self.layout.pre_routed:  # [experts x rows, hidden]: expert e takes the e-th block of rows
            blocks = hidden_states.view(len(self), -1, hidden_states.shape[-1])
            return torch.cat([expert(blocks[e]) for e, expert in enumerate(self)]).to(hidden_states.dtype)
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            position, token = torch.where((top_k_index == e).T)  # the order transformers' loop uses
            if token.numel():
                y = expert(hidden_states[token]) * top_k_weights[token, position, None]
                out.index_add_(0, token, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return linear


def _expert_linears(params: dict[str, torch.Tensor], layout: ExpertsLayout, e: int) -> dict[str, nn.Linear]:
    def weight(name):
        return params[name][e].T if layout.transposed else params[name][e]

    def bias(name):
        return params[f"{name}_bias"][e] if layout.bias else None

    first, first_bias = weight(layout.first), bias(layout.first)
    if layout.split:
        inner = first.shape[0] // 2
        linears = {"gate_proj": _linear(first[:inner], None if first_bias is None else first_bias[:inner]),
                   "up_proj": _linear(first[inner:], None if first_bias is None else first_bias[inner:])}
    else:
        linears = {layout.first: _linear(first, first_bias)}
    return {**linears, "down_proj": _linear(weight("down_proj"), bias("down_proj"))}


def split_experts(module: nn.Module) -> ExpertLinears:
    """`module`'s experts as linears; an experts module with anything else is refused by name."""
    layout = experts_layout(module)
    params = {k: p.detach() for k, p in module.named_parameters(recurse=False)}
    other = sorted(set(params) - set(layout.stacked))
    needs = "act_fn" if layout.split or layout.first == "up_proj" else "_apply_gate"
    if other or not hasattr(module, needs):
        raise UnsupportedArchitectureError(
            f"{type(module).__name__}: experts with {other or f'no {needs}'} besides {', '.join(layout.stacked)} are "
            "not supported; slimkit splits experts whose parameters are their projections' weights and biases")
    experts = [ExpertMLP(_expert_linears(params, layout, e), module, layout) for e in range(params["down_proj"].shape[0])]
    _empty(module, layout)
    return ExpertLinears(experts, module, layout)


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> int:
    """Swap every stacked experts module of `model` for `ExpertLinears`; the number swapped.
    The first swap is checked against the original on random tokens (not on `meta`)."""
    names = [n for n, m in model.named_modules() if is_stacked_experts(m)]
    for i, name in enumerate(names):
        module = model.get_submodule(name)
        _refuse_other_calls(module)
        check = i == 0 and module.down_proj.device.type != "meta"
        sample = _routing_sample(module) if check else None
        reference = module(*sample) if check else None
        swapped = split_experts(module)
        if check:
            _check_same(type(module).__name__, reference, swapped(*sample))
        model.set_submodule(name, swapped)
    return len(names)


@torch.no_grad()
def _routing_sample(module: nn.Module) -> tuple[torch.Tensor, ...]:
    down = module.down_proj
    experts, hidden = down.shape[0], down.shape[2] if experts_layout(module).transposed else down.shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * experts, hidden, generator=g).to(down)
    if experts_layout(module).pre_routed:
        return (x,)
    index = torch.stack([torch.arange(3 * experts) % experts, (torch.arange(3 * experts) + 1) % experts], dim=1)
    weights = torch.rand(3 * experts, 2, generator=g).to(x)
    return x, index.to(x.device), weights


def _check_same(name: str, reference: torch.Tensor, swapped: torch.Tensor) -> None:
    scale = reference.abs().max().clamp_min(1e-6)
    if not torch.allclose(reference, swapped, rtol=1e-3, atol=1e-4 * float(scale)):
        raise UnsupportedArchitectureError(
            f"{name}: its experts do not compute down(gate(first(x))) weighted by the router, so slimkit "
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
            _empty(module.fused, module.layout)


def _empty(fused: nn.Module, layout: ExpertsLayout) -> None:
    for name in layout.stacked:  # the original keeps no copy of the weights
        setattr(fused, name, nn.Parameter(torch.empty(0, device=getattr(fused, name).device), requires_grad=False))


def _first(expert: ExpertMLP, layout: ExpertsLayout, part: str) -> torch.Tensor | None:
    """The expert's first projection's weight or bias, as the fused module stores it ([gate; up] when split)."""
    tensors = [getattr(getattr(expert, n), part) for n in layout.first_linears()]
    return None if tensors[0] is None else torch.cat(tensors)


def _stacked(name: str, module: ExpertLinears) -> nn.Module:
    fused, layout = module.fused, module.layout
    try:
        weights = {layout.first: [_first(e, layout, "weight") for e in module],
                   "down_proj": [e.down_proj.weight for e in module]}
        biases = {f"{layout.first}_bias": [_first(e, layout, "bias") for e in module],
                  "down_proj_bias": [e.down_proj.bias for e in module]} if layout.bias else {}
    except AttributeError:
        raise UnsupportedArchitectureError(f"{name}: packed experts cannot be saved as a Hugging Face checkpoint; "
                                           "export the packed model with `slimkit export`") from None
    for key, tensors in weights.items():
        stacked = torch.stack([t.T if layout.transposed else t for t in tensors]).detach()
        setattr(fused, key, nn.Parameter(stacked, requires_grad=False))
    for key, tensors in biases.items():
        setattr(fused, key, nn.Parameter(torch.stack(tensors).detach(), requires_grad=False))
    return fused


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """slimkit's key of every tensor (experts as linears: `...experts.3.up_proj.weight`) -> the key a
    checkpoint of this model type uses (Mixtral: `...block_sparse_moe.experts.3.w3.weight`), found by
    running transformers' own save-time conversion on marker tensors: no name list per model."""
    from transformers.core_model_loading import revert_weight_conversion

    markers: dict[str, torch.Tensor] = {}  # the fused layout's keys, each holding numbered markers
    ours: list[str] = []  # marker number -> slimkit key
    swapped = {p: m for p, m in expert_modules(model).items() if not loaded_per_expert(m.fused)}
    for key in model.state_dict(keep_vars=True):
        if not any(key.startswith(p + ".") for p in swapped):
            markers[key] = torch.tensor([float(len(ours))], dtype=torch.float64)
            ours.append(key)
    for path, experts in swapped.items():
        _expert_markers(path, experts, markers, ours)
    try:
        reverted = revert_weight_conversion(model, markers)
    except (ValueError, RuntimeError, KeyError, IndexError) as exc:  # a conversion that does not take markers
        reverted, why = {}, f" ({type(exc).__name__}: {exc})"
    else:
        why = ""
    names = {ours[int(t.flatten()[0])]: key for key, t in reverted.items()}
    if len(names) != len(ours):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: its checkpoints keep the experts in a layout transformers' conversion does not "
            f"map one linear per expert projection{why}, and compressed-tensors stores quantized experts that way "
            "only; export it with --to gguf or --to hf")
    return names


def loaded_per_expert(fused: nn.Module) -> bool:
    """transformers swaps this experts class for a list of per-expert MLPs when it loads a
    compressed-tensors checkpoint (Llama 4's), named as slimkit names the split experts."""
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    from transformers.utils.quantization_config import QuantizationMethod

    patch = MODULES_TO_PATCH_FOR_QUANTIZATION.get(type(fused).__name__, {})
    return QuantizationMethod.COMPRESSED_TENSORS in patch.get("quantization_methods", ())


def _expert_markers(path: str, experts: ExpertLinears, markers: dict[str, torch.Tensor], ours: list[str]) -> None:
    """Markers in the fused layout's keys for each expert's linears (and biases): [experts, parts, 1]."""
    layout = experts.layout
    parts = {layout.first: layout.first_linears(), "down_proj": ("down_proj",)}
    for kind in ("weight", "bias") if layout.bias else ("weight",):
        for key, linears in parts.items():
            numbers = []
            for e in range(len(experts)):
                numbers.append([len(ours) + i for i in range(len(linears))])
                ours += [f"{path}.{e}.{linear}.{kind}" for linear in linears]
            markers[f"{path}.{key}" + ("_bias" if kind == "bias" else "")] = torch.tensor(
                numbers, dtype=torch.float64).unsqueeze(-1)
