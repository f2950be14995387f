"""Models bigger than RAM: a skeleton on the meta device whose weights are read from the
checkpoint's safetensors shards one module (a block, the embedding rows a batch needs, a slice of
the head) at a time.

Each shard is memory-mapped only while a read is in progress and closed right after, so the pages
of the checkpoint never pile up in the process: what it holds is the module being worked on.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimkit.errors import SlimkitError, WeightsError
from slimkit.models.adapters import ArchitectureAdapter, adapter_for
from slimkit.models.checks import FLOAT_DTYPES, check_files, load_config, meta_model, model_files, read_config
from slimkit.models.experts import is_stacked_experts
from slimkit.models.layouts import conv1d_as_linears, to_checkpoint, transposed_in_checkpoint
from slimkit.models.zoo import ModelKind


@dataclass
class CheckpointShards:
    """Which file holds each tensor, and its shape and dtype, from the headers alone."""

    files: dict[str, Path]  # tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def of_files(cls, files: Iterable[Path]) -> CheckpointShards:
        where, shapes, dtypes = {}, {}, {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        if key in where:  # the first file that names a tensor holds it
                            continue
                        sl = f.get_slice(key)
                        where[key], shapes[key] = Path(file), tuple(sl.get_shape())
                        dtypes[key] = FLOAT_DTYPES.get(sl.get_dtype(), torch.float32)
            except (SafetensorError, OSError, ValueError) as exc:
                raise WeightsError(f"{file} is corrupt or truncated: {str(exc).splitlines()[0][:200]}") from None
        return cls(where, shapes, dtypes)

    @classmethod
    def of_dir(cls, path: Path) -> CheckpointShards:
        return cls.of_files(model_files(path))

    def nbytes(self) -> int:
        return sum(math.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items())

    def main_dtype(self) -> torch.dtype:
        by_dtype: dict[torch.dtype, int] = defaultdict(int)
        for name, shape in self.shapes.items():
            by_dtype[self.dtypes[name]] += math.prod(shape)
        return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32

    def under(self, prefix: str) -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (cast to `dtype` when given), each file opened once and closed."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.files:
                raise WeightsError(f"the checkpoint has no tensor {name}")
            by_file[self.files[name]].append(name)
        out = {}
        for file, wanted in by_file.items():
            with _opened(file) as f:
                for name in wanted:
                    t = f.get_tensor(name)
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t.clone()
        return out

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows start:stop of a 2-D tensor (a slice of the head, say), read without the rest."""
        with _opened(self.files[name]) as f:
            return f.get_slice(name)[start:stop].to(dtype)

    def gather_rows(self, name: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embedding rows for token `ids` (any shape), reading only the distinct rows."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        with _opened(self.files[name]) as f:
            sl = f.get_slice(name)
            table = torch.stack([sl[int(i): int(i) + 1][0] for i in unique]).to(dtype)
        return table[inverse]

    def bytes_by_kind(self, adapter: ArchitectureAdapter, float_size: int | None = None) -> dict[str, int]:
        sizes: dict[str, int] = defaultdict(int)
        for name, shape in self.shapes.items():
            size = float_size or self.dtypes[name].itemsize
            sizes[adapter.tensor_kind(name)] += math.prod(shape) * size
        return dict(sizes)


class _opened:
    """`safe_open` whose errors say which file is damaged."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self):
        try:
            self._ctx = safe_open(str(self.file), framework="pt")
            return self._ctx.__enter__()
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{self.file} cannot be read: {str(exc).splitlines()[0][:200]}") from None

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def real_buffers(model: nn.Module) -> None:
    """Give the skeleton's computed buffers (rotary frequencies...) their values: modules without
    parameters of their own whose buffers are on meta are re-initialised on the CPU."""
    for module in model.modules():
        own = list(module.buffers(recurse=False))
        if own and any(b.is_meta for b in own) and not list(module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            if any(b.is_meta for b in module.buffers(recurse=False)):
                raise SlimkitError(f"cannot compute the buffers of {type(module).__name__} without loading "
                                   "the model; this model cannot be streamed")


@dataclass
class StreamedModel:
    """A causal LM whose weights stay in their files until a module is materialised."""

    model: nn.Module  # parameters on meta, computed buffers real
    shards: CheckpointShards
    tokenizer: Any | None
    adapter: ArchitectureAdapter
    kind: ModelKind
    name: str
    source: Path
    compute_dtype: torch.dtype = torch.float32

    @property
    def source_dtype(self) -> torch.dtype:
        return self.shards.main_dtype()

    def prefix(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name + "." if name else ""
        raise KeyError("module is not part of this model")

    def materialize(self, module: nn.Module, shards: CheckpointShards | None = None) -> None:
        """Read the module's parameters and persistent buffers (compute dtype) from the shards."""
        prefix = self.prefix(module)
        local = [n for n, _ in module.named_parameters()] + [
            n for n, _ in module.named_buffers() if n.rsplit(".", 1)[-1] not in _non_persistent(module, n)]
        tensors = (shards or self.shards).read([prefix + n for n in local], self.compute_dtype)
        tensors = to_checkpoint({n: tensors[prefix + n] for n in local}, transposed_in_checkpoint(module))
        before = dict(module.named_parameters())
        module.load_state_dict(tensors, strict=False, assign=True)
        self._keep_ties(before, module)

    def release(self, module: nn.Module) -> None:
        before = dict(module.named_parameters())
        module.to("meta")
        self._keep_ties(before, module)

    def _keep_ties(self, before: dict[str, nn.Parameter], module: nn.Module) -> None:
        """Where `module` got new parameter objects, give them to every other module that shared the
        old ones (a head tied to this embedding), so that the tie outlives a read or a release."""
        after = dict(module.named_parameters())
        new = {id(p): after[n] for n, p in before.items() if n in after and after[n] is not p}
        if not new:
            return
        for other in self.model.modules():
            for name, p in list(other._parameters.items()):
                if p is not None and id(p) in new:
                    other._parameters[name] = new[id(p)]

    def embed(self, input_ids: torch.Tensor, shards: CheckpointShards | None = None) -> torch.Tensor:
        """The block stack's input for `input_ids`, from these shards or `shards` (a compressed copy)."""
        name = self.embedding_name()
        rows = (shards or self.shards).gather_rows(name, input_ids, self.compute_dtype)
        # transformers' scaled embeddings (Gemma: x sqrt(hidden)) scale inside their forward, which
        # inputs_embeds skips
        scale = getattr(self.model.get_submodule(name.removesuffix(".weight")), "scalar_embed_scale", None)
        return rows if scale is None else rows * torch.tensor(scale, dtype=rows.dtype)

    def embedding_name(self) -> str:
        embeddings = self.adapter.embedding_modules(self.model)
        names = [n + ".weight" for n in embeddings if n + ".weight" in self.shards.files]
        if not names:
            raise WeightsError("the checkpoint has no token embedding the adapter names")
        return names[0]


def _non_persistent(root: nn.Module, buffer_path: str) -> set[str]:
    owner = root.get_submodule(buffer_path.rsplit(".", 1)[0]) if "." in buffer_path else root
    return owner._non_persistent_buffers_set


def open_streamed(path: Path, name: str | None = None) -> StreamedModel:
    """The skeleton of the causal LM in HF dir `path`, checked against the shards' headers."""
    from slimkit.models.loading import _load_tokenizer, model_kind

    kind = model_kind(read_config(path))
    if kind != "causal-lm":
        raise SlimkitError(f"{path}: only causal language models are streamed (this is an {kind}); "
                           "encoders of this kind fit in memory, run without --stream")
    return_freed_memory()
    config = load_config(path)
    skeleton = meta_model(config, kind)
    experts = [n for n, m in skeleton.named_modules() if is_stacked_experts(m)]
    if experts:
        raise SlimkitError(f"{path}: models with MoE experts ({experts[0]}, ...) are not streamed yet; run without "
                           "--stream (`--stream off`) on a machine whose memory holds the model")
    check_files(path, config, skeleton)
    conv1d_as_linears(skeleton)  # on meta; read and written transposed (`materialize`, the block writer)
    real_buffers(skeleton)
    skeleton.eval()
    streamed = StreamedModel(skeleton, CheckpointShards.of_dir(path), _load_tokenizer(path), adapter_for(skeleton),
                             kind, name or str(path), path)
    read_small_globals(streamed)
    return streamed


def read_small_globals(streamed: "StreamedModel") -> None:
    """Read the weights outside the blocks that the model's own forward uses before the first block
    (OPT's learned positions, say): everything but the token embedding and the head, which stay on
    disk and are read a slice at a time."""
    adapter, model = streamed.adapter, streamed.model
    blocks = adapter.get_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}
    big = {streamed.embedding_name().removesuffix(".weight"), adapter.lm_head}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if id(module) in inside or name in big or not own or not all(p.is_meta for p in own):
            continue
        if all(f"{name}.{n}" in streamed.shards.files for n, _ in module.named_parameters(recurse=False)):
            streamed.materialize(module)


def return_freed_memory(threshold: int = 4 << 20) -> None:
    """Ask glibc to map every buffer of `threshold` bytes or more on its own and to give it back
    to the system when freed. Its default threshold grows with use (up to 32 MB) and keeps freed
    heap pages, which inflates a streamed run's resident memory by a block or two. No-op
    elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD (fixing it also stops its growth)
        libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def available_memory() -> int:
    """Bytes of RAM available to a new allocation now (MemAvailable), or total RAM if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def should_stream(shards: CheckpointShards, compute_dtype: torch.dtype = torch.float32) -> bool:
    """Automatic choice: stream when the model in the compute dtype would take more than half of
    the memory available now (the in-memory path also needs activations and a copy per recipe)."""
    numel = sum(math.prod(s) for s in shards.shapes.values())
    return numel * compute_dtype.itemsize > available_memory() // 2
