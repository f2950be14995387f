"""Calibration over several processes with `torch.distributed` (torchrun; gloo on CPU, nccl on CUDA).

- each rank runs the blocks on its share of the calibration windows (a contiguous slice);
- the statistics of every input group are summed over ranks with their token counts (Hessians as
  token-weighted means, Wanda's column norms, AWQ's mean |x|);
- each OBS problem (GPTQ / SparseGPT: one stacked group of linears) is solved by one owner rank,
  chosen by bin-packing on its solve cost, and the owner broadcasts the result to every rank;
- only rank 0 writes anything (`workflow.compress_to_dir`); the others run `compress` alone.

With one process every function here is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from slimkit.calibration.stats import InputStats


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def shard_windows(windows: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    return windows if size == 1 else torch.tensor_split(windows, size)[rank]


def reduce_stats(stats: list[InputStats]) -> None:
    """Every rank ends with the statistics of all ranks' tokens (each shared object once)."""
    if world()[1] == 1:
        return
    for s in {id(s): s for s in stats}.values():
        tokens = torch.tensor([float(s.tokens)], dtype=torch.float64)
        dist.all_reduce(tokens)
        total = float(tokens)
        if s.hessian is not None:  # a token-weighted mean
            h = s.hessian.mul_(s.tokens / total)
            dist.all_reduce(h)
        for summed in (s.col_sq, s.abs_sum):
            if summed is not None:
                dist.all_reduce(summed)
        s.tokens = int(total)


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
        buf = tensors[i].contiguous() if rank == src else torch.empty(shape, dtype=getattr(torch, dtype[6:]))
        wire = buf.to(torch.uint8) if buf.dtype == torch.bool else buf
        dist.broadcast(wire, src=src)
        out.append(wire.to(torch.bool) if buf.dtype == torch.bool else wire)
    return out
