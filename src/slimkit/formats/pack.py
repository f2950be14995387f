"""Swap a model's linears for packed modules, and save / load a packed model directory.

A packed directory is config.json + tokenizer files + `packed.safetensors`: the dense tensors
the formats do not cover (embeddings, norms, an unpacked head) under their usual names, each
packed linear's tensors under `<linear>.<tensor>`, and a header entry `slimkit_packed` (JSON)
naming every packed linear's format (and, as `shared_rows`, an embedding that reads its rows from
the head tied to it; as `embeddings`, an untied embedding packed on its own: `embedding.py`). Only safetensors are read: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from slimkit.errors import SlimkitError, WeightsError
from slimkit.formats.base import PackedLinear, format_class
from slimkit.formats.embedding import PackedEmbedding, RowsOfHead, row_scale, share_tied_rows
from slimkit.formats.kernel_rows import choose_kernel_rows
from slimkit.io.tensors import unique_tensors
from slimkit.models.loading import register_directory_reader
from slimkit.paths import PackedDir

PACKED_FILE = PackedDir.WEIGHTS
FORMAT_VERSION = 1
AUTO = "auto"


def is_24(mask: torch.Tensor | None) -> bool:
    if mask is None or mask.shape[-1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def pack_linear(module: nn.Linear, record=None, fmt: str = AUTO, group_size: int = 64) -> PackedLinear | None:
    """The packed replacement of one linear, or None when it should stay dense.

    auto: from what compression recorded (quantized codes, masks); an explicit format
    quantizes the current weight round-to-nearest in that format.
    """
    w, bias = module.weight.detach().float(), module.bias
    mask = record.mask if record is not None else None
    quant = record.quant if record is not None else None
    if fmt != AUTO:
        cls = format_class(fmt)
        if fmt in ("sparse", "2:4"):
            return cls.from_dense(w, bias, mask=mask)
        return cls.from_dense(w, bias, group_size=group_size)
    if record is not None and record.ggml is not None:  # llama.cpp blocks, exactly as decided
        return format_class("ggml").from_codes(record.ggml, w.shape[1], bias)
    if quant is not None:
        spec = quant.spec
        if is_24(mask):
            try:
                return format_class("2:4").from_dense(w, bias, mask=mask, quant=quant)
            except NotImplementedError:  # e.g. asymmetric codes under a 2:4 mask: no packed format
                return None
        if spec.bits == 8 and spec.symmetric and quant.scale.shape[1] == 1:
            return format_class("int8").from_quant(quant.q, quant.scale, bias)
        if spec.bits <= 4:
            return format_class("int4").from_quant(quant.q, quant.scale, quant.zero, bias, bits=spec.bits)
        return None  # 5-7 bits or grouped int8: no packed format; stays dense (reported)
    if mask is not None:
        return format_class("2:4" if is_24(mask) else "sparse").from_dense(w, bias, mask=mask)
    return None


def pack_model(model: nn.Module, modules: dict[str, nn.Linear], records: dict | None = None, fmt: str = AUTO,
               group_size: int = 64, progress=None) -> dict[str, PackedLinear]:
    """Replace the given linears in place; returns the packed ones by name."""
    packed: dict[str, PackedLinear] = {}
    items = list(modules.items())
    if progress is not None:
        items = progress.track(items, "packing")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_name = next((n for n, m in model.named_modules() if m is embedding), None)
    for name, module in items:
        new = pack_linear(module, (records or {}).get(name), fmt, group_size)
        if new is not None:
            if embedding is not None and module.weight is getattr(embedding, "weight", None):
                new.meta["tied_to"] = f"{embedding_name}.weight"  # packed apart; the embedding stays dense
            model.set_submodule(name, new)
            packed[name] = new
    choose_kernel_rows(packed.values())  # kernel or dequantize + GEMM, by rows, as measured here
    return packed


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def packed_layer_tensors(name: str, mod: PackedLinear) -> dict[str, torch.Tensor]:
    """What a packed directory stores for one packed linear, under `<name>.<tensor>`."""
    tensors = {f"{name}.{key}": t.contiguous() for key, t in mod.stored().items()}
    if mod.bias is not None:
        tensors[f"{name}.bias"] = mod.bias.detach().contiguous()
    return tensors


def packed_layer_header(mod: PackedLinear) -> dict:
    """The header entry of one packed linear: its format, shape and the format's own fields."""
    return {"format": mod.format, "shape": [mod.out_features, mod.in_features], **mod.meta}


