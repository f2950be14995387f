"""Packed storage and the kernels that execute it: each format replaces `nn.Linear`.

int8 (weight-only), w8a8 (dynamic int8 activations), int4 (groups, two per byte), nf4
(blocks of 64, double quantization), fp8 (E4M3, simulated on CPU), sparse (bitmask or CSR)
2:4 (alone or with int8/int4 values) and ggml (llama.cpp's blocks, as the GGUF export writes them). `pack_model` swaps them in; `save_packed` /
`load_packed` write and read a packed model directory.
"""

from slimkit.formats import floating, ggml, integer, sparse  # noqa: F401  (registers the formats)
from slimkit.formats.base import PackedLinear, format_class, format_names
from slimkit.formats.pack import PACKED_FILE, load_packed, pack_linear, pack_model, packed_layers, save_packed

__all__ = ["PackedLinear", "format_class", "format_names", "PACKED_FILE", "load_packed", "pack_linear",
           "pack_model", "packed_layers", "save_packed"]
