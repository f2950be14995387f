"""The sequential calibration engine: one block at a time, through the architecture adapter.

1. Run the model on the calibration windows until block 0 and capture that block's inputs (and
   the keyword arguments the model passes every block: attention mask, rotary embeddings).
2. For each block: hook the first linear of every input group, run the *dense* block on all
   inputs to accumulate statistics (fp32; the pass stops once every group has seen its input), hand each linear and its statistics to the
   algorithm, then re-run the block with the compressed weights: its outputs are the next
   block's inputs. Every algorithm thus sees inputs produced by already-compressed blocks; one that
   asks for dense targets (learned rounding) also gets what the dense model computes at this
   depth, from a second stream of activations that never passes a compressed block.
Peak memory is one block's weights plus the activations; `device` is where the block being worked
on, its inputs and statistics go (the activations wait on the CPU); `offload_dir` keeps the activations
on disk (memory-mapped) for models whose activations do not fit in RAM. Where the blocks' weights
live is a `BlockAccess`: in memory (the default), or in files, read and written one block at a
time (`slimkit.streaming`), which can also resume a pass at the block where it stopped.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimkit.calibration.distributed import broadcast_tensors, shard_windows
from slimkit.calibration.distributed import world as distributed_world
from slimkit.calibration.stats import InputStats, StatsRequest
from slimkit.devices import model_device, to_device
from slimkit.errors import UnsupportedArchitectureError
from slimkit.models.adapters import ArchitectureAdapter
from slimkit.progress import NoProgress, Progress


class _StopForward(Exception):
    pass


class ActivationStore:
    """Block inputs, one tensor per calibration batch: in RAM, or memory-mapped on disk."""

    def __init__(self, offload_dir: str | Path | None = None):
        self._tensors: list[torch.Tensor] = []
        self._dir = Path(tempfile.mkdtemp(prefix="slimkit-acts-", dir=offload_dir)) if offload_dir else None
        self._generation = 0
        self.dense: ActivationStore | None = None  # the dense model's activations, when asked to carry them

    def put(self, i: int, x: torch.Tensor) -> None:
        x = x.detach()
        if self._dir is not None:
            path = self._dir / f"g{self._generation}-{i}.bin"
            mm = torch.from_file(str(path), shared=True, size=x.numel(), dtype=x.dtype).view(x.shape)
            mm.copy_(x)
            x = mm
        if i < len(self._tensors):
            self._tensors[i] = x
        else:
            self._tensors.append(x)

    def next_generation(self) -> None:
        if self._dir is not None:
            for stale in self._dir.glob(f"g{self._generation - 1}-*.bin"):
                stale.unlink()
        self._generation += 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._tensors[i]

    def __len__(self) -> int:
        return len(self._tensors)

    def close(self) -> None:
        if self.dense is not None:
            self.dense.close()
        self._tensors.clear()
        if self._dir is not None:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)


class BlockAccess:
    """Where the engine's blocks live; this base class: all in memory, nothing to do."""

    def model_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model is called with to reach block 0 (token ids, or their embeddings)."""
        return {"input_ids": batch}

    def resume(self, store: ActivationStore) -> int:
        """The first block to work on; a resumed pass also puts that block's inputs in `store`."""
        return 0

    def open(self, index: int, block: nn.Module) -> None:
        """Before block `index` is worked on (a streamed block is read here)."""

    def close(self, index: int, block: nn.Module, store: ActivationStore) -> None:
        """After block `index` is compressed and `store` holds the next block's inputs."""


@dataclass
class BlockInputs:
    """A block's calibration inputs (this process's batches) and the arguments the model passes it,
    for algorithms that run the block themselves (learned rounding)."""

    store: ActivationStore
    extra: list[tuple[tuple, dict]]
    device: torch.device

    def __len__(self) -> int:
        return len(self.extra)

    def batch(self, i: int) -> tuple[torch.Tensor, tuple, dict]:
        """Batch `i`: (hidden states, positional args, keyword args), on the block's device."""
        return to_device((self.store[i], *self.extra[i]), self.device)


