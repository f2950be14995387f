"""Lottery tickets with open_lth's semantics: iterative magnitude pruning with rewinding.

Level 0 trains the dense network and saves its weights at step k (the rewind point). Every
later level prunes 20% of the *remaining* weights by global magnitude (over all hidden and
output weight matrices, biases kept), rewinds the survivors to their step-k values ("late
resetting") and trains again. The control trains the same masks from a fresh random
initialisation. Hyperparameters are typed; a run directory is named by their hash; every level's
training resumes from its checkpoint when interrupted and finished levels are skipped.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from slimkit.data.classification import Dataset, accuracy, load_dataset
from slimkit.paths import LotteryDir
from slimkit.progress import NoProgress, Progress
from slimkit.training.trainer import EpochSampler, TrainConfig, run_dir_for, train


class LotteryConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: Literal["fashion-mnist", "digits"] = Field("fashion-mnist", description="fashion-mnist (make "
                                                         "fashion-mnist) or digits")
    hidden: tuple[int, ...] = Field((300, 100), description="MLP widths, comma-separated (LeNet-300-100)")
    levels: int = Field(11, ge=1, description="pruning levels after the dense one (0.8^11 = 8.6% left)")
    prune_fraction: float = Field(0.2, gt=0, lt=1, description="of the remaining weights, per level")
    steps: int = Field(1500, ge=1, description="training steps per level")
    rewind_step: int = Field(100, ge=0, description="k: survivors restart from their weights at step k")
    batch_size: int = Field(128, ge=1, description="examples per training step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    seeds: tuple[int, ...] = Field((0, 1, 2), description="N (seeds 0..N-1) or a comma-separated list")

    @field_validator("hidden", "seeds", mode="before")
    @classmethod
    def _integers(cls, value, info):
        """The command line's forms: "300,100"; seeds also "3" (seeds 0, 1, 2)."""
        if not isinstance(value, str):
            return value
        try:
            numbers = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError:
            numbers = ()
        if not numbers:
            raise ValueError(f"takes comma-separated integers, not '{value}'")
        return tuple(range(numbers[0])) if info.field_name == "seeds" and "," not in value else numbers

    def describe(self) -> dict:
        return self.model_dump(mode="json")


class MaskedMLP(nn.Module):
    """An MLP whose weight matrices are multiplied by fixed 0/1 masks (buffers) in forward."""

    def __init__(self, features: int, hidden: tuple[int, ...], classes: int):
        super().__init__()
        widths = [features, *hidden, classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"mask{i}", torch.ones_like(layer.weight))

    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask{i}") for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (layer, mask) in enumerate(zip(self.layers, self.masks())):
            x = F.linear(x, layer.weight * mask, layer.bias)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks())
        return 1 - sum(float(m.sum()) for m in self.masks()) / total


def prune_global(model: MaskedMLP, fraction: float) -> list[torch.Tensor]:
    """New masks: drop `fraction` of the surviving weights with the smallest |w|, over all layers."""
    alive = torch.cat([(l.weight.detach().abs())[m.bool()] for l, m in zip(model.layers, model.masks())])
    k = int(round(fraction * alive.numel()))
    if k == 0:
        return [m.clone() for m in model.masks()]
    threshold = torch.kthvalue(alive, k).values
    new = []
    for layer, mask in zip(model.layers, model.masks()):
        keep = (layer.weight.detach().abs() > threshold) & mask.bool()
        new.append(keep.float())
    return new


class _MaskedTask:
    loss_terms = ("loss",)
    eval_terms = ("accuracy",)

    def __init__(self, model: MaskedMLP, data: Dataset, seed: int, batch_size: int, label: str):
        self.model, self.data, self.seed, self.label = model, data, seed, label
        self.sampler = EpochSampler(len(data.x_train), seed)
        self.batch_size = batch_size

    def trainable(self):
        return {"model": self.model}

    def batch(self, step, micro, size, rank, world):
        return self.sampler.for_step(step, micro, size, self.batch_size, rank, world)

    def losses(self, idx):
        loss = F.cross_entropy(self.model(self.data.x_train[idx]), self.data.y_train[idx])
        return {"loss": loss}

    def evaluate(self):
        return {"accuracy": accuracy(self.model, self.data.x_test, self.data.y_test)}

    def describe(self):
        return {"task": "lottery", "label": self.label, "seed": self.seed, "sparsity": round(self.model.sparsity(), 6)}


