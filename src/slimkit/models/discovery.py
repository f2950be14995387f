"""Structure discovery: an `ArchitectureAdapter` derived from the model object and one short forward pass.

No per-architecture definition and no tracing. One forward pass of a few tokens, with hooks on the
first block, shows which projections run and which read the very same tensor (tensor identity, not
names). A producer (norm or projection) is accepted only when folding scales into it provably keeps
the block's function: `fold_check.py` tries it on a random copy of the block.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from slimkit.errors import UnsupportedArchitectureError
from slimkit.models.experts import ExpertLinears, is_stacked_experts
from slimkit.models.fold_check import FoldCheck, is_projection, out_width
from slimkit.models.layouts import stored_linears
from slimkit.models.structure import ArchitectureAdapter, InputGroup

ATTENTION_WORDS = ("attn", "attention")
ROLE_NAMES = {"q": ("q_proj", "query", "q", "wq", "q_lin"), "k": ("k_proj", "key", "k", "wk", "k_lin"),
              "v": ("v_proj", "value", "v", "wv", "v_lin")}
HINT = ("give the structure as data with slimkit.models.adapters.register_adapter(ArchitectureAdapter(...)) "
        "for this model_type (see LLAMA in slimkit/models/adapters.py)")


def discovery_error(model: nn.Module, what: str) -> UnsupportedArchitectureError:
    model_type = getattr(model.config, "model_type", "?")
    return UnsupportedArchitectureError(
        f"could not discover the structure of {type(model).__name__} (model_type '{model_type}'): {what}. "
        f"To use it anyway, {HINT}.")


def find_blocks(model: nn.Module) -> str:
    """The ModuleList of `num_hidden_layers` blocks, relative to the base model."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, module) for name, module in model.base_model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers and name]
    # one class (the usual), else the first list of several (hybrids: Jamba's attention and Mamba blocks)
    lists.sort(key=lambda item: len({type(m) for m in item[1]}) > 1)
    if len(lists) > 1 and not any(p.is_meta for p in model.parameters()):
        ran = _first_blocks_that_run(model, [m for _, m in lists])
        lists.sort(key=lambda item: not any(item[1][0] is block for block in ran))
    if not lists:
        raise discovery_error(model, f"no list of num_hidden_layers={n_layers} blocks")
    return lists[0][0]


def _first_blocks_that_run(model: nn.Module, lists: list[nn.ModuleList]) -> list[nn.Module]:
    """Of several block lists (GIT: an image encoder's beside the text decoder's), those whose first
    block runs when the model reads text."""
    ran: list[nn.Module] = []
    handles = [blocks[0].register_forward_hook(lambda module, *_: ran.append(module)) for blocks in lists]
    try:
        _run_a_few_tokens(model)
    finally:
        for h in handles:
            h.remove()
    return ran


@dataclass
class BlockTrace:
    """What one forward pass showed of the first block."""

    order: list[str] = field(default_factory=list)  # module paths in the order they returned
    inputs: dict[str, object] = field(default_factory=dict)  # every submodule's first positional input
    outputs: dict[str, object] = field(default_factory=dict)  # every submodule's output
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    after_blocks: list[str] = field(default_factory=list)  # base-model modules that ran after the blocks


def trace_first_block(model: nn.Module, blocks_path: str, index: int = 0) -> BlockTrace:
    """What one forward pass shows of block `index` (the first, unless told)."""
    blocks = model.base_model.get_submodule(blocks_path)
    trace, handles = BlockTrace(), []

    def keep_call(_module, args, kwargs):
        trace.args, trace.kwargs = args, kwargs

    def keep_io(path):
        def hook(module, args, output):
            trace.order.append(path)
            trace.outputs[path] = output
            if args:
                trace.inputs.setdefault(path, args[0])
        return hook

    handles.append(blocks[index].register_forward_pre_hook(keep_call, with_kwargs=True))
    handles += [m.register_forward_hook(keep_io(p)) for p, m in blocks[index].named_modules() if p]
    last = blocks[-1]
    outside = [(p, m) for p, m in model.base_model.named_modules() if p and not (p + ".").startswith(blocks_path + ".")]
    handles.append(last.register_forward_hook(lambda *_: trace.after_blocks.clear()))
    handles += [m.register_forward_hook(lambda *_, p=p: trace.after_blocks.append(p)) for p, m in outside]
    try:
        _run_a_few_tokens(model)
    finally:
        for h in handles:
            h.remove()
    return trace


