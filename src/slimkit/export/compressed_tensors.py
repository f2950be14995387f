"""Export to the compressed-tensors format (what vLLM loads), with that library's packer and schema.

- int4 / int8 weight-only -> `pack-quantized`: `weight_packed` int32 [out, in*bits/32] (codes
  offset by 2^(bits-1), element i at bit i*bits), `weight_scale` [out, in/group],
  `weight_shape`, and `weight_zero_point` for asymmetric codes;
- W8A8 -> `int-quantized`: int8 `weight`, `weight_scale` [out, 1], dynamic per-token
  activations.
A layer the checkpoint stores as transformers' Conv1D (GPT-2: weight [in, out]) keeps that
orientation: every tensor above transposed, and its groups of `g` inputs per output described as
`block` quantization with blocks of [g, 1] (int8: [the gcd of the input widths, 1], the column's
scale repeated).
transformers loads such a checkpoint decompressed (`CompressedTensorsConfig(dequantize=True)`: it
runs compressed nn.Linear only) and decompresses every layer with one scheme, so a layer of
another scheme (an int8 head beside int4 blocks) is written dense.
One config group per distinct scheme, targeting the layers by name. Sparse layouts are refused:
compressed-tensors and vLLM removed their sparse formats in 2026.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimkit.errors import SlimkitError, UnsupportedArchitectureError
from slimkit.formats import PackedLinear, packed_layers
from slimkit.io.tensors import unique_tensors
from slimkit.models.experts import checkpoint_names, expert_modules
from slimkit.models.layouts import checkpoint_conv1d
from slimkit.paths import ExportDir

DENSE = ("dense",)  # the scheme of a layer written dense: llama.cpp's blocks (a head typed by quantize_outer)
REFUSED = {
    "ggml": "llama.cpp's blocks (a gguf_quantize recipe) have no compressed-tensors scheme. Export with "
            "`--to gguf`, or `--to hf` (dense).",
    "2:4": "compressed-tensors and vLLM removed their sparse formats in 2026, so a 2:4 model cannot be "
           "carried sparse. Use `--to hf` (dense, masks applied) for any runtime, or keep slimkit's "
           "packed format (`slimkit pack`).",
    "sparse": "compressed-tensors and vLLM removed their sparse formats in 2026. Use `--to hf` (dense, "
              "masks applied) or slimkit's packed format.",
    "nf4": "compressed-tensors has no NF4 scheme. Use `--to hf` (dense), or repack as int4 "
           "(`slimkit pack MODEL --format int4`) for pack-quantized.",
    "fp8": "FP8 export (float-quantized) is not implemented yet: use `--to hf`, or int8/int4.",
}


def _scheme(mod: PackedLinear, conv1d: bool, int8_rows: int = 0) -> tuple:
    """(format, bits, symmetric, strategy, group size or block shape) of one layer's config group."""
    if mod.format == "int4":
        bits, symmetric = int(mod.meta.get("bits", 4)), mod.zero is None
        if conv1d:
            return ("pack-quantized", bits, symmetric, "block", (mod.group or mod.in_features, 1))
        return ("pack-quantized", bits, symmetric, "group" if mod.group else "channel", mod.group)
    if mod.format == "int8":
        # per output = per column of [in, out]: blocks of [int8_rows, 1], the column's scale repeated
        return ("pack-quantized", 8, True, "block", (int8_rows, 1)) if conv1d else \
            ("pack-quantized", 8, True, "channel", None)
    if mod.format == "w8a8" and conv1d:
        raise SlimkitError("W8A8 layers held as transformers Conv1D (GPT-2) have no compressed-tensors form that "
                           "transformers runs: export with `--to hf` (dense), or pack as int8/int4 instead.")
    if mod.format == "w8a8":
        return ("int-quantized", 8, True, "channel", None)
    if mod.format == "ggml":
        return DENSE
    raise SlimkitError(f"cannot export {mod.format} layers to compressed-tensors: {REFUSED[mod.format]}")


