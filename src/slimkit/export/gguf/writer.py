"""`export_gguf`: a model (packed or dense) as one GGUF file llama.cpp runs, with the `gguf`
package's writer and name maps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slimkit.errors import SlimkitError
from slimkit.export.gguf.architectures import check_architecture, gguf_arch
from slimkit.export.gguf.description import copy_from_gguf, describe_from_hf
from slimkit.export.gguf.hparams import write_hparams
from slimkit.export.gguf.tensors import (
    TensorQueue,
    bias_of,
    expert_projections,
    expert_weights,
    model_weights,
    stacked_experts,
    stored_tensor,
)
from slimkit.export.gguf.tokenizer import check_tokenizer, tokenizer_from_hf
from slimkit.export.gguf.types import plan_types
from slimkit.formats import packed_layers
from slimkit.formats.ggml import GGMLBlocks
from slimkit.models.adapters import adapter_for


@dataclass(frozen=True)
class GGUFWritten:
    tensors_by_type: dict[str, int]  # "Q4_0 (codes kept)", "Q6_K", "F32", ... -> tensors
    bytes: int  # the whole file: tensors, tokenizer, metadata
    parameters: int  # the model's (a tied embedding and head once)

    @property
    def bits_per_weight(self) -> float:
        """The whole file's bits per parameter, what a user ships (llama.cpp's BPW counts tensors only)."""
        return self.bytes * 8 / self.parameters


def check_gguf_export(model: torch.nn.Module, tokenizer, source_gguf: Path | None) -> None:
    """What would make the export fail, checked before any heavy work: the architecture, and a
    tokenizer llama.cpp can name (unless it is copied from the source GGUF)."""
    check_architecture(model)
    if source_gguf is None:
        if tokenizer is None:
            raise SlimkitError("GGUF export needs the tokenizer: this model directory has none")
        check_tokenizer(tokenizer)


def _llama_name(names, module_name: str) -> str:
    gname = names.get_name(module_name)
    if gname is None:
        raise SlimkitError(f"GGUF export: no llama.cpp name for {module_name}")
    return gname


def _queue_tensors(model: torch.nn.Module, names, plan, dense_blocks: dict) -> TensorQueue:
    """Every tensor in its type, experts stacked; gguf_quantize blocks recorded for tensors that are
    not packed linears (the embedding) are kept like the packed ones."""
    config, packed, queue = model.config, packed_layers(model), TensorQueue()
    for w in model_weights(model, packed, plan, adapter_for(model).module_roles(model)):
        if w.packed is None and w.name in dense_blocks:
            w = type(w)(w.name, w.module, w.weight, GGMLBlocks.from_codes(dense_blocks[w.name], w.weight.shape[1]),
                        w.role)
        gname = _llama_name(names, w.name)
        queue.add(gname + ".weight", stored_tensor(w, plan, config))
        bias = bias_of(w, config)
        if bias is not None:
            queue.add_bias(gname + ".bias", bias)
    for stacked_name, experts in expert_projections(model).items():
        gname = _llama_name(names, stacked_name)
        queue.add(gname + ".weight", stacked_experts(gname, expert_weights(model, experts, packed), plan, config),
                  tensors=len(experts))
    return queue


def export_gguf(model: torch.nn.Module, tokenizer, path: Path, qtype: str = "auto",
                source_gguf: Path | None = None, source_dir: Path | None = None, dense_blocks: dict | None = None
                ) -> GGUFWritten:
    """`model` as a GGUF at `path`. Tokenizer and model description come from `source_gguf` when
    the model came from one (copied exactly), else from `tokenizer` and the HF dir `source_dir`.
    `dense_blocks`: llama.cpp blocks a gguf_quantize step recorded for tensors that are not packed
    linears (the embedding), written as they are like the packed ones."""
    import gguf

    check_gguf_export(model, tokenizer, source_gguf)
    config = model.config
    arch = gguf.MODEL_ARCH[gguf_arch(config).name]
    packed = packed_layers(model)
    plan = plan_types(model, packed, qtype)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    write_hparams(writer, config, packed, plan)
    if source_gguf is not None:
        copy_from_gguf(writer, source_gguf)
    else:
        tokenizer_from_hf(writer, tokenizer, model.get_input_embeddings().num_embeddings)
        describe_from_hf(writer, source_dir, sum(p.numel() for p in model.parameters()))
    queue = _queue_tensors(model, gguf.get_tensor_name_map(arch, config.num_hidden_layers), plan, dense_blocks or {})
    queue.write_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFWritten(queue.counts, path.stat().st_size, sum(p.numel() for p in model.parameters()))


TENSOR_INFO_BYTES = 96  # a tensor's entry in the header (name, dims, type, offset) and its alignment, at most


def metadata_bytes(model: torch.nn.Module, tokenizer) -> int:
    """What a GGUF of `model` spends outside its tensors' data: the header, hyper-parameters and
    tokenizer written for real to a scratch file, and TENSOR_INFO_BYTES per tensor (a bound)."""
    import tempfile

    import gguf

    check_gguf_export(model, tokenizer, None)
    config = model.config
    arch = gguf.MODEL_ARCH[gguf_arch(config).name]
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
        write_hparams(writer, config, {}, plan_types(model, {}, "f32"))
        tokenizer_from_hf(writer, tokenizer, model.get_input_embeddings().num_embeddings)
        describe_from_hf(writer, None, sum(p.numel() for p in model.parameters()))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        header = path.stat().st_size
    return header + TENSOR_INFO_BYTES * len(dict(model.named_parameters()))