def save_packed(model: nn.Module, tokenizer, directory: Path) -> None:
    """Write a packed model into `directory` (the caller makes it atomic)."""
    layers = packed_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in layers.items():
        tensors.update(packed_layer_tensors(name, mod))
    shared = share_tied_rows(model, layers)  # a head tied to the embedding: one matrix for both
    if not shared and any(m.meta.get("tied_to") for m in layers.values()):
        model.config.tie_word_embeddings = False  # the head is packed on its own; the embedding stays
    embeddings = {n: m.table for n, m in model.named_modules() if isinstance(m, PackedEmbedding)}
    for name, table in embeddings.items():
        tensors.update(packed_layer_tensors(name, table))
    state = dict(model.state_dict())
    persistent = set(state)
    # non-persistent buffers (rotary inv_freq) too: loading builds the skeleton on the meta device
    state.update({k: b for k, b in model.named_buffers() if b is not None and k not in persistent})
    dense, tied = unique_tensors((k, t) for k, t in state.items() if not any(k.startswith(n + ".") for n in layers))
    tensors.update({k: t.detach().contiguous() for k, t in dense.items()})
    header = {"format_version": FORMAT_VERSION, "layers": {n: packed_layer_header(m) for n, m in layers.items()},
              "tied": tied, **({"shared_rows": shared} if shared else {}),
              **({"embeddings": {n: packed_layer_header(t) for n, t in embeddings.items()}} if embeddings else {})}
    save_file(tensors, str(directory / PACKED_FILE), metadata={"slimkit_packed": json.dumps(header)})
    save_packed_config(model, tokenizer, directory)


def save_packed_config(model: nn.Module, tokenizer, directory: Path) -> None:
    """config.json (with the architecture that loading picks), generation config and tokenizer."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]  # so that loading picks the same head
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def read_packed_file(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header and tensors of a packed.safetensors, with a clear error for a damaged file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("slimkit_packed", "null"))
            # clone: tensors read from the file may sit at any offset, and the int8/int4 kernels
            # crash on memory that is not 64-byte aligned; torch's allocator aligns
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise SlimkitError(f"{path} is corrupt or truncated ({exc}); re-run `slimkit pack` to rewrite it") from None
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        raise SlimkitError(f"{path} has no slimkit_packed header of version {FORMAT_VERSION}: not a slimkit packed model")
    return header, tensors


def _materialize_skeleton(model: nn.Module) -> None:
    """Give the meta-device parameters and buffers outside the packed layers real (empty) CPU
    storage; the packed layers already hold their tensors."""
    inside = {id(m) for p in packed_layers(model).values() for m in p.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device="cpu")


def tie_existing(model: nn.Module) -> None:
    """transformers' ties (`_tied_weights_keys`: target -> source) between parameters that both still
    exist, for a model where packing replaced one tied side (BERT's head bias stays tied to its own)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
        if target in params and source in params:
            module, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(module), leaf, params[source])


def _packed_layer(file: Path, model: nn.Module, name: str, meta: dict, tensors: dict) -> PackedLinear:
    """One packed linear, checked against the config's skeleton and executed once on zeros:
    a layer name, shape or dtype that disagrees is refused here, not at the first forward."""
    try:
        skeleton = model.get_submodule(name)
    except AttributeError:
        raise WeightsError(f"{file}: packed layer {name} does not exist in the model config.json describes") from None
    expected = list(skeleton.weight.shape) if isinstance(skeleton, nn.Linear) else None
    if expected is None or list(meta.get("shape", [])) != expected:
        raise WeightsError(f"{file}: packed layer {name} has shape {meta.get('shape')}, but config.json "
                           f"makes it {expected or type(skeleton).__name__}")
    prefix = name + "."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    bias = own.pop("bias", None)
    if bias is not None and (not bias.is_floating_point() or list(bias.shape) != expected[:1]):
        raise WeightsError(f"{file}: {name}.bias is {bias.dtype} {list(bias.shape)}, expected float {expected[:1]}")
    nonfinite = [k for k, v in own.items() if v.is_floating_point() and not bool(torch.isfinite(v.float()).all())]
    if nonfinite:
        raise WeightsError(f"{file}: layer {name} has non-finite values in {', '.join(nonfinite)}")
    try:
        module = format_class(meta["format"]).from_stored(own, meta, bias)
        again = module.stored()
        out = module(torch.zeros(1, expected[1]))
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError, ArithmeticError) as exc:
        raise WeightsError(f"{file}: layer {name} ({meta.get('format')}) is damaged: {exc}") from None
    wrong = [f"{k}: {v.dtype} {list(v.shape)} (expected {again[k].dtype} {list(again[k].shape)})"
             for k, v in own.items() if k in again and (v.dtype != again[k].dtype or v.shape != again[k].shape)]
    if wrong or set(own) != set(again) or list(out.shape) != [1, expected[0]]:
        raise WeightsError(f"{file}: layer {name} ({meta['format']}) does not hold its format's tensors: "
                           f"{'; '.join(wrong) or sorted(set(own) ^ set(again))}")
    return module


