"""What an architecture adapter holds: where a model keeps its blocks, projections, heads and norms.

Paths are attribute paths relative to the HF base model (`model.base_model`) or to one block. The
adapters themselves are data (`adapters.py`) or discovered from the model (`discovery.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimkit.errors import UnsupportedArchitectureError


def submodule_at(root: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted attribute path, or None when any part is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class InputGroup:
    """Projections that read the very same tensor (one Hessian for all), and the op producing that
    tensor when scales can be folded into it exactly (a norm, or a linear such as v_proj or up_proj);
    None when nothing foldable produces it."""

    projections: tuple[str, ...]
    producer: str | None = None


@dataclass(frozen=True)
class ArchitectureAdapter:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # ModuleList of transformer blocks, relative to the base model
    # the linears of a block by role, relative to a block (None: a block without attention, Mamba's)
    q_proj: str | None
    k_proj: str | None
    v_proj: str | None
    o_proj: str | None
    mlp_inputs: tuple[str, ...]  # the linears that read the block's hidden state (gate/up, or intermediate)
    mlp_output: str | None  # the linear that writes back to the hidden width (down); None: experts only
    block_norms: tuple[str, ...]
    embeddings: tuple[str, ...]  # relative to the base model
    final_norm: str | None  # relative to the base model
    lm_head: str | None  # relative to the full model
    groups: tuple[InputGroup, ...] = ()  # every block linear in exactly one group, in execution order
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = "num_key_value_heads"
    # Structured pruning of the hidden (residual) width also touches these, relative to the base
    # model: norms over the hidden width, and square hidden x hidden linears (BERT's pooler).
    hidden_norms: tuple[str, ...] = ()
    hidden_square_linears: tuple[str, ...] = ()
    # Whether the config stores the head size (LLaMA: head_dim) or derives it as hidden / heads.
    free_head_dim: bool = True
    # MoE: every expert's linears (gate, up, down per expert; `models/experts.py`) and the routers
    # (and shared-expert gates), which stay dense; relative to a block
    experts: tuple[str, ...] = ()
    routers: tuple[str, ...] = ()
    # blocks built differently from block 0 (DeepSeek's leading dense blocks before MoE ones): their
    # indices and the adapter whose block roles they follow (its model-level fields are this one's)
    variants: tuple[tuple[tuple[int, ...], "ArchitectureAdapter"], ...] = ()
    # attention projections with no q/k/v/o role: multi-head latent attention's up-projections
    # (q_b_proj, kv_b_proj), compressed like any linear, never restructured; relative to a block
    latent_linears: tuple[str, ...] = ()
    # projections with no attention or MLP role (a state-space mixer's in/out projections, linear
    # attention, gated attention layouts slimkit does not read): compressed like any linear, never
    # restructured; relative to a block
    other_linears: tuple[str, ...] = ()
    # block parameters the forward pass uses directly, not through a projection (convolutions, state-
    # space decays, token-shift mixes): kept at the source precision and counted as such; relative to a block
    dense_weights: tuple[str, ...] = ()

    def for_block(self, index: int) -> "ArchitectureAdapter":
        """The adapter whose roles block `index` follows: a variant's, or this one."""
        return next((a for indices, a in self.variants if index in indices), self)

    def restructure_problem(self, model: nn.Module) -> str | None:
        """Why operations that rewrite heads or the residual stream (structured pruning, rotation)
        cannot run on some block, or None."""
        for i in range(len(self.get_blocks(model))):
            adapter = self.for_block(i)
            if adapter.latent_linears:
                return f"its attention is latent ({', '.join(adapter.latent_linears)}): heads are not separable"
            if adapter.other_linears:
                return (f"block {i} holds projections with no attention or MLP role "
                        f"({', '.join(adapter.other_linears[:4])})")
            if adapter.q_proj is None:
                return f"block {i} has no attention"
        return None

    def head_dim_is_free(self, config) -> bool:
        """Whether the config class stores (and saves) the head size, so that it may differ from
        hidden / heads (Qwen2's model reads `head_dim` but its config class does not save it)."""
        return self.free_head_dim and "head_dim" in type(config)().to_dict()

    @property
    def attention_linears(self) -> tuple[str, ...]:
        """q, k, v and o without repeats (a fused qkv projection appears once)."""
        return tuple(p for p in dict.fromkeys((self.q_proj, self.k_proj, self.v_proj, self.o_proj)) if p)

    @property
    def fused_projections(self) -> tuple[str, ...]:
        """Projections that hold several roles in one weight (qkv, or gate and up)."""
        fused = [self.q_proj] if self.q_proj and len({self.q_proj, self.k_proj, self.v_proj}) < 3 else []
        return tuple(fused + [p for p in self.mlp_inputs if "gate_up" in p])

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        """The dense MLP's linears (a shared expert's, in an MoE block); not the experts."""
        return (*self.mlp_inputs, self.mlp_output) if self.mlp_output else ()

    # ---- structure -------------------------------------------------------------------------
    def missing_parts(self, model: nn.Module) -> list[str]:
        base = model.base_model
        missing = [self.blocks] if submodule_at(base, self.blocks) is None else []
        missing += [p for p in self.embeddings if submodule_at(base, p) is None]
        if self.final_norm and submodule_at(base, self.final_norm) is None:
            missing.append(self.final_norm)
        blocks = submodule_at(base, self.blocks)
        if blocks is not None and len(blocks) > 0:
            for p in self.attention_linears + self.mlp_linears + self.block_norms:
                if submodule_at(blocks[0], p) is None:
                    missing.append(f"{self.blocks}.0.{p}")
        return missing

    def validate(self, model: nn.Module) -> None:
        missing = self.missing_parts(model)
        if missing:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} looks like '{self.name}' but lacks: {', '.join(missing)}. "
                "An adapter must name the blocks, attention and MLP linears, norms and embeddings; "
                "register a matching one with slimkit.models.adapters.register_adapter()."
            )

    def block_module(self, block: nn.Module, path: str) -> nn.Module | None:
        return submodule_at(block, path)

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return submodule_at(model.base_model, self.blocks)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {p: submodule_at(block, p)
                for p in self.attention_linears + self.latent_linears + self.other_linears + self.mlp_linears
                + self.experts}

    def linears(self, model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
        """The compressible linears by full module name, in execution order."""
        names = {id(m): n for n, m in model.named_modules()}
        out: dict[str, nn.Linear] = {}
        for i, block in enumerate(self.get_blocks(model)):
            for module in self.for_block(i).block_linears(block).values():
                out[names[id(module)]] = module
        if include_lm_head and self.lm_head:
            head = submodule_at(model, self.lm_head)
            if isinstance(head, nn.Linear):
                out[self.lm_head] = head
        return out

    def module_roles(self, model: nn.Module) -> dict[str, str]:
        """Full module name -> role, for every module the adapter names: "q", "k", "v" (one fused
        projection: "qkv"), "o", "mlp_input", "mlp_output", "expert", "router", "block_norm",
        "embedding", "final_norm", "lm_head"."""
        names = {id(m): n for n, m in model.named_modules()}
        found = [(submodule_at(block, path), role) for i, block in enumerate(self.get_blocks(model))
                 for path, role in self.for_block(i).block_roles() if path]
        found += [(submodule_at(model.base_model, p), "embedding") for p in self.embeddings]
        found += [(submodule_at(model.base_model, self.final_norm), "final_norm")] if self.final_norm else []
        found += [(submodule_at(model, self.lm_head), "lm_head")] if self.lm_head else []
        return {names[id(m)]: role for m, role in found if m is not None and id(m) in names}

    def block_roles(self) -> list[tuple[str | None, str]]:
        """(path in a block, role) of every module the adapter names in a block."""
        fused = self.q_proj is not None and self.q_proj == self.k_proj == self.v_proj
        return [(self.q_proj, "qkv" if fused else "q"), (self.k_proj, "qkv" if fused else "k"),
                (self.v_proj, "qkv" if fused else "v"), (self.o_proj, "o"),
                *((p, "attention_latent") for p in self.latent_linears),
                *((p, "projection") for p in self.other_linears),
                *((p, "mlp_input") for p in self.mlp_inputs), (self.mlp_output, "mlp_output"),
                *((p, "expert") for p in self.experts), *((p, "router") for p in self.routers),
                *((p, "block_norm") for p in self.block_norms)]

    def embedding_modules(self, model: nn.Module) -> dict[str, nn.Embedding]:
        names = {id(m): n for n, m in model.named_modules()}
        mods = (submodule_at(model.base_model, p) for p in self.embeddings)
        return {names[id(m)]: m for m in mods if isinstance(m, nn.Embedding)}

    def heads(self, model: nn.Module) -> HeadLayout:
        cfg = model.config
        n = getattr(cfg, self.heads_attr)
        kv = getattr(cfg, self.kv_heads_attr, None) if self.kv_heads_attr else None
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
        return HeadLayout(num_heads=n, num_kv_heads=kv or n, head_dim=head_dim)

    # ---- naming ----------------------------------------------------------------------------
    def tensor_kind(self, param_name: str) -> str:
        """Classify a state-dict key: embedding, attention, mlp, projection (a linear with no such
        role), norm, lm_head or other (what stays at the source precision inside blocks)."""
        parts = param_name.split(".")
        if self.lm_head and param_name.startswith(self.lm_head + "."):
            return "lm_head"
        if any(e.split(".")[-1] in parts for e in self.embeddings):
            return "embedding"
        adapters = (self, *(a for _, a in self.variants))
        for kind, paths in (("attention", [p for a in adapters for p in a.attention_linears + a.latent_linears]),
                            ("mlp", [p for a in adapters for p in a.mlp_linears + a.experts]),
                            ("projection", [p for a in adapters for p in a.other_linears])):
            if any(f".{p}." in f".{param_name}" for p in paths):
                return kind
        if any("norm" in part.lower() for part in parts):
            return "norm"
        return "other"
