"""A token embedding read from the rows of its tied head's codes: the model stores one matrix.

A causal LM whose head is tied to its embedding (SmolLM2, Gemma, Qwen3-0.6B ...) spends 20-60% of
its weights there. Once the head is packed in a format whose rows can be gathered (int8: one code
per weight, one scale per row; llama.cpp's blocks, Q6_K or Q8_0, which tile rows), its rows are the
embedding's rows on the same grid, so the embedding gathers them (a lookup reads the few rows it
needs) instead of keeping a dense copy: the file holds the matrix once, and the model computes what
the compress report measured (the head's quantized values on both sides). Only a plain
`nn.Embedding` is replaced (a scaled embedding such as Gemma's keeps its own module).
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.formats.base import PackedLinear


def row_scale(embedding: nn.Module) -> torch.Tensor | None:
    """The factor a scaled embedding (Gemma's ScaledWordEmbedding) multiplies its rows by; None for
    a plain one."""
    scale = getattr(embedding, "embed_scale", None) if type(embedding) is not nn.Embedding else None
    return scale if isinstance(scale, torch.Tensor) else None


def _computes_scaled_rows(embedding: nn.Embedding, scale: torch.Tensor | None) -> bool:
    """Does the embedding compute its rows (times `scale`) and nothing else? Checked on a few ids."""
    if type(embedding) is nn.Embedding:
        return True
    if scale is None or scale.is_meta or embedding.weight.is_meta:
        return False
    ids = torch.arange(min(4, embedding.num_embeddings), device=embedding.weight.device)
    with torch.no_grad():
        return torch.equal(embedding(ids), embedding.weight[ids] * scale.to(embedding.weight.dtype))


def can_share_rows(embedding: nn.Module | None, head: PackedLinear) -> bool:
    """Whether `embedding` can read its rows from the packed `head` it is tied to (a plain
    embedding, or one that scales its rows, as Gemma's)."""
    return isinstance(embedding, nn.Embedding) and head.gathers_rows and embedding.max_norm is None \
        and [head.out_features, head.in_features] == list(embedding.weight.shape) \
        and _computes_scaled_rows(embedding, row_scale(embedding))


class ScaledRows(nn.Embedding):
    """A dense embedding whose rows are multiplied by `embed_scale`, as Gemma's (for exports)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__(*weight.shape, _weight=weight)
        self.embed_scale = nn.Buffer(scale.detach().clone(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class RowsOfHead(nn.Module):
    """An embedding whose rows are those of a packed head (not a submodule: stored once), times
    the embedding's own `scale` where it has one (Gemma)."""

    def __init__(self, head: PackedLinear, dtype: torch.dtype, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # a plain attribute: the head's tensors stay the head's
        self.num_embeddings, self.embedding_dim, self.dtype = head.out_features, head.in_features, dtype
        self.embed_scale = nn.Buffer(scale.detach().clone(), persistent=False) if scale is not None else None

    def __getattr__(self, name: str):
        if name == "weight":  # models read `embed_tokens.weight.device` (Llama 4): shape, dtype and device only
            from slimkit.models.layouts import PackedWeightView

            return PackedWeightView(self, (self.num_embeddings, self.embedding_dim), self.dtype, self.head)
        return super().__getattr__(name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head.rows(ids.reshape(-1)).to(self.dtype).view(*ids.shape, self.embedding_dim)
        return rows if self.embed_scale is None else rows * self.embed_scale.to(self.dtype)

    def dense(self) -> nn.Embedding:
        """A plain (or scaled) embedding holding the same values (for exports)."""
        weight = nn.Parameter(self.head.dequantize().to(self.dtype), requires_grad=False)
        if self.embed_scale is not None:
            return ScaledRows(weight, self.embed_scale)
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim)
        dense.weight = weight
        return dense


class PackedEmbedding(RowsOfHead):
    """An untied embedding stored in a packed format of its own (the llama.cpp blocks a
    `quantize_outer` step chose): a lookup dequantizes only the rows it reads. `table` holds the
    codes as a [vocabulary, width] packed matrix; the packed file stores it under the embedding's name."""

    @property
    def table(self) -> PackedLinear:
        return self.head

    def _apply(self, fn, recurse=True):  # .to(device) moves the table, which is no submodule
        self.head._apply(fn, recurse)
        return super()._apply(fn, recurse)


def pack_embeddings(model: nn.Module, records: dict) -> dict[str, PackedEmbedding]:
    """Replace each plain untied embedding whose record holds llama.cpp blocks by a
    `PackedEmbedding` of those blocks; returns them by name."""
    from slimkit.formats.ggml import GGMLBlocks

    out = {}
    for name, module in list(model.named_modules()):
        record = records.get(name)
        if type(module) is nn.Embedding and record is not None and record.ggml is not None:
            table = GGMLBlocks.from_codes(record.ggml, module.embedding_dim)
            out[name] = PackedEmbedding(table, module.weight.dtype)
            model.set_submodule(name, out[name])
    return out


def share_tied_rows(model: nn.Module, packed: dict[str, PackedLinear]) -> dict[str, str]:
    """Replace the embedding of `model` by the rows of the packed head tied to it, where it can;
    returns {embedding name: head name} (empty when nothing was shared)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    for head_name, head in packed.items():
        if name is not None and head.meta.get("tied_to") == f"{name}.weight" and can_share_rows(embedding, head):
            model.set_submodule(name, RowsOfHead(head, embedding.weight.dtype, row_scale(embedding)))
            return {name: head_name}
    return {}


def dense_embeddings(model: nn.Module, keep_head_packed: bool = False) -> nn.Module:
    """Every packed embedding back to a plain `nn.Embedding` with the same values (exports read
    weights). A shared one's head becomes a dense linear tied to it again (the model as compress left
    it, on the head's grid), unless `keep_head_packed` (a GGUF writes a tied embedding once, as
    token_embd, and an untied packed one with its own blocks: those stay packed)."""
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in list(model.named_modules()):
        if not isinstance(module, RowsOfHead) or (keep_head_packed and isinstance(module, PackedEmbedding)):
            continue
        dense = module.dense()
        model.set_submodule(name, dense)
        if not keep_head_packed and not isinstance(module, PackedEmbedding):
            head = nn.Linear(module.embedding_dim, module.num_embeddings, bias=module.head.bias is not None)
            head.weight = dense.weight
            if module.head.bias is not None:
                head.bias = nn.Parameter(module.head.bias.detach().clone(), requires_grad=False)
            model.set_submodule(names[id(module.head)], head)
    return model