@dataclass
class BlockWork:
    """What an algorithm gets for one block."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Linear]  # full name -> module
    groups: list[list[str]]  # full names of linears sharing one input
    producers: list[nn.Module | None]  # the op producing each group's input (for folding)
    stats: dict[str, InputStats]  # full name -> the stats of its (shared) input
    experts: list[int] = field(default_factory=list)  # the groups that belong to MoE experts
    data_free: dict[str, int] = field(default_factory=dict)  # linears given identity statistics -> tokens seen
    inputs: BlockInputs | None = None  # the block's calibration inputs (the engine sets them)
    # the dense block's outputs on the dense model's own inputs, per batch (on the CPU), when the
    # request asks for dense targets: what the uncompressed model computes at this depth
    dense_outputs: list[torch.Tensor] | None = None


@dataclass
class EngineReport:
    block_seconds: list[float] = field(default_factory=list)
    stats_seconds: float = 0.0
    forward_seconds: float = 0.0
    algorithm_seconds: float = 0.0
    tokens: int = 0
    expert_tokens: dict[str, int] = field(default_factory=dict)  # each expert (module name) -> tokens routed to it
    data_free_experts: list[str] = field(default_factory=list)  # experts below min_expert_tokens
    min_expert_tokens: int = 0  # the threshold the pass applied (MIN_EXPERT_TOKENS)


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """One block on one batch, as the model called block 0. A block that needs more than that (state a
    previous block left outside its arguments: Hunyuan-V4's shared sparse-attention indices) is refused
    by name: block-by-block calibration cannot feed it."""
    try:
        return block(hidden, *args, **kwargs)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise UnsupportedArchitectureError(
            f"{type(block).__name__} does not run on its own from the inputs the model gives its first block "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): calibrated methods run one "
            "block at a time; use a data-free recipe (rtn-int4-g64, magnitude pruning)") from exc


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor, batch_size: int, store: ActivationStore,
    access: BlockAccess = BlockAccess(),
) -> list[tuple[tuple, dict]]:
    """Inputs of block 0 for each batch, and the other args the model passes to every block."""
    first = adapter.get_blocks(model)[0]
    extra: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        store.put(len(extra), hidden)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        extra.append((tuple(args[1:]), kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in torch.split(windows, batch_size):
            if batch.shape[0] == 0:  # a rank with no calibration batch (fewer batches than ranks)
                continue
            try:
                model(**access.model_inputs(batch), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return extra


def _collect_stats(block: nn.Module, work: BlockWork, store, extra, global_batches: int,
                   device: torch.device = torch.device("cpu")) -> None:
    """Run the dense block on every calibration batch with hooks on each input group's first
    linear; stop each forward as soon as every group's input has been seen. Over several
    processes, each batch's group inputs go from the rank that ran it to every rank, and all
    ranks add them in the global batch order: the statistics are those of one process, bit for bit."""
    rank, size = distributed_world()
    firsts = [group[0] for group in work.groups]
    for step in range(-(-global_batches // size)):
        inputs = (_group_inputs(block, work, *to_device((store[step], *extra[step]), device))
                  if step < len(store) else [None] * len(firsts))
        for src in range(size):
            if step * size + src >= global_batches:
                break
            shared = inputs if size == 1 else broadcast_tensors(inputs if rank == src else [None] * len(firsts), src)
            for name, x in zip(firsts, shared):
                if x is not None:  # an expert the router sent none of this batch's tokens to
                    work.stats[name].add(x)


MIN_EXPERT_TOKENS = 16


def expert_fallback(work: BlockWork, report: EngineReport) -> None:
    """Count the tokens each expert received; an expert with fewer than MIN_EXPERT_TOKENS gets identity
    statistics (Hessian I, unit activations), under which every method becomes its data-free form:
    GPTQ is RTN, SparseGPT and Wanda are magnitude pruning, AWQ scales nothing."""
    report.min_expert_tokens = MIN_EXPERT_TOKENS
    for g in work.experts:
        stats = work.stats[work.groups[g][0]]
        expert = work.groups[g][0].rpartition(".")[0]  # e.g. model.layers.0.mlp.experts.3
        report.expert_tokens[expert] = max(stats.tokens, report.expert_tokens.get(expert, 0))
        if stats.tokens < MIN_EXPERT_TOKENS:
            if expert not in report.data_free_experts:
                report.data_free_experts.append(expert)
            work.data_free.update(dict.fromkeys(work.groups[g], stats.tokens))
            stats.make_data_free()


def _group_inputs(block: nn.Module, work: BlockWork, hidden: torch.Tensor, args, kwargs) -> list[torch.Tensor]:
    """The input of each input group's first linear for one batch (the forward stops once all are seen)."""
    seen: dict[int, torch.Tensor] = {}

    def observe(args, group: int) -> None:
        seen[group] = args[0]
        if len(seen) == len(work.groups):  # every input captured: the rest of the block is not needed
            raise _StopForward

    handles = [work.linears[group[0]].register_forward_pre_hook(lambda mod, args, g=g: observe(args, g))
               for g, group in enumerate(work.groups)]
    try:
        with torch.no_grad():
            call_block(block, hidden, args, kwargs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return [seen.get(g) for g in range(len(work.groups))]


def forward_block(block: nn.Module, store, extra, device: torch.device = torch.device("cpu")) -> None:
    """Run `block` (on `device`) on every stored input; its outputs replace them on the CPU (the next
    block's inputs)."""
    store.next_generation()
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(extra):
            hidden, args, kwargs = to_device((store[i], args, kwargs), device)
            store.put(i, block_output(call_block(block, hidden, args, kwargs)).cpu())


def start_dense_stream(store: ActivationStore, offload_dir) -> None:
    """The dense model's activations begin as block 0's inputs (a copy: the two streams part after
    the first compressed block)."""
    store.dense = ActivationStore(offload_dir)
    for i in range(len(store)):
        store.dense.put(i, store[i].clone())


def dense_targets(block: nn.Module, store: ActivationStore, extra, device: torch.device) -> list[torch.Tensor]:
    """The still-dense block on the dense stream: its outputs are the targets, and the dense
    stream's next inputs."""
    forward_block(block, store.dense, extra, device)
    return [store.dense[i] for i in range(len(store.dense))]


@dataclass(frozen=True)
class Walk:
    """How the engine walks the blocks: the progress it reports to (and the bar's name), windows per
    batch, where activations are offloaded (None: RAM), how blocks are opened and closed (a
    streamed run reads and writes them), and the device the block works on."""

    progress: Progress = field(default_factory=NoProgress)
    description: str = "calibrated"
    batch_size: int = 8
    offload_dir: str | Path | None = None
    access: BlockAccess = field(default_factory=BlockAccess)
    device: torch.device | str = "cpu"


def sequential_compress(model: nn.Module, adapter: ArchitectureAdapter, windows: torch.Tensor, request: StatsRequest,
                        compress_block: Callable[[BlockWork], None], walk: Walk = Walk()) -> EngineReport:
    progress, batch_size, offload_dir, access = walk.progress, walk.batch_size, walk.offload_dir, walk.access
    device, description = torch.device(walk.device), walk.description
    report = EngineReport(tokens=windows.numel())
    global_batches = len(torch.split(windows, batch_size))
    windows = shard_windows(windows, batch_size)  # this rank's batches when several processes calibrate
    store = ActivationStore(offload_dir)
    model.eval()
    try:
        extra = capture_block_inputs(model, adapter, windows, batch_size, store, access)
        first = access.resume(store)  # a resumed pass restores the dense stream too, when it had one
        if request.dense_targets and store.dense is None:
            if first:
                from slimkit.errors import CheckpointError

                raise CheckpointError("this resumed pass saved no dense activations (the learned-rounding "
                                      "targets): start it again (--restart)")
            start_dense_stream(store, offload_dir)
        names = {id(m): n for n, m in model.named_modules()}
        blocks = list(enumerate(adapter.get_blocks(model)))[first:]
        for index, block in progress.track(blocks, f"{description}: blocks"):
            start = time.perf_counter()
            access.open(index, block)
            home = model_device(block)  # where the block goes back to (the CPU, or a model's own device)
            block.to(device)
            work = _block_work(index, block, adapter, names, request, device)
            work.inputs = BlockInputs(store, extra, device)
            t0 = time.perf_counter()
            _collect_stats(block, work, store, extra, global_batches, device)
            expert_fallback(work, report)
            if store.dense is not None:
                work.dense_outputs = dense_targets(block, store, extra, device)
            t1 = time.perf_counter()
            compress_block(work)
            t2 = time.perf_counter()
            forward_block(block, store, extra, device)  # the compressed block: what the next one sees
            block.to(home)
            access.close(index, block, store)
            report.stats_seconds += t1 - t0
            report.algorithm_seconds += t2 - t1
            report.forward_seconds += time.perf_counter() - t2
            report.block_seconds.append(time.perf_counter() - start)
    finally:
        store.close()
    return report


def _block_work(index: int, block: nn.Module, adapter: ArchitectureAdapter, names: dict, request: StatsRequest,
                device: torch.device) -> BlockWork:
    linears, groups, producers, stats, experts = {}, [], [], {}, []
    adapter = adapter.for_block(index)
    for g, group in enumerate(adapter.groups):
        if group.projections[0] in adapter.experts:
            experts.append(g)
        producer = group.producer
        mods = [adapter.block_module(block, p) for p in group.projections]
        full = [names[id(m)] for m in mods]
        shared = InputStats(mods[0].in_features, request, device)
        for n, m in zip(full, mods):
            linears[n] = m
            stats[n] = shared
        groups.append(full)
        producers.append(adapter.block_module(block, producer) if producer else None)
    return BlockWork(index, block, linears, groups, producers, stats, experts)
