"""Calibration over several processes with `torch.distributed` (torchrun; gloo on CPU, nccl on CUDA).

- each rank runs the blocks on its share of the calibration batches (global batches rank,
  rank + size, ...);
- the statistics (Hessians, Wanda's column norms, AWQ's mean |x|) come out bit-identical to one
  process: each batch's group inputs are broadcast by the rank that ran it, and every rank adds
  them in the global batch order (calibration/engine.py);
- each batched OBS solve (GPTQ / SparseGPT: the stacked groups of one input width, batched as one
  process batches them) is done by one owner rank, chosen by bin-packing on its cost, and the
  owner broadcasts the results; so codes and masks are those of one process too;
- only rank 0 evaluates and writes (`compression.memory.InMemorySource`); the others (`RankSource`) run `compress` alone.

With one process every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per process: the one of its local rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def shard_windows(windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This rank's calibration batches: global batches rank, rank + size, ... (split by
    `batch_size` again, they are exactly those batches)."""
    rank, size = world()
    if size == 1:
        return windows
    mine = torch.split(windows, batch_size)[rank::size]
    return torch.cat(mine) if mine else windows[:0]


def owners(costs: list[float]) -> list[int]:
    """An owner rank for each job: longest job first, to the least loaded rank."""
    size = world()[1]
    load = [0.0] * size
    owner = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: -costs[j]):
        rank = min(range(size), key=lambda r: load[r])
        owner[job] = rank
        load[rank] += costs[job]
    return owner


def _wire_device() -> torch.device:
    """Where collectives need their tensors: this process's GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_tensors(tensors: list[torch.Tensor | None], src: int) -> list[torch.Tensor | None]:
    """`src`'s tensors on every rank (shapes and dtypes sent first; None stays None)."""
    rank, _ = world()
    meta = [[None if t is None else (tuple(t.shape), str(t.dtype)) for t in tensors]] if rank == src else [None]
    dist.broadcast_object_list(meta, src=src)
    out = []
    for i, spec in enumerate(meta[0]):
        if spec is None:
            out.append(None)
            continue
        shape, dtype = spec
        buf = (tensors[i].contiguous().to(_wire_device()) if rank == src
               else torch.empty(shape, dtype=getattr(torch, dtype[6:]), device=_wire_device()))
        wire = buf.to(torch.uint8) if buf.dtype == torch.bool else buf
        dist.broadcast(wire, src=src)
        out.append(wire.to(torch.bool) if buf.dtype == torch.bool else wire)
    return out