def _run_a_few_tokens(model: nn.Module) -> None:
    device = next(model.parameters()).device
    vocab = getattr(model.config, "vocab_size", 32) or 32
    ids = (torch.arange(8, device=device) % max(vocab - 4, 1) + 3).unsqueeze(0)
    kwargs = {"use_cache": False} if "use_cache" in model.config.to_dict() else {}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)


def input_groups(trace: BlockTrace, projections: dict[str, nn.Module]) -> list[list[str]]:
    """Projections grouped by the identity of the tensor they read, in execution order."""
    groups: dict[int, list[str]] = {}
    for path in projections:
        if path in trace.inputs:
            groups.setdefault(id(trace.inputs[path]), []).append(path)
    return list(groups.values())


def producer_candidates(trace: BlockTrace, group: list[str], projections: dict[str, nn.Module],
                        norms: dict[str, nn.Module]) -> list[str]:
    """The module whose output is the group's input, then earlier projections of the right width
    (nearest first): folding into a projection can hold through attention or a gated product."""
    x = trace.inputs[group[0]]
    if x is (trace.args[0] if trace.args else trace.kwargs.get("hidden_states")):
        return []  # the block's own input: produced outside the block
    first = min(trace.order.index(p) for p in group)
    earlier = list(reversed(trace.order[:first]))
    same = [p for p in earlier if trace.outputs.get(p) is x and p not in projections and p in norms]
    width = x.shape[-1]
    linear = [p for p in earlier if p in projections and p not in group and out_width(projections[p]) == width]
    return list(dict.fromkeys(same[:1] + linear))