def _tensors(name: str, mod: PackedLinear, dtype: torch.dtype, conv1d: bool, int8_rows: int = 0
             ) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    def oriented(t: torch.Tensor) -> torch.Tensor:  # slimkit's [out, ...] -> a Conv1D checkpoint's [..., out]
        return t.T.contiguous() if conv1d else t

    out: dict[str, torch.Tensor] = {}
    shape = [mod.in_features, mod.out_features] if conv1d else [mod.out_features, mod.in_features]
    if mod.format == "int4":
        bits = int(mod.meta.get("bits", 4))
        codes = mod.codes()  # signed codes (symmetric) or u - zero, as float
        if mod.zero is None:
            q = codes.to(torch.int8)
        else:  # compressed-tensors stores asymmetric codes offset like symmetric ones: u - 2^(b-1)
            half = 1 << (bits - 1)
            q = (mod.nibbles().to(torch.int16) - half).to(torch.int8)
            zero = oriented((mod.zero.to(torch.int16) - half).to(torch.int8))
            # group and channel zero points are packed too, along the output dimension (block ones are not)
            out[f"{name}.weight_zero_point"] = zero if conv1d else pack_to_int32(zero, bits, packed_dim=0)
        out[f"{name}.weight_packed"] = pack_to_int32(oriented(q), bits)
        out[f"{name}.weight_scale"] = oriented(mod.scale.to(dtype))
        out[f"{name}.weight_shape"] = torch.tensor(shape, dtype=torch.int32)
    elif mod.format == "int8":
        out[f"{name}.weight_packed"] = pack_to_int32(oriented(mod.q), 8)
        blocks = mod.in_features // int8_rows if conv1d else 1
        out[f"{name}.weight_scale"] = oriented(mod.scale.reshape(-1, 1).to(dtype).expand(-1, blocks))
        out[f"{name}.weight_shape"] = torch.tensor(shape, dtype=torch.int32)
    else:  # w8a8
        out[f"{name}.weight"] = mod.q
        out[f"{name}.weight_scale"] = mod.scale.reshape(-1, 1).to(dtype)
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias.to(dtype)
    return out


def _config(groups: dict[tuple, list[str]], ignore: list[str]) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    formats = {key[0] for key in groups}
    if len(formats) > 1:
        raise SlimkitError("compressed-tensors takes one format per checkpoint; this model mixes "
                           f"{sorted(formats)} (e.g. W8A8 and weight-only layers)")
    config_groups = {}
    for i, ((fmt, bits, symmetric, strategy, size), names) in enumerate(sorted(groups.items(), key=str)):
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                                   group_size=size if strategy == "group" else None,
                                   block_structure=list(size) if strategy == "block" else None)
        acts = None
        if fmt == "int-quantized":
            acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=weights, input_activations=acts)
    cfg = QuantizationConfig(config_groups=config_groups, format=formats.pop(), quantization_status="compressed",
                             ignore=ignore)
    return json.loads(cfg.model_dump_json())


def checkpoint_key(model: torch.nn.Module):
    """slimkit's tensor or module name -> the checkpoint's (MoE experts are named as the model type's
    checkpoints name them; any other model keeps its names)."""
    names = checkpoint_names(model) if expert_modules(model) else {}

    def key(name: str, suffix: str = "") -> str:
        return names.get(name + suffix, name + suffix).removesuffix(suffix) if suffix else names.get(name, name)
    return key


def refuse_converted_dense(model: torch.nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Refuse a model type whose checkpoints store dense tensors in another layout than the model holds
    them (Kimi-Linear: one conv1d in the model, q/k/v convolutions on disk): transformers' conversion
    is not applied to what this writer saves, and the export would not load."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        on_disk = set(revert_weight_conversion(model, dict(dense)))
    except (ValueError, RuntimeError, KeyError, IndexError):
        return  # a conversion that needs the packed layers too: the experts' names (checkpoint_key) cover it
    changed = sorted(set(dense) - on_disk)
    if len(on_disk) != len(dense):  # tensors split or merged on disk; renames alone load either way
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: its checkpoints store {len(changed)} dense tensors in another layout than "
            f"the model holds them ({', '.join(changed[:2])}, ...), which slimkit's compressed-tensors writer does "
            "not convert yet; export it with --to hf")