def _train(model: MaskedMLP, data: Dataset, config: LotteryConfig, seed: int, run_dir: Path, label: str,
           steps: int | None = None) -> float:
    tc = TrainConfig(steps=steps or config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=0,
                     min_lr_ratio=1.0, weight_decay=0.0, clip_norm=None, checkpoint_every=max(config.steps // 3, 1), eval_every=0,
                     seed=seed)
    result = train(_MaskedTask(model, data, seed, config.batch_size, label), tc, run_dir)
    return result.final_eval["accuracy"]


def _fresh(data: Dataset, config: LotteryConfig, seed: int) -> MaskedMLP:
    torch.manual_seed(seed)
    return MaskedMLP(data.features, config.hidden, data.classes)


MASKS = "masks.safetensors"


def _save_masks(masks: list[torch.Tensor], path: Path) -> None:
    save_file({f"mask{i}": m.contiguous() for i, m in enumerate(masks)}, str(path))


def _load_masks(path: Path) -> list[torch.Tensor]:
    tensors = load_file(str(path))
    return [tensors[f"mask{i}"] for i in range(len(tensors))]


def run_seed(data: Dataset, config: LotteryConfig, seed: int, run_dir: Path, progress: Progress = NoProgress()) -> list[dict]:
    """One seed: the dense level, then `levels` prune-rewind-train levels, each with its control."""
    run_dir.mkdir(parents=True, exist_ok=True)
    done_file = run_dir / "levels.json"
    rows = json.loads(done_file.read_text()) if done_file.exists() else []
    model = _fresh(data, config, seed)
    rewind_path = run_dir / "rewind.safetensors"
    if not rewind_path.exists():  # the weights at step k of dense training
        if config.rewind_step:
            _train(model, data, config, seed, run_dir / "rewind-run", "rewind", steps=config.rewind_step)
        tmp = rewind_path.with_name("rewind.safetensors.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, rewind_path)
    rewind = load_file(str(rewind_path))
    for level in progress.track(range(config.levels + 1), f"lottery seed {seed}"):
        if level < len(rows):  # finished before an interruption
            continue
        level_dir = run_dir / f"level{level:02d}"
        level_dir.mkdir(parents=True, exist_ok=True)
        # level 0 is dense; every later level's masks were written when the level before it ended
        if level == 0:
            _save_masks([torch.ones_like(l.weight) for l in model.layers], level_dir / MASKS)
        masks = _load_masks(level_dir / MASKS)
        ticket = _fresh(data, config, seed)
        ticket.load_state_dict({**rewind, **{f"mask{i}": m for i, m in enumerate(masks)}})
        acc_ticket = _train(ticket, data, config, seed, level_dir / "ticket", "ticket")
        acc_random = acc_ticket  # level 0 is dense: its control is itself
        if level:
            control = _fresh(data, config, seed + 10_000 + level)  # random re-initialisation, same masks
            for buf, m in zip(control.masks(), masks):
                buf.copy_(m)
            acc_random = _train(control, data, config, seed, level_dir / "random", "random")
        if level < config.levels:  # prune the *trained* ticket: the next level's masks
            next_dir = run_dir / f"level{level + 1:02d}"
            next_dir.mkdir(parents=True, exist_ok=True)
            tmp = next_dir / (MASKS + ".tmp")
            _save_masks(prune_global(ticket, config.prune_fraction), tmp)
            os.replace(tmp, next_dir / MASKS)
        rows.append({"seed": seed, "level": level, "sparsity": round(ticket.sparsity(), 6),
                     "ticket_accuracy": acc_ticket, "random_reinit_accuracy": acc_random})
        tmp = done_file.with_name("levels.json.tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, done_file)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    by_level: dict[int, list[dict]] = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    out = []
    for level, rs in sorted(by_level.items()):
        t = [r["ticket_accuracy"] for r in rs]
        c = [r["random_reinit_accuracy"] for r in rs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        out.append({"level": level, "sparsity": rs[0]["sparsity"], "seeds": len(rs),
                    "ticket_mean": round(statistics.mean(t), 4), "ticket_std": round(sd(t), 4),
                    "random_mean": round(statistics.mean(c), 4), "random_std": round(sd(c), 4)})
    return out


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * s["sparsity"] for s in summary]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.errorbar(x, [s["ticket_mean"] for s in summary], yerr=[s["ticket_std"] for s in summary],
                marker="o", capsize=3, label="winning ticket (rewound)")
    ax.errorbar(x, [s["random_mean"] for s in summary], yerr=[s["random_std"] for s in summary],
                marker="s", capsize=3, label="random re-init, same mask")
    ax.set(xlabel="sparsity (%)", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_lottery(config: LotteryConfig, root: Path, progress: Progress = NoProgress()) -> tuple[Path, list[dict]]:
    """All seeds; writes results.csv, summary.csv, lottery.png and config.json in the hashed run dir."""
    data = load_dataset(config.dataset)
    run_dir = run_dir_for(root, {"lottery": config})
    run_dir.mkdir(parents=True, exist_ok=True)
    layout = LotteryDir(run_dir)
    layout.config.write_text(json.dumps(config.describe(), indent=2))
    rows = []
    for seed in config.seeds:
        rows += run_seed(data, config, seed, run_dir / f"seed{seed}", progress)
    summary = summarize(rows)
    for path, table in ((layout.results, rows), (layout.summary, summary)):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    plot(summary, layout.plot, f"lottery tickets: {config.dataset}, MLP {'-'.join(map(str, config.hidden))}, "
                                            f"rewind to step {config.rewind_step}, {len(config.seeds)} seeds")
    return run_dir, summary
