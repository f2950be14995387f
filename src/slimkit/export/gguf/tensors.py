"""The tensors a GGUF stores, found through the adapter's roles, each in its GGML type, in the
order llama-quantize writes them. MoE experts go out as one 3-D tensor per projection and block;
routers, norms and biases in F32; q/k rows in llama.cpp's rotary order where it differs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimkit.errors import SlimkitError
from slimkit.export.gguf.architectures import gguf_arch, row_order
from slimkit.export.gguf.types import TypePlan, code_format, fitted_blocks, kept_blocks
from slimkit.formats.embedding import PackedEmbedding
from slimkit.models.experts import EXPERT_PROJECTIONS, expert_modules
from slimkit.quantization.gguf_mix import tensor_type


@dataclass(frozen=True)
class ModelWeight:
    """One weight the file stores: its module, its fp32 value, the packed layer whose codes may be
    kept (or llama.cpp blocks a gguf_quantize step recorded), and its role in the adapter."""

    name: str
    module: torch.nn.Module
    weight: torch.Tensor
    packed: object | None
    role: str | None

    @property
    def f32(self) -> bool:
        return self.role == "router"  # small, and llama.cpp's converter keeps routers F32


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as GGUF stores it: data (blocks for quantized types), raw type, and what to report."""

    data: np.ndarray
    raw_dtype: object | None
    label: str


def expert_projections(model: torch.nn.Module) -> dict[str, list[str]]:
    """`<block>.<moe>.experts.<projection>` (the name llama.cpp's map knows) -> each expert's module name."""
    stacked: dict[str, list[str]] = {}
    for path, experts in expert_modules(model).items():
        for e in range(len(experts)):
            for proj in EXPERT_PROJECTIONS:
                stacked.setdefault(f"{path}.{proj}", []).append(f"{path}.{e}.{proj}")
    return stacked


def _stores_weight(module: torch.nn.Module, role: str | None) -> bool:
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)) \
        or type(module).__name__.endswith(("RMSNorm", "LayerNorm")) or role == "router"


def model_weights(model: torch.nn.Module, packed: dict, plan: TypePlan, roles: dict[str, str]):
    """Every weight GGUF stores but the experts' (`expert_projections`): packed layers, linears,
    embeddings, norms and routers; not the head when llama.cpp reuses token_embd for it."""
    inside_experts = {n for names in expert_projections(model).values() for n in names}
    token_embedding = model.get_input_embeddings()
    head = next((n for n, r in roles.items() if r == "lm_head"), None)
    for name, module in model.named_modules():
        role = "token_embedding" if module is token_embedding else roles.get(name)
        if name in inside_experts or (role == "lm_head" and plan.tied):
            continue
        if module is token_embedding and plan.tied and head in packed:  # its values are the head's codes
            yield ModelWeight(name, module, packed[head].dequantize(), packed[head], role)
        elif isinstance(module, PackedEmbedding):  # an untied embedding with its own blocks
            yield ModelWeight(name, module, module.table.dequantize(), module.table, role)
        elif name in packed:
            yield ModelWeight(name, module, packed[name].dequantize(), packed[name], role)
        elif _stores_weight(module, role):
            yield ModelWeight(name, module, module.weight.detach().float(), None, role)


def expert_weights(model: torch.nn.Module, names: list[str], packed: dict) -> list[ModelWeight]:
    def weight(name: str) -> ModelWeight:
        module, mod = model.get_submodule(name), packed.get(name)
        value = mod.dequantize() if mod is not None else module.weight.detach().float()
        return ModelWeight(name, module, value, mod, None)

    return [weight(n) for n in names]


def _tensor_type(w: ModelWeight, data: np.ndarray, plan: TypePlan) -> str:
    if data.ndim == 1 or w.f32:
        return "F32"  # norms, and routers
    if plan.mix is not None:
        return tensor_type(plan.mix, w.name, plan.n_layers, data.shape[1], plan.tied, gqa=plan.gqa)
    return plan.simple_type(code_format(w.packed) if w.packed is not None else None, w.role, data.shape[1])


def stored_tensor(w: ModelWeight, plan: TypePlan, config) -> StoredTensor:
    """One weight in its GGUF type; the label says "... (codes kept)" when the packed layer's own
    blocks go out as they are."""
    import gguf

    order = row_order(w.role, config, w.weight.shape[0])
    kept = kept_blocks(w.packed) if w.packed is not None and plan.keeps(w.packed) else None
    if kept is not None:
        return StoredTensor(kept[0] if order is None else kept[0][order], kept[1], kept[1].name + " (codes kept)")
    data = w.weight.numpy().astype(np.float32)
    data = data if order is None else data[order]
    if data.ndim == 1:  # a norm's weight
        data = data + np.float32(gguf_arch(config).norm_offset)
    if w.f32 and data.shape[0] == 1:
        data = data[0]  # a one-row gate (Qwen2-MoE's shared expert): llama.cpp declares a vector
    t = _tensor_type(w, data, plan)
    if t in ("F16", "F32"):
        return StoredTensor(data.astype(np.float16 if t == "F16" else np.float32), None, t)
    qtype = gguf.GGMLQuantizationType[t]
    if t in ("Q8_0", "Q4_0") and plan.mix is None:
        return StoredTensor(gguf.quants.quantize(data, qtype), qtype, t)
    return StoredTensor(fitted_blocks(data, t), qtype, t)


def stacked_experts(gname: str, experts: list[ModelWeight], plan: TypePlan, config) -> StoredTensor:
    """One projection of every expert of a block as one 3-D tensor [experts, rows, columns]."""
    stored = [stored_tensor(w, plan, config) for w in experts]
    if len({(s.label, s.data.shape) for s in stored}) != 1:
        raise SlimkitError(f"GGUF export: the experts of {gname} were compressed differently "
                           f"({sorted({s.label for s in stored})}); llama.cpp stores them as one tensor of one type")
    return StoredTensor(np.stack([s.data for s in stored]), stored[0].raw_dtype, stored[0].label)


def bias_of(w: ModelWeight, config) -> np.ndarray | None:
    """A linear's or a LayerNorm's bias in F32 (Qwen2's q/k/v, GPT-2), in the same row order as its weight."""
    bias = getattr(w.module, "bias", None)
    if isinstance(w.module, torch.nn.Embedding) or not isinstance(bias, torch.Tensor):
        return None
    data = bias.detach().float().numpy()
    order = row_order(w.role, config, data.shape[0])
    return data if order is None else data[order]


class TensorQueue:
    """Tensors collected, then added in llama-quantize's order: the global ones by name, then each
    block's by name (a block's weights lie together in the file, as llama.cpp writes them)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, np.ndarray, object]] = []
        self.counts: dict[str, int] = {}  # tensors by the label of their type

    def add(self, name: str, stored: StoredTensor, tensors: int = 1) -> None:
        self.items.append((name, stored.data, stored.raw_dtype))
        self.counts[stored.label] = self.counts.get(stored.label, 0) + tensors

    def add_bias(self, name: str, data: np.ndarray) -> None:
        self.items.append((name, data, None))

    @staticmethod
    def _key(name: str) -> tuple[int, str]:
        parts = name.split(".")
        return (int(parts[1]) + 1, name) if parts[0] == "blk" else (0, name)

    def write_to(self, writer) -> None:
        for name, data, raw_dtype in sorted(self.items, key=lambda item: self._key(item[0])):
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
