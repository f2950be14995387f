"""Write a compressed model as a plain Hugging Face directory, plus what compression kept.

The weights are dense (masks applied, quantized values dequantized) so that any runtime loads
them; `compression.safetensors` keeps the masks (bit-packed) and the quantization scales and
zero points for packing and export.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from slimkit.models.loading import LoadedModel
from slimkit.recipes.registry import LayerRecord

COMPRESSION_FILE = "compression.safetensors"


def save_model_dir(loaded: LoadedModel, directory: Path, dtype: torch.dtype | None = None) -> None:
    original = next(loaded.model.parameters()).dtype
    model = loaded.model if dtype is None else loaded.model.to(dtype)
    model.save_pretrained(directory)
    if dtype is not None:
        loaded.model.to(original)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)


def save_compression_state(records: dict[str, LayerRecord], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, rec in records.items():
        entry = {"kind": rec.kind, "shape": list(rec.shape), "methods": rec.methods}
        if rec.mask is not None:
            tensors[f"{name}.mask_bits"] = torch.from_numpy(np.packbits(rec.mask.numpy().ravel()))
        if rec.quant is not None:
            spec = rec.quant.spec
            entry["quant"] = {
                "bits": spec.bits,
                "symmetric": spec.symmetric,
                "group_size": spec.group_of(rec.shape[-1]),
                "scale_dtype": str(spec.scale_dtype).removeprefix("torch."),
            }
            tensors[f"{name}.scale"] = rec.quant.scale.contiguous()
            if rec.quant.zero is not None:
                tensors[f"{name}.zero_point"] = rec.quant.zero.to(torch.int8).contiguous()
        layers[name] = entry
    save_file(tensors, str(path), metadata={"slimkit_layers": json.dumps(layers)})
