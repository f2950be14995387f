"""Architecture adapters: where a model keeps its blocks, linears, heads and norms.

Adding an architecture means registering one `ArchitectureAdapter` (no torch.fx tracing). Paths
are attribute paths relative to the HF base model (`model.base_model`) or to one block.
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
class ArchitectureAdapter:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # ModuleList of transformer blocks, relative to the base model
    # the linears of a block by role, relative to a block
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str
    mlp_inputs: tuple[str, ...]  # the linears that read the block's hidden state (gate/up, or intermediate)
    mlp_output: str  # the linear that writes back to the hidden width (down)
    block_norms: tuple[str, ...]
    embeddings: tuple[str, ...]  # relative to the base model
    final_norm: str | None  # relative to the base model
    lm_head: str | None  # relative to the full model
    # Linears that read the same input (one Hessian each), and the op whose output is that input
    # (a norm or a linear that scales can be folded into; None: nothing foldable).
    input_groups: tuple[tuple[str, ...], ...] = ()
    group_producers: tuple[str | None, ...] = ()
    heads_attr: str = "num_attention_heads"
    kv_heads_attr: str | None = "num_key_value_heads"
    # Structured pruning of the hidden (residual) width also touches these, relative to the base
    # model: norms over the hidden width, and square hidden x hidden linears (BERT's pooler).
    hidden_norms: tuple[str, ...] = ()
    hidden_square_linears: tuple[str, ...] = ()
    # Whether the config stores the head size (LLaMA: head_dim) or derives it as hidden / heads.
    free_head_dim: bool = True

    @property
    def attention_linears(self) -> tuple[str, ...]:
        return (self.q_proj, self.k_proj, self.v_proj, self.o_proj)

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return (*self.mlp_inputs, self.mlp_output)

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
        return {p: submodule_at(block, p) for p in self.attention_linears + self.mlp_linears}

    def linears(self, model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
        """The compressible linears by full module name, in execution order."""
        names = {id(m): n for n, m in model.named_modules()}
        out: dict[str, nn.Linear] = {}
        for block in self.get_blocks(model):
            for module in self.block_linears(block).values():
                out[names[id(module)]] = module
        if include_lm_head and self.lm_head:
            head = submodule_at(model, self.lm_head)
            if isinstance(head, nn.Linear):
                out[self.lm_head] = head
        return out

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
        """Classify a state-dict key: embedding, attention, mlp, norm, lm_head or other."""
        parts = param_name.split(".")
        if self.lm_head and param_name.startswith(self.lm_head + "."):
            return "lm_head"
        if any(e.split(".")[-1] in parts for e in self.embeddings):
            return "embedding"
        for kind, paths in (("attention", self.attention_linears), ("mlp", self.mlp_linears)):
            if any(f".{p}." in f".{param_name}" for p in paths):
                return kind
        if any("norm" in part.lower() for part in parts):
            return "norm"
        return "other"


LLAMA = ArchitectureAdapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    blocks="layers",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp.down_proj",
    block_norms=("input_layernorm", "post_attention_layernorm"),
    embeddings=("embed_tokens",),
    final_norm="norm",
    lm_head="lm_head",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    group_producers=("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"),
)

BERT = ArchitectureAdapter(
    name="bert",
    model_types=("bert",),
    blocks="encoder.layer",
    q_proj="attention.self.query",
    k_proj="attention.self.key",
    v_proj="attention.self.value",
    o_proj="attention.output.dense",
    mlp_inputs=("intermediate.dense",),
    mlp_output="output.dense",
    block_norms=("attention.output.LayerNorm", "output.LayerNorm"),
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    final_norm=None,
    lm_head=None,
    kv_heads_attr=None,
    input_groups=(
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        ("attention.output.dense",),
        ("intermediate.dense",),
        ("output.dense",),
    ),
    group_producers=(None, "attention.self.value", "attention.output.LayerNorm", None),
    hidden_norms=("embeddings.LayerNorm",),
    hidden_square_linears=("pooler.dense",),
    free_head_dim=False,
)

_REGISTRY: dict[str, ArchitectureAdapter] = {}


def register_adapter(adapter: ArchitectureAdapter) -> None:
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter


for _adapter in (LLAMA, BERT):
    register_adapter(_adapter)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"no architecture adapter for model_type '{model_type}' ({type(model).__name__}). "
            f"Supported model types: {', '.join(supported_model_types())}. An adapter names the "
            "blocks, attention and MLP linears, norms and embeddings; add one with "
            "slimkit.models.adapters.register_adapter()."
        )
    adapter.validate(model)
    return adapter

