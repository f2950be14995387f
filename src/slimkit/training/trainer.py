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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from slimkit.calibration import distributed
from slimkit.errors import SlimkitError
from slimkit.paths import TrainRunDir
from slimkit.progress import NoProgress, Progress
from slimkit.training.checkpoint import load_checkpoint, save_checkpoint

MAX_STEPS = 10_000_000  # far past any distillation run; more is a typo, said before any model loads
LONG_RUN_S = 24 * 3600  # a run estimated to take longer than this is announced after its first step


class TrainFields(BaseModel):
    """The training settings, declared once: `TrainConfig` is exactly these, and the `distill`
    recipe step inherits them next to its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(200, ge=1, le=MAX_STEPS, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per optimizer step, all processes together")
    grad_accum: int = Field(1, ge=1, description="micro-batches per step (batch_size must divide evenly)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay on matrices (not on norms or biases)")
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine ends at lr * this")
    clip_norm: float | None = Field(1.0, gt=0, description="gradient-norm clipping; None: off")
    eval_every: int = Field(50, ge=0, description="evaluate every k steps (0: at the end only)")
    checkpoint_every: int = Field(25, ge=1)
    seed: int = 0

    def train_fields(self) -> dict:
        return {name: getattr(self, name) for name in TrainFields.model_fields}


class TrainConfig(TrainFields):
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


@dataclass
class _Session:
    """One process's view of a training run: what it trains, with what, and where it writes."""

    task: TrainTask
    config: TrainConfig
    layout: TrainRunDir
    modules: dict[str, nn.Module]
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    columns: list[str]
    rank: int
    world: int


def _session(task: TrainTask, config: TrainConfig, run_dir: Path) -> _Session:
    """AdamW (no decay on norms and biases) with warm-up + cosine, over the task's modules."""
    rank, world = distributed.world()
    modules = task.trainable()
    decay, no_decay = [], []
    for module in modules.values():
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay + no_decay:
        raise SlimkitError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    columns = ["step", "lr", "grad_norm", *task.loss_terms, *[f"eval_{k}" for k in task.eval_terms]]
    return _Session(task, config, TrainRunDir(run_dir), modules, decay + no_decay, opt, sched, columns, rank, world)


def _resume_or_start(run: _Session) -> int:
    """The step to start from: the checkpoint's, or 0 for a new run (config written, seeds set)."""
    description = {"train": run.config.model_dump(mode="json"), "task": run.task.describe(),
                   "world_size": run.world, "identity": identity({"train": run.config, "task": run.task.describe()})}
    layout = run.layout
    if layout.checkpoint.exists():
        stored = json.loads(layout.config.read_text())
        if stored.get("identity") != description["identity"]:
            raise SlimkitError(f"{layout.root} holds a different run (its {layout.config.name} differs); use "
                               "another directory or --restart")
        return load_checkpoint(layout.checkpoint, run.modules, run.opt, run.sched)
    if run.rank == 0:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.config.write_text(json.dumps(identity(description), indent=2))
    torch.manual_seed(run.config.seed)
    random.seed(run.config.seed)
    if run.world > 1:  # everyone starts from rank 0's weights
        for p in (t for m in run.modules.values() for t in m.state_dict().values()):
            dist.broadcast(p, 0)
    return 0


def _step(run: _Session, step: int) -> dict:
    """One optimizer step over all micro-batches (and processes); its log row."""
    task, config = run.task, run.config
    for module in run.modules.values():
        module.train()
    run.opt.zero_grad(set_to_none=True)
    sums: dict[str, float] = {k: 0.0 for k in task.loss_terms}
    for micro in range(config.grad_accum):
        losses = task.losses(task.batch(step, micro, config.micro_batch, run.rank, run.world))
        (losses["loss"] / config.grad_accum).backward()
        for k in task.loss_terms:
            sums[k] += float(losses[k].detach()) / config.grad_accum
    if run.world > 1:
        for p in run.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(run.world)
        terms = torch.tensor([sums[k] for k in task.loss_terms], dtype=torch.float64)
        dist.all_reduce(terms, op=dist.ReduceOp.SUM)
        sums = {k: float(v) / run.world for k, v in zip(task.loss_terms, terms)}
    norm = torch.nn.utils.clip_grad_norm_(run.params, config.clip_norm or float("inf"))
    lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    return {"step": str(step + 1), "lr": f"{lr:.6g}", "grad_norm": f"{float(norm):.6g}",
            **{k: f"{v:.6g}" for k, v in sums.items()}}


def _evaluate(run: _Session) -> dict[str, float]:
    for module in run.modules.values():
        module.eval()
    with torch.no_grad():
        return run.task.evaluate()


def _end_of_step(run: _Session, row: dict, done: int) -> None:
    """Append the row to log.csv; checkpoint every k steps and at the end (rank 0 writes)."""
    if run.rank == 0:
        with run.layout.log.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=run.columns).writerow(row)
    if done == run.config.steps or done % run.config.checkpoint_every == 0:
        if run.rank == 0:
            save_checkpoint(run.layout.checkpoint, run.modules, run.opt, run.sched, done)
        if run.world > 1:
            dist.barrier()


def _announce_long_run(progress: Progress, steps: int, first_step_s: float) -> None:
    estimate = steps * first_step_s
    if estimate > LONG_RUN_S:
        progress.note(f"warning: {steps:,} steps at {first_step_s:.2f} s each take about {estimate / 86400:,.1f} "
                      "days; Ctrl-C stops it, and the run resumes from its last checkpoint")


def train(task: TrainTask, config: TrainConfig, run_dir: str | Path, progress: Progress = NoProgress(),
          on_step: Callable[[int], None] | None = None, restart: bool = False) -> TrainResult:
    """Train `task` for `config.steps` steps in `run_dir`, resuming from its checkpoint if any
    (`restart`: discard it and start from step 0)."""
    run_dir = Path(run_dir)
    run = _session(task, config, run_dir)
    if restart and run.rank == 0 and run_dir.is_dir():
        shutil.rmtree(run_dir)
    if run.world > 1 and restart:
        dist.barrier()
    start = _resume_or_start(run)
    rows = _read_log(run.layout.log, start)
    if run.rank == 0 and run_dir.exists():  # drop rows past the checkpoint: they are redone now
        _write_log(run.layout.log, run.columns, rows)
    result = TrainResult(run_dir, start, start, rows)
    first_step = time.perf_counter()
    for step in progress.track(range(start, config.steps), "train", total=config.steps - start):
        row = _step(run, step)
        if run.rank == 0 and (step + 1 == config.steps or (config.eval_every and (step + 1) % config.eval_every == 0)):
            result.final_eval = _evaluate(run)
            row.update({f"eval_{k}": f"{v:.6g}" for k, v in result.final_eval.items()})
        row = {c: row.get(c, "") for c in run.columns}  # the same columns as rows read back from the CSV
        rows.append(row)
        result.steps_done = step + 1
        _end_of_step(run, row, step + 1)
        if step == start:
            _announce_long_run(progress, config.steps - start, time.perf_counter() - first_step)
        if on_step is not None:
            on_step(step + 1)
    for module in run.modules.values():
        module.eval()
    if not result.final_eval and run.rank == 0:  # a finished run started again: report its end state
        result.final_eval = _evaluate(run)
    result.rows = rows
    return result
