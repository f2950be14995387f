"""A token embedding read from the rows of its tied head's int8 codes: the model stores one matrix.

A causal LM whose head is tied to its embedding (SmolLM2, Gemma, Qwen3-0.6B ...) spends 20-60% of
its weights there. Once the head is packed in int8 (one code per weight, one scale per row), its
rows are the embedding's rows on the same grid, so the embedding gathers them (a lookup reads the
few rows it needs) instead of keeping a dense copy: the file holds the matrix once, and the model
computes what the compress report measured (the head's quantized values on both sides). Only a
plain `nn.Embedding` is replaced (a scaled embedding such as Gemma's keeps its own module).
"""

from __future__ import annotations

import torch
from torch import nn

from slimkit.formats.base import PackedLinear


def can_share_rows(embedding: nn.Module | None, head: PackedLinear) -> bool:
    """Whether `embedding` can read its rows from the packed `head` it is tied to."""
    return type(embedding) is nn.Embedding and head.format == "int8" and embedding.max_norm is None \
        and [head.out_features, head.in_features] == list(embedding.weight.shape)


class RowsOfHead(nn.Module):
    """An embedding whose rows are those of a packed int8 head (not a submodule: stored once)."""

    def __init__(self, head: PackedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)  # a plain attribute: the head's tensors stay the head's
        self.num_embeddings, self.embedding_dim, self.dtype = head.out_features, head.in_features, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.head.q.index_select(0, flat).to(self.dtype) * self.head.scale.index_select(0, flat)[:, None]
        return rows.view(*ids.shape, self.embedding_dim)

    def dense(self) -> nn.Embedding:
        """A plain embedding holding the same values (for exports)."""
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim)
        dense.weight = nn.Parameter(self.head.dequantize().to(self.dtype), requires_grad=False)
        return dense


def share_tied_rows(model: nn.Module, packed: dict[str, PackedLinear]) -> dict[str, str]:
    """Replace the embedding of `model` by the rows of the packed head tied to it, where it can;
    returns {embedding name: head name} (empty when nothing was shared)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    for head_name, head in packed.items():
        if name is not None and head.meta.get("tied_to") == f"{name}.weight" and can_share_rows(embedding, head):
            model.set_submodule(name, RowsOfHead(head, embedding.weight.dtype))
            return {name: head_name}
    return {}


def dense_embeddings(model: nn.Module, keep_head_packed: bool = False) -> nn.Module:
    """Every shared embedding back to a plain `nn.Embedding` with the same values (exports read
    weights). The head becomes a dense linear tied to it again (the model as compress left it, on
    the int8 grid), unless `keep_head_packed` (a GGUF writes a tied embedding once, as token_embd)."""
    names = {id(m): n for n, m in model.named_modules()}
    for name, module in list(model.named_modules()):
        if not isinstance(module, RowsOfHead):
            continue
        dense = module.dense()
        model.set_submodule(name, dense)
        if not keep_head_packed:
            head = nn.Linear(module.embedding_dim, module.num_embeddings, bias=module.head.bias is not None)
            head.weight = dense.weight
            if module.head.bias is not None:
                head.bias = nn.Parameter(module.head.bias.detach().clone(), requires_grad=False)
            model.set_submodule(names[id(module.head)], head)
    return model