def _packed_embedding(file: Path, model: nn.Module, name: str, meta: dict, tensors: dict,
                      dtype: torch.dtype) -> PackedEmbedding:
    """An untied embedding stored packed, checked against the config's skeleton."""
    skeleton = model.get_submodule(name) if name in dict(model.named_modules()) else None
    expected = [skeleton.num_embeddings, skeleton.embedding_dim] if isinstance(skeleton, nn.Embedding) else None
    if expected is None or list(meta.get("shape", [])) != expected:
        raise WeightsError(f"{file}: packed embedding {name} has shape {meta.get('shape')}, but config.json "
                           f"makes it {expected or type(skeleton).__name__}")
    own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    try:
        table = format_class(meta["format"]).from_stored(own, meta, None)
    except (KeyError, RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise WeightsError(f"{file}: embedding {name} ({meta.get('format')}) is damaged: {exc}") from None
    if not table.gathers_rows:
        raise WeightsError(f"{file}: embedding {name} is stored as {meta['format']}, whose rows cannot be gathered")
    return PackedEmbedding(table, dtype)


def load_packed(directory: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    from slimkit.models.checks import is_causal_lm, load_config
    from slimkit.models.layouts import as_linears

    header, tensors = read_packed_file(directory / PACKED_FILE)
    config = load_config(directory)
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForCausalLM if is_causal_lm(archs) else AutoModel
    with torch.device("meta"):  # no fp32 weights allocated only to be replaced: peak RSS stays low
        model = auto.from_config(config, dtype=dtype, trust_remote_code=False).eval()
    as_linears(model)  # packed experts: one packed linear per expert projection; no Conv1D
    for name, meta in header["layers"].items():
        model.set_submodule(name, _packed_layer(directory / PACKED_FILE, model, name, meta, tensors))
    for embedding, head in header.get("shared_rows", {}).items():  # rows read from the head
        scale = row_scale(model.get_submodule(embedding))  # Gemma's; its value comes with the saved buffers
        model.set_submodule(embedding, RowsOfHead(model.get_submodule(head), dtype, scale))
    for name, meta in header.get("embeddings", {}).items():
        model.set_submodule(name, _packed_embedding(directory / PACKED_FILE, model, name, meta, tensors, dtype))
    packed_names = [*header["layers"], *header.get("embeddings", {})]
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in packed_names)}
    state = model.state_dict()  # floating tensors of any float dtype; others (a hash-routing table) exactly
    bad = [f"{k}: {v.dtype} {list(v.shape)}" for k, v in rest.items() if k in state and (
           v.shape != state[k].shape or (v.dtype != state[k].dtype and not (
               v.is_floating_point() and state[k].is_floating_point())))]
    if bad:
        raise WeightsError(f"{directory / PACKED_FILE}: dense tensors that disagree with config.json: {', '.join(bad[:3])}")
    _materialize_skeleton(model)
    buffers = dict(model.named_buffers())
    for key in [k for k in rest if k in buffers and k not in model.state_dict()]:
        buffers[key].copy_(rest.pop(key))  # non-persistent buffers, saved with the model
    for module in model.modules():  # rotary embeddings keep an alias of their original inv_freq
        if hasattr(module, "original_inv_freq") and hasattr(module, "inv_freq"):
            module.original_inv_freq = module.inv_freq.clone()
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k not in header["tied"] and not any(k.startswith(n + ".") for n in packed_names)]
    if missing or unexpected:
        raise SlimkitError(f"{directory / PACKED_FILE} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if header["tied"]:
        try:
            model.tie_weights()
        except (ValueError, AttributeError) as exc:  # a tie naming a weight packing replaced (BERT's head, the
            # embedding's rows; Zamba's embedding beside its shared blocks): tie what is still a parameter
            if "tie_weights_keys" not in str(exc) and "neither a parameter" not in str(exc):
                raise
            tie_existing(model)
    choose_kernel_rows(packed_layers(model).values())
    return model


register_directory_reader(PACKED_FILE, load_packed)  # `load_model` reads packed directories
