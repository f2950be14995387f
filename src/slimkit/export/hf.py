"""Write a compressed model as a plain Hugging Face directory.

The weights are dense (masks applied, quantized values dequantized) so that any runtime loads
them; what compression kept (masks, scales) is `recipes/state.py`'s file beside them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimkit.models.layouts import checkpoint_layout
from slimkit.models.loading import LoadedModel


def save_model_dir(loaded: LoadedModel, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Save in `dtype`, by default the dtype the checkpoint was stored in (bf16 stays bf16)."""
    dtype = dtype or loaded.source_dtype
    original = next(loaded.model.parameters()).dtype
    model = loaded.model if dtype == original else loaded.model.to(dtype)
    with checkpoint_layout(model):  # MoE experts as 3-D parameters, Conv1D: what transformers reads
        model.save_pretrained(directory)
    if dtype != original:
        loaded.model.to(original)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
