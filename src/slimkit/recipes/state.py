"""What compression did to each tensor, kept beside a compressed model: `compression.safetensors`.

Masks are bit-packed; quantized layers keep their scales and zero points (the codes are
recomputed from the saved weights, which lie exactly on their grid); layers quantized to a
llama.cpp type keep their packed blocks as they are. Packing and export read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slimkit.io.tensors import save_tensors_atomic
from slimkit.paths import ModelDir
from slimkit.recipes.context import LayerRecord

COMPRESSION_FILE = ModelDir.COMPRESSION


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
                "full_range": spec.full_range,
                "group_size": spec.group_of(rec.shape[-1]),
                "scale_dtype": str(spec.scale_dtype).removeprefix("torch."),
            }
            tensors[f"{name}.scale"] = rec.quant.scale.contiguous()
            if rec.quant.zero is not None:
                tensors[f"{name}.zero_point"] = rec.quant.zero.to(torch.int8).contiguous()
        if rec.ggml is not None:
            entry["ggml"] = {"type": rec.ggml.qtype, "ftype": rec.ggml.ftype}
            tensors[f"{name}.ggml_blocks"] = rec.ggml.blocks.contiguous()
        layers[name] = entry
    save_tensors_atomic(tensors, Path(path), metadata={"slimkit_layers": json.dumps(layers)})


def merge_compression_states(parts: list[Path], path: Path) -> None:
    """One compression file from several (a streamed run writes one per block)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    layers: dict = {}
    for part in parts:
        with safe_open(str(part), framework="pt") as f:
            layers.update(json.loads((f.metadata() or {})["slimkit_layers"]))
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    save_tensors_atomic(tensors, Path(path), metadata={"slimkit_layers": json.dumps(layers)})


def quantized_layers(path: Path) -> set[str]:
    """The layers a compression state file holds codes for (integer or llama.cpp's), from its header."""
    with CompressionStateReader(path) as state:
        return {name for name, entry in state.layers.items() if "quant" in entry or "ggml" in entry}


def load_compression_state(path: Path, model: torch.nn.Module) -> dict[str, LayerRecord]:
    """Records (masks, quantization codes and parameters) from a compress output dir.

    The codes are recomputed from the saved weights, which lie exactly on their grid.
    """
    with CompressionStateReader(path) as state:
        return {name: state.record(name, model.get_submodule(name).weight) for name in state.layers}


class CompressionStateReader:
    """A compression state file opened for one record at a time (`record(name, weight)`): a
    streamed pack reads only the records of the block it holds."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "CompressionStateReader":
        from safetensors import SafetensorError, safe_open

        from slimkit.errors import SlimkitError

        try:
            self._file = safe_open(str(self.path), framework="pt").__enter__()
            self.layers: dict[str, dict] = json.loads((self._file.metadata() or {})["slimkit_layers"])
            self._keys = set(self._file.keys())
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise SlimkitError(f"{self.path} is corrupt or truncated ({exc})") from None
        return self

    def __exit__(self, *exc) -> None:
        self._file.__exit__(*exc)

    def _tensor(self, key: str) -> torch.Tensor | None:
        return self._file.get_tensor(key) if key in self._keys else None

    def record(self, name: str, weight: torch.Tensor) -> LayerRecord:
        """The record of linear `name`, whose saved weight is `weight`."""
        from slimkit.numerics.ggml_grids import GGMLCodes
        from slimkit.numerics.rtn import QuantParams, QuantSpec, quantize

        entry = self.layers[name]
        shape = tuple(entry["shape"])
        rec = LayerRecord(name, entry["kind"], shape, methods=entry.get("methods", []))
        mask_bits = self._tensor(f"{name}.mask_bits")
        if mask_bits is not None:
            bits = np.unpackbits(mask_bits.numpy())[: int(np.prod(shape))]
            rec.mask = torch.from_numpy(bits.astype(bool)).reshape(shape)
        if "quant" in entry:
            q = entry["quant"]
            spec = QuantSpec(q["bits"], q["symmetric"], q["group_size"], getattr(torch, q["scale_dtype"]),
                             q.get("full_range", False))
            scale, zero = self._tensor(f"{name}.scale"), self._tensor(f"{name}.zero_point")
            zero = zero.to(torch.int32) if zero is not None else None
            rec.quant = QuantParams(spec, quantize(weight.detach().float(), scale, zero, spec), scale, zero)
        if "ggml" in entry:
            rec.ggml = GGMLCodes(entry["ggml"]["type"], entry["ggml"]["ftype"], self._tensor(f"{name}.ggml_blocks"))
        return rec