def _is_norm(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == width \
        and not isinstance(module, nn.Embedding)


@dataclass
class MoEParts:
    """A block's experts (known from the module, not from the trace: the few tokens of the trace
    reach only some experts) and its routers (kept dense)."""

    groups: list[InputGroup] = field(default_factory=list)  # per expert: (gate, up), then (down,) fed by up
    routers: tuple[str, ...] = ()  # router / shared-expert gates: few outputs, reading the hidden state

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(p for g in self.groups for p in g.projections)


def moe_parts(block: nn.Module, hidden: int) -> MoEParts:
    parts = MoEParts()
    routers = []
    for path, experts in ((p, m) for p, m in block.named_modules() if isinstance(m, ExpertLinears)):
        for e in range(len(experts)):
            prefix, layout = f"{path}.{e}.", experts.layout
            # down's input is up's output times the gate only in the split layout: a fold into up is exact there
            parts.groups += [InputGroup(tuple(prefix + n for n in layout.first_linears())),
                             InputGroup((prefix + "down_proj",), prefix + "up_proj" if layout.split else None)]
        parent = path.rpartition(".")[0]
        routers += [p for p, m in block.named_modules() if (p + ".").startswith(parent + ".") and p != path
                    and _is_router(m, len(experts), hidden)]
    parts.routers = tuple(dict.fromkeys(routers))
    return parts


def _is_router(module: nn.Module, experts: int, hidden: int) -> bool:
    weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    return weight is not None and weight.dim() == 2 and weight.shape[0] <= experts and weight.shape[1] == hidden


@dataclass
class BlockParts:
    projections: dict[str, nn.Module]  # by path in the block, in execution order
    norms: dict[str, nn.Module]  # hidden-width norms of the block, in execution order
    groups: list[InputGroup]
    moe: MoEParts = field(default_factory=MoEParts)


def block_parts(model: nn.Module, block: nn.Module, trace: BlockTrace, moe: MoEParts) -> BlockParts:
    hidden = model.config.hidden_size
    ran = [p for p in dict.fromkeys(trace.order) if p not in moe.projections and p not in moe.routers]
    projections = {p: block.get_submodule(p) for p in ran if is_projection(block.get_submodule(p))}
    norms = {p: block.get_submodule(p) for p in ran if _is_norm(block.get_submodule(p), hidden)}
    grouped = input_groups(trace, projections)
    fed_by_inputs = {id(trace.outputs[p]) for g in grouped[:1] for p in g}  # q/k norms read q or k
    norms = {p: m for p, m in norms.items() if id(trace.inputs.get(p)) not in fed_by_inputs}
    checker = FoldCheck(block, trace.args, trace.kwargs)
    groups = []
    for group in grouped:
        candidates = producer_candidates(trace, group, projections, norms)
        producer = next((c for c in candidates if checker.keeps_function(c, group)), None)
        groups.append(InputGroup(tuple(group), producer))
    return BlockParts(projections, norms, groups + moe.groups, moe)


def _is_attention(path: str) -> bool:
    return any(word in part.lower() for part in path.split(".")[:-1] for word in ATTENTION_WORDS)


def _by_role(paths: list[str], role: str) -> str | None:
    return next((p for p in paths if p.split(".")[-1].lower() in ROLE_NAMES[role]), None)


def attention_roles(model: nn.Module, parts: BlockParts) -> dict[str, str]:
    """q, k, v (the same path when fused) and o among the projections under an attention module."""
    attention = [p for p in parts.projections if _is_attention(p)]
    reading = next((g.projections for g in parts.groups if set(g.projections) & set(attention)), ())
    inputs = [p for p in reading if p in attention]
    outputs = [p for p in attention if p not in inputs]
    roles = {r: _by_role(inputs, r) for r in ("q", "k", "v")}
    if len(inputs) == 1:
        roles = dict.fromkeys(("q", "k", "v"), inputs[0])  # fused qkv
    if None in roles.values() or len(outputs) != 1:
        return latent_attention_roles(model, parts, inputs, outputs)
    return {"q_proj": roles["q"], "k_proj": roles["k"], "v_proj": roles["v"], "o_proj": outputs[0]}


NO_ATTENTION_ROLES = {"q_proj": None, "k_proj": None, "v_proj": None, "o_proj": None}


def latent_attention_roles(model: nn.Module, parts: BlockParts, inputs: list[str], outputs: list[str]) -> dict:
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3): q (or its down-projection) and the joint
    kv down-projection read the hidden state, up-projections read their normed latents, one projection
    writes back. q takes the q role, the kv down-projection k and v, the up-projections no role."""
    leaf = {p: p.split(".")[-1].lower() for p in inputs}
    q = next((p for p in inputs if leaf[p].startswith("q")), None)
    kv = next((p for p in inputs if leaf[p].startswith("kv")), None)
    writers = [p for p in outputs if out_width(parts.projections[p]) == model.config.hidden_size]
    if len(inputs) != 2 or q is None or kv is None or len(writers) != 1:
        return NO_ATTENTION_ROLES  # attention slimkit does not read (or none): its projections get no role
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": writers[0],
            "latent_linears": tuple(p for p in outputs if p != writers[0])}


def mlp_roles(model: nn.Module, parts: BlockParts) -> dict:
    """The MLP's input projections (reading the hidden state) and the one writing back; none when the
    block's other projections are not one MLP (experts only, a state-space mixer, adapters beside it)."""
    hidden = model.config.hidden_size
    mlp = [p for p in parts.projections if not _is_attention(p)]
    first = next((g.projections for g in parts.groups if set(g.projections) & set(mlp)), ())
    # the writer reads what the MLP made, not the MLP's input (whose readers may be hidden-wide too)
    writers = [p for p in mlp if out_width(parts.projections[p]) == hidden and p not in first]
    if len(writers) != 1 or set(mlp) - set(first) != set(writers):  # inputs, then the writer, nothing else
        return {"mlp_inputs": (), "mlp_output": None}
    return {"mlp_inputs": tuple(p for p in mlp if p != writers[0]), "mlp_output": writers[0]}


def _outside_blocks(model: nn.Module, blocks: str, trace: BlockTrace) -> dict:
    """Embeddings, norms and square linears of the base model, and the final norm."""
    hidden = model.config.hidden_size
    base = model.base_model
    outside = {p: m for p, m in base.named_modules() if p and not (p + ".").startswith(blocks + ".")}
    embeddings = tuple(p for p, m in outside.items() if isinstance(m, nn.Embedding))
    norms = [p for p, m in outside.items() if _is_norm(m, hidden)]
    final = next((p for p in reversed(trace.after_blocks) if p in norms), None)
    square = tuple(p for p, m in outside.items() if isinstance(m, nn.Linear) and m.weight.shape == (hidden, hidden))
    return {"embeddings": embeddings, "final_norm": final,
            "hidden_norms": tuple(p for p in norms if p != final), "hidden_square_linears": square}


