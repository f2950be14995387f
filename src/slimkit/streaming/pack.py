"""`slimkit pack` of a model bigger than RAM: one block at a time from the checkpoint's shards.

Each block is read (float32, as the in-memory path loads it), its linears are packed from their
compression records (or in the asked format), and what the packed directory stores for the block
goes to a part file before the block is dropped. The embedding, final norm and head follow; then
`packed.safetensors` is assembled from the parts a slice of rows at a time. The result equals
`formats.pack_dir.pack_to_dir`'s, tensor for tensor; peak memory is one block (or the head).
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from slimkit.compression.pack_dir import check_pack_source, layer_summary, pack_plan, write_pack_summary
from slimkit.formats import PACKED_FILE, pack_model
from slimkit.formats.embedding import can_share_rows, pack_embeddings
from slimkit.formats.pack import FORMAT_VERSION, packed_layer_header, packed_layer_tensors, save_packed_config
from slimkit.io.outputs import output_directory
from slimkit.io.tensors import RowSource, save_tensors_atomic, write_tensors_by_rows
from slimkit.models.streamed import StreamedModel, open_streamed
from slimkit.progress import NoProgress, Progress
from slimkit.recipes.state import CompressionStateReader
from slimkit.streaming.job import streamed_source


def pack_streamed(source: str, output: str | Path, fmt: str, group_size: int = 64, overwrite: bool = False,
                  progress: Progress = NoProgress(), include_lm_head: bool = True) -> dict:
    """`pack_to_dir` with one block in memory at a time; the same directory and summary."""
    streamed = open_streamed(streamed_source(source, progress.note), name=source)
    state_path = check_pack_source(source, streamed.source, fmt)
    linears, head = pack_plan(streamed.adapter, streamed.model, fmt, include_lm_head, state_path)
    parameters = sum(p.numel() for p in streamed.model.parameters())  # the skeleton's, before packing
    pack = _Packing(streamed, fmt, group_size)
    with output_directory(Path(output), overwrite, inputs=[source], command="pack") as tmp:
        pack.parts = tmp / ".parts"
        pack.parts.mkdir()
        with CompressionStateReader(state_path) if state_path else nullcontext() as state:
            pack.state = state
            blocks = list(streamed.adapter.get_blocks(streamed.model))
            for index, block in progress.track(list(enumerate(blocks)), "packing (streamed)"):
                pack.block(index, block, [n for n in linears if n != head and n.startswith(streamed.prefix(block))])
            pack.outer([n for n in linears if not any(n.startswith(streamed.prefix(b)) for b in blocks)], head)
            pack.embeddings()
        header = {"format_version": FORMAT_VERSION, "layers": pack.headers, "tied": pack.tied(),
                  **({"shared_rows": pack.shared} if pack.shared else {}),
                  **({"embeddings": pack.embedding_headers} if pack.embedding_headers else {})}
        write_tensors_by_rows(pack.sources(), tmp / PACKED_FILE, {"slimkit_packed": json.dumps(header)})
        shutil.rmtree(pack.parts)
        save_packed_config(streamed.model, streamed.tokenizer, tmp)
        return write_pack_summary(source, fmt, linears, dict(pack.summaries), tmp, parameters)


class _Packing:
    """The state of one streamed pack: what each part file holds, and the packed layers' headers."""

    def __init__(self, streamed: StreamedModel, fmt: str, group_size: int):
        self.streamed, self.fmt, self.group_size = streamed, fmt, group_size
        self.model: nn.Module = streamed.model
        self.parts: Path = Path()
        self.state: CompressionStateReader | None = None
        self.headers: dict[str, dict] = {}
        self.summaries: dict[str, dict] = {}
        self.in_parts: dict[str, Path] = {}  # tensor name -> the part file holding it
        self.packed_names: list[str] = []
        self.shared: dict[str, str] = {}  # an embedding read from the head tied to it -> the head
        self.embedding_headers: dict[str, dict] = {}  # an untied embedding packed on its own

    def _pack(self, names: list[str], fmt: str, records: bool) -> dict[str, torch.Tensor]:
        """Pack the (materialized) linears `names`; the originals are put back. Returns their tensors."""
        originals = {n: self.model.get_submodule(n) for n in names}
        recs = ({n: self.state.record(n, m.weight) for n, m in originals.items() if n in self.state.layers}
                if records and self.state is not None else None)
        packed = pack_model(self.model, originals, recs, fmt, self.group_size)
        tensors: dict[str, torch.Tensor] = {}
        for name, mod in packed.items():
            tensors.update(packed_layer_tensors(name, mod))
            self.headers[name], self.summaries[name] = packed_layer_header(mod), layer_summary(mod)
            embedding = self.model.get_input_embeddings()
            if mod.meta.get("tied_to") and can_share_rows(embedding, mod):  # one matrix for both
                self.shared = {mod.meta["tied_to"].removesuffix(".weight"): name}
            elif mod.meta.get("tied_to"):
                self.model.config.tie_word_embeddings = False  # the head is packed on its own
        self.packed_names += list(packed)
        for name, module in originals.items():
            self.model.set_submodule(name, module)
        return tensors

    def block(self, index: int, block: nn.Module, names: list[str]) -> None:
        """Block `index` packed into its part file: its packed linears and its other tensors."""
        self.streamed.materialize(block)
        part = self.parts / f"block-{index:05d}.safetensors"
        tensors = self._pack(names, self.fmt, True)
        prefix = self.streamed.prefix(block)
        tensors.update({prefix + k: v for k, v in _dense_state(block).items()
                        if not any((prefix + k).startswith(n + ".") for n in names if n in self.headers)})
        save_tensors_atomic(tensors, part)
        self.in_parts.update(dict.fromkeys(tensors, part))
        self.streamed.release(block)

    def outer(self, names: list[str], head: str | None) -> None:
        """The linears outside the blocks (an LM head): packed in `fmt`, or int8 for a 4-bit head."""
        todo = [(n, self.fmt) for n in names if n != head] + ([(head, "int8")] if head else [])
        for name, fmt in todo:
            module = self.model.get_submodule(name)
            owner = self._weight_owner(module)
            self.streamed.materialize(owner)
            if owner is not module:  # materializing gave the embedding a new parameter: tie it again
                module.weight = owner.weight
            part = self.parts / f"outer-{name}.safetensors"
            tensors = self._pack([name], fmt, fmt == self.fmt)
            save_tensors_atomic(tensors, part)
            self.in_parts.update(dict.fromkeys(tensors, part))
            self.streamed.release(owner)
            self.streamed.release(module)

    def embeddings(self) -> None:
        """An untied embedding whose record holds llama.cpp blocks (a quantize_outer step): packed
        on its own, as `pack_embeddings` packs it in memory."""
        if self.state is None:
            return
        for name, module in self.streamed.adapter.embedding_modules(self.model).items():
            if name not in self.state.layers or "ggml" not in self.state.layers[name]:
                continue
            self.streamed.materialize(module)
            packed = pack_embeddings(self.model, {name: self.state.record(name, module.weight)})
            tensors = packed_layer_tensors(name, packed[name].table)
            self.embedding_headers[name] = packed_layer_header(packed[name].table)
            self.summaries[name] = layer_summary(packed[name].table)
            part = self.parts / f"embedding-{name}.safetensors"
            save_tensors_atomic(tensors, part)
            self.in_parts.update(dict.fromkeys(tensors, part))
            self.model.set_submodule(name, module)
            self.streamed.release(module)
            self.packed_names.append(name)

    def _weight_owner(self, module: nn.Module) -> nn.Module:
        """The module whose checkpoint tensor `module.weight` is (a tied head's is the embedding)."""
        for m in self.streamed.adapter.embedding_modules(self.model).values():
            if m.weight is module.weight:
                return m
        return module

    def _outer_dense(self) -> dict[str, str]:
        """Dense names outside the blocks that the file stores -> the checkpoint tensor each is read from."""
        blocks = self.streamed.prefix(self.streamed.adapter.get_blocks(self.model))
        first: dict[int, str] = {}
        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if name.startswith(blocks) or any(name.startswith(n + ".") for n in [*self.packed_names, *self.shared]):
                continue
            out.setdefault(name, first.setdefault(id(p), name))
        return out

    def tied(self) -> dict[str, str]:
        return {name: src for name, src in self._outer_dense().items() if name != src}

    def sources(self) -> dict[str, RowSource]:
        """Every tensor of packed.safetensors, each read a slice of rows at a time."""
        out: dict[str, RowSource] = {}
        for name, part in self.in_parts.items():
            with safe_open(str(part), framework="pt") as f:
                view = f.get_slice(name)
                shape, dtype = tuple(view.get_shape()), _DTYPES[view.get_dtype()]
            out[name] = RowSource(shape, dtype, lambda a, b, part=part, name=name: _part_rows(part, name, a, b))
        shards = self.streamed.shards
        for name, src in self._outer_dense().items():
            if name == src:
                out[name] = RowSource(tuple(shards.shapes[src]), self.streamed.compute_dtype,
                                      lambda a, b, src=src: shards.rows(src, a, b, self.streamed.compute_dtype))
        blocks = self.streamed.prefix(self.streamed.adapter.get_blocks(self.model))
        for name, buffer in _dense_buffers(self.model).items():
            if not name.startswith(blocks):
                out[name] = RowSource(tuple(buffer.shape), buffer.dtype, lambda a, b, t=buffer: t if t.dim() == 0
                                      else t[a:b])
        return out


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _part_rows(part: Path, name: str, start: int, stop: int) -> torch.Tensor:
    with safe_open(str(part), framework="pt") as f:
        view = f.get_slice(name)
        return view[:] if not view.get_shape() else view[start:stop]


def _dense_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are not in the checkpoint but computed (rotary inv_freq): the packed file keeps them."""
    state = set(module.state_dict())
    return {k: b for k, b in module.named_buffers() if b is not None and k not in state}


def _dense_state(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's own tensors as `save_packed` stores them (state dict and computed buffers)."""
    return {k: t.detach().contiguous() for k, t in {**block.state_dict(), **_dense_buffers(block)}.items()}