def _written_dense(schemes: dict[str, tuple], conv1d: set[str]) -> list[str]:
    """The packed layers of a Conv1D model that are written dense. transformers loads such a model
    decompressed, and decompresses every layer with one config group's scheme (its first), so only
    the Conv1D layers' commonest scheme stays packed (an int8 head beside int4 blocks goes dense)."""
    kept = Counter(s for n, s in schemes.items() if n in conv1d).most_common(1)
    return [n for n, s in schemes.items() if s != kept[0][0]] if kept else []


def _dense_tensors(name: str, mod: PackedLinear, dtype: torch.dtype, conv1d: bool) -> dict[str, torch.Tensor]:
    weight = mod.dequantize()
    out = {f"{name}.weight": (weight.T if conv1d else weight).to(dtype).contiguous()}
    if mod.bias is not None:
        out[f"{name}.bias"] = mod.bias.to(dtype)
    return out


def export_plan(model: torch.nn.Module) -> tuple[dict[str, PackedLinear], set[str], int, dict[str, tuple]]:
    """(packed layers, those the checkpoint holds as Conv1D, the int8 block height of Conv1D layers,
    each layer's scheme); raises what the export refuses, so `slimkit export` says it before its
    reference ppl."""
    layers = packed_layers(model)
    if not layers:
        raise SlimkitError("nothing quantized to export: compressed-tensors needs an int4/int8/W8A8 model "
                           "(`slimkit compress ... -r rtn-int4-g64`, or `slimkit pack MODEL --format int4`)")
    conv1d = set(checkpoint_conv1d(model))
    # one int8 block height for every Conv1D layer (one config group: see `_written_dense`)
    int8_rows = math.gcd(*(m.in_features for n, m in layers.items() if n in conv1d and m.format == "int8"))
    schemes = {name: _scheme(mod, name in conv1d, int8_rows) for name, mod in layers.items()}
    if all(s == DENSE for s in schemes.values()):
        raise SlimkitError(f"cannot export ggml layers to compressed-tensors: {REFUSED['ggml']}")
    refuse_converted_dense(model, {k: t for k, t in model.state_dict().items()
                                   if not any(k.startswith(n + ".") for n in layers)})
    return layers, conv1d, int8_rows, schemes


def unloadable_in_transformers(schemes: dict[str, tuple]) -> list[str]:
    """The layers whose zero points compressed-tensors packs (asymmetric group / channel codes):
    the pinned transformers cannot load those (it makes room for them unpacked, then unpacks)."""
    return [n for n, s in schemes.items() if s != DENSE and not s[2] and s[3] in ("group", "channel")]


def export_compressed_tensors(model: torch.nn.Module, tokenizer, directory: Path, all_linears: list[str],
                              dtype: torch.dtype = torch.bfloat16) -> dict:
    layers, conv1d, int8_rows, schemes = export_plan(model)
    key = checkpoint_key(model)
    dense_layers = _written_dense(schemes, conv1d) + [n for n, s in schemes.items() if s == DENSE]
    groups: dict[tuple, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in layers.items():
        if name in dense_layers:
            tensors.update(_dense_tensors(key(name, ".weight"), mod, dtype, name in conv1d))
            continue
        groups.setdefault(schemes[name], []).append(key(name, ".weight"))
        tensors.update(_tensors(key(name, ".weight"), mod, dtype, name in conv1d, int8_rows))
    dense, _ = unique_tensors((k, t) for k, t in model.state_dict().items()
                              if not any(k.startswith(n + ".") for n in layers))
    for name, t in dense.items():
        if name.endswith(".weight") and name.removesuffix(".weight") in conv1d:
            t = t.T  # a Conv1D left dense: the checkpoint holds it [in, out]
        tensors[key(name)] = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
    config = model.config
    if any(m.meta.get("tied_to") for m in layers.values()) or "lm_head" in layers:
        config.tie_word_embeddings = False
    ignore = [key(n, ".weight") for n in [*(n for n in all_linears if n not in layers), *dense_layers]]
    config.quantization_config = _config(groups, ignore)
    config.dtype = dtype
    save_file(tensors, str(directory / ExportDir.WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(directory)
    del config.quantization_config
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"format": config_format(directory), "layers": len(layers) - len(dense_layers),
            "written_dense": dense_layers}


def config_format(directory: Path) -> str:
    return json.loads((directory / "config.json").read_text())["quantization_config"]["format"]
