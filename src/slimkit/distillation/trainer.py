"""A small trainer: AdamW + warm-up/cosine, accumulation, clipping, CSV logs, exact resume, DDP.

The trainer knows nothing about models or losses: a `TrainTask` hands it batches (a pure function
of the step, so the step *is* the data position) and a dict of loss terms. Checkpoints hold the
trainable modules, the optimizer, the scheduler and every RNG, and are written atomically; a run
started again in the same directory continues where the last checkpoint left off and produces
the same loss curve as a run that was never interrupted.

Data parallel: under `torchrun` (gloo on CPU, nccl on GPU) every process takes its share of each
batch and gradients are averaged with `torch.distributed.all_reduce`; the result matches one
process on the whole batch up to float reassociation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from slimkit.distillation.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from slimkit.errors import SlimkitError
from slimkit.progress import NoProgress, Progress

LOG = "log.csv"
CONFIG = "config.json"


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step, all processes together")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step (batch_size must divide evenly)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay on matrices (not on norms or biases)")
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine ends at lr * this")
    clip_norm: float | None = Field(1.0, gt=0, description="gradient-norm clipping; None: off")
    eval_every: int = Field(0, ge=0, description="evaluate every k steps (0: at the end only)")
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _micro(self):
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        return self

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


class TrainTask(Protocol):
    loss_terms: tuple[str, ...]  # keys of losses(); 'loss' is the one optimized
    eval_terms: tuple[str, ...]  # keys of evaluate()

    def trainable(self) -> dict[str, nn.Module]: ...
    def batch(self, step: int, micro: int, size: int, rank: int, world: int) -> Any: ...
    def losses(self, batch: Any) -> dict[str, torch.Tensor]: ...
    def evaluate(self) -> dict[str, float]: ...
    def describe(self) -> dict: ...


class EpochSampler:
    """An endless stream of per-epoch permutations of range(n); position k -> an example index."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise SlimkitError("no training examples")
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        return torch.stack([self._perm(k // self.n)[k % self.n] for k in range(start, start + count)])

    def for_step(self, step: int, micro: int, size: int, accum_batch: int, rank: int, world: int) -> torch.Tensor:
        """This process's share of micro-batch `micro` of optimizer step `step`."""
        if size % world:
            raise SlimkitError(f"micro-batch of {size} cannot be split evenly over {world} processes")
        idx = self.indices(step * accum_batch + micro * size, size)
        return idx[rank::world]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then a cosine down to min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def identity(value: Any) -> Any:
    """What names a run: configs by their non-default values only, so that a field added later
    (with a default) leaves every existing run dir addressable."""
    if isinstance(value, BaseModel):
        return identity(value.model_dump(mode="json", exclude_defaults=True))
    if isinstance(value, dict):
        return {str(k): identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def run_dir_for(root: str | Path, description: dict) -> Path:
    """open_lth-style: a run's directory is named by the hash of everything that defines it."""
    digest = hashlib.sha256(json.dumps(identity(description), sort_keys=True).encode()).hexdigest()[:12]
    return Path(root) / digest


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    resumed_from: int
    rows: list[dict] = field(default_factory=list)
    final_eval: dict = field(default_factory=dict)


def _read_log(path: Path, up_to: int) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= up_to]
    return rows


def _write_log(path: Path, columns: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def train(task: TrainTask, config: TrainConfig, run_dir: str | Path, progress: Progress = NoProgress(),
          on_step: Callable[[int], None] | None = None, restart: bool = False) -> TrainResult:
    """Train `task` for `config.steps` steps in `run_dir`, resuming from its checkpoint if any
    (`restart`: discard it and start from step 0)."""
    run_dir = Path(run_dir)
    rank, world = _world()
    if restart and rank == 0 and run_dir.is_dir():
        shutil.rmtree(run_dir)
    if world > 1 and restart:
        dist.barrier()
    modules = task.trainable()
    decay, no_decay = [], []
    for module in modules.values():
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    params = decay + no_decay
    if not params:
        raise SlimkitError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    columns = ["step", "lr", "grad_norm", *task.loss_terms, *[f"eval_{k}" for k in task.eval_terms]]
    description = {"train": config.model_dump(mode="json"), "task": task.describe(), "world_size": world,
                   "identity": identity({"train": config, "task": task.describe()})}
    ckpt_path = run_dir / CHECKPOINT
    start = 0
    if ckpt_path.exists():
        stored = json.loads((run_dir / CONFIG).read_text())
        if stored.get("identity") != description["identity"]:
            raise SlimkitError(f"{run_dir} holds a different run (its {CONFIG} differs); use another directory "
                               "or --restart")
        start = load_checkpoint(ckpt_path, modules, opt, sched)
    else:
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / CONFIG).write_text(json.dumps(identity(description), indent=2))
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if world > 1:  # everyone starts from rank 0's weights
            for p in (t for m in modules.values() for t in m.state_dict().values()):
                dist.broadcast(p, 0)
    rows = _read_log(run_dir / LOG, start)
    if rank == 0 and run_dir.exists():  # drop rows past the checkpoint: they are redone now
        _write_log(run_dir / LOG, columns, rows)
    result = TrainResult(run_dir, start, start, rows)

    for step in progress.track(range(start, config.steps), "train", total=config.steps - start):
        for module in modules.values():
            module.train()
        opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {k: 0.0 for k in task.loss_terms}
        for micro in range(config.grad_accum):
            batch = task.batch(step, micro, config.micro_batch, rank, world)
            losses = task.losses(batch)
            (losses["loss"] / config.grad_accum).backward()
            for k in task.loss_terms:
                sums[k] += float(losses[k].detach()) / config.grad_accum
        if world > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)
            terms = torch.tensor([sums[k] for k in task.loss_terms], dtype=torch.float64)
            dist.all_reduce(terms, op=dist.ReduceOp.SUM)
            sums = {k: float(v) / world for k, v in zip(task.loss_terms, terms)}
        norm = torch.nn.utils.clip_grad_norm_(params, config.clip_norm or float("inf"))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        row = {"step": str(step + 1), "lr": f"{lr:.6g}", "grad_norm": f"{float(norm):.6g}",
               **{k: f"{v:.6g}" for k, v in sums.items()}}
        last = step + 1 == config.steps
        if last or (config.eval_every and (step + 1) % config.eval_every == 0):
            if rank == 0:
                for module in modules.values():
                    module.eval()
                with torch.no_grad():
                    ev = task.evaluate()
                row.update({f"eval_{k}": f"{v:.6g}" for k, v in ev.items()})
                result.final_eval = ev
        row = {c: row.get(c, "") for c in columns}  # the same columns as rows read back from the CSV
        rows.append(row)
        result.steps_done = step + 1
        if rank == 0:
            with (run_dir / LOG).open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerow(row)
        if rank == 0 and (last or (step + 1) % config.checkpoint_every == 0):
            save_checkpoint(ckpt_path, modules, opt, sched, step + 1)
        if world > 1 and (last or (step + 1) % config.checkpoint_every == 0):
            dist.barrier()
        if on_step is not None:
            on_step(step + 1)
    for module in modules.values():
        module.eval()
    if not result.final_eval and rank == 0:  # a finished run started again: report its end state
        with torch.no_grad():
            result.final_eval = task.evaluate()
    result.rows = rows
    return result