def _lm_head(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def small_twin(model: nn.Module, depth: int = 1) -> nn.Module:
    """A real (CPU) model of the same class with `depth` blocks and a small vocabulary: for a skeleton
    on `meta`, whose forward pass cannot run (transformers asks for values on the way), or a packed model."""
    config = copy.deepcopy(model.config)
    full = config.num_hidden_layers
    config.num_hidden_layers = depth
    for key, value in list(vars(config).items()):  # per-layer lists (layer_types, mlp_only_layers flags)
        if isinstance(value, list) and len(value) == full and key != "architectures" and all(
                isinstance(v, (str, int, bool)) for v in value):  # not Mamba-2's (0.0, inf) time-step limits
            setattr(config, key, value[:depth])
    config.vocab_size = min(getattr(config, "vocab_size", 64) or 64, 64)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, key, None), int) and getattr(config, key) >= config.vocab_size:
            setattr(config, key, None)
    with torch.device("cpu"):
        twin = type(model)(config).eval()
    from slimkit.models.layouts import as_linears

    as_linears(twin)
    return twin


_DISCOVERED: dict[str, ArchitectureAdapter] = {}


def discover_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of a model no registered adapter covers, or an error naming what is missing.
    Found once per config and module tree (a run asks at preflight, at load and at each export)."""
    tree = ";".join(f"{n}:{type(m).__name__}" for n, m in model.named_modules())
    key = f"{type(model).__qualname__}:{model.config.to_json_string()}:{tree}"
    if key not in _DISCOVERED:
        _DISCOVERED[key] = _discover(model)
    return _DISCOVERED[key]


def block_kind(block: nn.Module) -> tuple[str, ...]:
    """What an adapter's roles depend on: the paths of a block's modules (an experts module counted
    once, stacked or split into linears; packed or dense linears alike)."""
    paths: list[str] = []
    experts: list[str] = []
    for path, module in block.named_modules():
        if any(path.startswith(e + ".") for e in experts):
            continue
        if isinstance(module, ExpertLinears) or is_stacked_experts(module):
            experts.append(path)
        paths.append(path)
    return tuple(paths)


def block_kinds(model: nn.Module, blocks: str) -> dict[tuple[str, ...], list[int]]:
    """Block indices by kind, in order of first appearance."""
    kinds: dict[tuple[str, ...], list[int]] = {}
    for i, block in enumerate(model.base_model.get_submodule(blocks)):
        kinds.setdefault(block_kind(block), []).append(i)
    return kinds


def _discover(model: nn.Module) -> ArchitectureAdapter:
    blocks = find_blocks(model)
    twin = any(p.device.type == "meta" for p in model.parameters()) or bool(stored_linears(model))
    if not twin:  # first: a forward pass may change the blocks (BigBird picks full attention for short text)
        _check_blocks_chain(model, blocks)
    kinds = block_kinds(model, blocks)
    traced = model
    if twin:  # a skeleton, or packed layers: discover on the plain class, with one block of every kind
        traced = _twin_with_blocks(model, blocks, max(indices[0] for indices in kinds.values()) + 1)
    traced_kinds = block_kinds(traced, blocks)
    if twin:
        _check_blocks_chain(traced, blocks)
    adapters = {kind: _block_adapter(traced, blocks, indices[0]) for kind, indices in traced_kinds.items()}
    unknown = [indices for kind, indices in kinds.items() if kind not in adapters]
    if unknown:
        raise discovery_error(model, f"blocks {unknown[0][:5]} are built differently from the first blocks, and a "
                                     "smaller model of this config does not show how")
    first, *others = kinds
    variants = tuple((tuple(kinds[k]), adapters[k]) for k in others)
    return dataclasses.replace(adapters[first], variants=variants)


def _twin_with_blocks(model: nn.Module, blocks: str, count: int) -> nn.Module:
    """A small twin holding at least `count` blocks (LongCat-Flash's config counts two per block; Zamba's
    shared blocks must appear twice to be tied)."""
    failure = "too few blocks"
    for depth in (count, 2 * count):
        try:
            twin = small_twin(model, depth)
        except ValueError as exc:
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        if len(twin.base_model.get_submodule(blocks)) >= count:
            return twin
    raise discovery_error(model, f"a smaller model of this config with {count} blocks in {blocks} does not build "
                                 f"({failure})")


def _check_blocks_chain(model: nn.Module, blocks: str) -> None:
    """Block-by-block calibration feeds each block what the one before returned: refuse a list whose
    entries are parts of a layer instead (XLM keeps its attentions and its MLPs in separate lists)."""
    layers = model.base_model.get_submodule(blocks)
    if len(layers) < 2:
        return
    seen: dict[str, torch.Tensor] = {}

    def keep_output(_module, _args, out) -> None:
        seen.setdefault("out", _hidden(out))

    def keep_input(_module, args, kwargs) -> None:
        seen.setdefault("in", args[0] if args else kwargs.get("hidden_states"))

    hooks = [layers[0].register_forward_hook(keep_output),
             layers[1].register_forward_pre_hook(keep_input, with_kwargs=True)]
    try:
        _run_a_few_tokens(model)
    finally:
        for h in hooks:
            h.remove()
    out, into = seen.get("out"), seen.get("in")
    if not (isinstance(out, torch.Tensor) and isinstance(into, torch.Tensor) and out.shape == into.shape
            and torch.equal(out, into)):
        raise discovery_error(model, f"{blocks}[1] does not read what {blocks}[0] returns (its entries are not "
                                     "whole blocks, or something runs between them)")


def _hidden(out) -> torch.Tensor | None:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _block_adapter(model: nn.Module, blocks: str, index: int) -> ArchitectureAdapter:
    """The roles of block `index` (and the model-level fields, the same from any block)."""
    config = model.config
    trace = trace_first_block(model, blocks, index)
    block = model.base_model.get_submodule(blocks)[index]
    moe = moe_parts(block, config.hidden_size)
    dense = dense_weights(model, block, trace, moe)
    parts = block_parts(model, block, trace, moe)
    if not parts.projections:
        raise discovery_error(model, f"block {index} ran no nn.Linear or Conv1D projection")
    conv1d = [p for p, m in parts.projections.items() if type(m).__name__ == "Conv1D"]
    if conv1d:
        raise discovery_error(model, f"its projections {conv1d} are transformers Conv1D layers (weights stored "
                                     "transposed, the GPT-2 family): call slimkit.models.layouts.as_linears(model) "
                                     "first (slimkit's loading does)")
    roles = {**attention_roles(model, parts), **mlp_roles(model, parts)}
    named = {p for role in roles.values() for p in ((role,) if isinstance(role, str) else role or ())}
    other = tuple(p for p in parts.projections if p not in named)
    kv_attr = "num_key_value_heads" if getattr(config, "num_key_value_heads", None) else None
    return ArchitectureAdapter(
        name=config.model_type, model_types=(config.model_type,), blocks=blocks, **roles,
        other_linears=other, dense_weights=dense,
        experts=parts.moe.projections, routers=parts.moe.routers, block_norms=tuple(parts.norms),
        lm_head=_lm_head(model), groups=tuple(parts.groups),
        kv_heads_attr=kv_attr, free_head_dim=getattr(config, "head_dim", None) is not None,
        **_outside_blocks(model, blocks, trace))


def dense_weights(model: nn.Module, block: nn.Module, trace: BlockTrace, moe: MoEParts) -> tuple[str, ...]:
    """The block's matrices that belong to no projection that ran, expert or router: weights the forward
    pass uses directly (a convolution, a state-space decay, a token-shift mix), kept at the source
    precision. Never skipped silently: they are returned to be named in the adapter, and experts in a
    layout slimkit does not split are refused (left dense they would be most of the model)."""
    ran = [block.get_submodule(p) for p in dict.fromkeys(trace.order)]
    known = {id(m.weight) for m in ran if is_projection(m)}
    known |= {id(block.get_submodule(p).weight) for p in moe.projections}
    known |= {id(w) for p in moe.routers for w in block.get_submodule(p).parameters()}  # score-correction biases
    unknown = [name for name, p in block.named_parameters() if p.dim() >= 2 and id(p) not in known and p.numel()]
    experts = [f"{name} {tuple(block.get_parameter(name).shape)}" for name in unknown
               if _looks_like_experts(block, name)]
    stacked = [p for p, m in block.named_modules() if is_stacked_experts(m)]
    if experts:
        raise discovery_error(model, f"the block holds experts that are not split into nn.Linear projections: "
                                     f"{', '.join(experts)}"
                                     + (f" (the experts {stacked} are still 3-D parameters: call "
                                        "slimkit.models.layouts.as_linears(model) first)" if stacked else ""))
    return tuple(unknown)


def _looks_like_experts(block: nn.Module, name: str) -> bool:
    owner = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    return "expert" in name.lower() or "expert" in type(owner).__name__.lower()
