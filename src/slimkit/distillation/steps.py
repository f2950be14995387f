"""Recipe step handler: `distill` trains the context's model against the pre-recipe teacher."""

from __future__ import annotations

from pathlib import Path

import torch

from slimkit.data.tokens import calibration_windows
from slimkit.distillation.config import DistillConfig
from slimkit.distillation.data import teacher_generated_windows
from slimkit.distillation.language import (
    CausalLMDistillTask,
    DistillPair,
    EncoderDistillTask,
    EncoderTexts,
    LMLossConfig,
)
from slimkit.evaluation.perplexity import eval_windows
from slimkit.recipes.context import StepContext
from slimkit.recipes.registry import register_step
from slimkit.training.trainer import TrainConfig, run_dir_for, train


def _train_config(c: DistillConfig) -> TrainConfig:
    return TrainConfig(**c.train_fields())


def _runs_root(ctx: StepContext) -> Path:
    if ctx.run.runs_dir:
        return Path(ctx.run.runs_dir)
    from slimkit.models.loading import cache_root
    return cache_root() / "runs"


def _lm_task(c: DistillConfig, ctx: StepContext) -> CausalLMDistillTask:
    windows = calibration_windows(ctx.run.tokenizer, ctx.run.split, c.windows, c.seqlen, seed=1000 + c.seed)
    if c.data == "teacher":
        windows = teacher_generated_windows(ctx.state.teacher, windows[:, :8], c.seqlen, seed=c.seed, progress=ctx.run.progress)
    held_out = eval_windows(ctx.run.tokenizer, ctx.run.split, c.seqlen)[: c.eval_windows]
    loss = LMLossConfig(divergence=c.divergence, temperature=c.temperature, alpha=c.alpha,
                        hidden_weight=c.hidden_weight)
    init = ctx.state.hidden_projection if c.hidden_weight > 0 else None
    pair = DistillPair(ctx.state.model, ctx.state.teacher, init)
    return CausalLMDistillTask(pair, windows, held_out, loss, c.seed, c.batch_size, c.data)


def _encoder_task(c: DistillConfig, ctx: StepContext) -> EncoderDistillTask:
    texts = [d.text for d in ctx.run.split.calibration[: c.windows]]
    held_out = [d.text for d in ctx.run.split.evaluation[-c.eval_windows * 8 :]]  # not the eval protocol's first texts
    hidden_weight = c.hidden_weight if "hidden_weight" in c.model_fields_set else 1.0
    pair = DistillPair(ctx.state.model, ctx.state.teacher, ctx.state.hidden_projection)
    return EncoderDistillTask(pair, ctx.run.tokenizer, EncoderTexts(texts, held_out, max_length=min(c.seqlen, 128)),
                              hidden_weight, c.seed, c.batch_size)


@register_step(DistillConfig)
def apply_distill(config: DistillConfig, ctx: StepContext) -> None:
    causal = ctx.state.model.get_output_embeddings() is not None
    task = _lm_task(config, ctx) if causal else _encoder_task(config, ctx)
    for p in ctx.state.model.parameters():
        p.requires_grad_(True)
    train_config = _train_config(config)
    run_dir = run_dir_for(_runs_root(ctx), {"train": train_config, "task": task.describe(),
                                            "student_start": _fingerprint(ctx.state.model)})
    result = train(task, train_config, run_dir, ctx.run.progress, restart=ctx.run.restart_training)
    for p in ctx.state.model.parameters():
        p.requires_grad_(False)
    projection = task.trainable().get("projection")
    if projection is not None:
        ctx.state.hidden_projection = projection.weight.detach().clone()
    ctx.state.details.append({"step": config.summary(), "run_dir": str(run_dir), "resumed_from_step": result.resumed_from,
                        "final_eval": result.final_eval, "log": result.rows})


def _fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the student's starting weights (same recipe + same model = same run)."""
    import hashlib
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        flat = t.detach().float().flatten()
        h.update(flat[:: max(1, flat.numel() // 64)].numpy().tobytes())
    return h.hexdigest()[:16]
