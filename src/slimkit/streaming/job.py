"""`slimkit compress --stream`: compress a checkpoint bigger than RAM, one block at a time.

The model is a skeleton on the meta device (`models/streamed.py`). For each recipe, every block is
read from the checkpoint's shards (compute dtype), compressed by the recipe's steps (the
calibrated one through the sequential engine), written as one shard of the output, and dropped.
After each block the run checkpoints itself (`streaming/work.py`), so a killed run resumes at the
block where it stopped. The output is the in-memory path's output, tensor for tensor: a sharded
HF dir (`model-0000i-of-0000n.safetensors` + index), compression.safetensors, the reports.

What streams: any number of steps that work one tensor at a time (rtn_quantize, magnitude_prune
per layer) around at most one calibrated step (gptq, awq, sparsegpt, wanda, gguf_quantize).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from slimkit.compression.job import CompressJob, run_compress
from slimkit.compression.report import LayerTally, Measured, build_report
from slimkit.data.corpus import TextSplit, load_split
from slimkit.data.tokens import calibration_windows
from slimkit.errors import RecipeError
from slimkit.evaluation.perplexity import PerplexityProtocol
from slimkit.evaluation.streamed import streamed_perplexity
from slimkit.models.streamed import CheckpointShards, StreamedModel, open_streamed
from slimkit.paths import StreamWork
from slimkit.progress import NoProgress, Progress
from slimkit.protocol import EvalSettings
from slimkit.recipes.apply import CompressionResult
from slimkit.recipes.builtin_steps import handler_for
from slimkit.recipes.context import ModelState, RunResources, StepContext
from slimkit.recipes.schema import Recipe
from slimkit.results import CompressReport, Quality
from slimkit.streaming.blocks import StreamedBlocks
from slimkit.streaming.output import write_streamed_output
from slimkit.streaming.work import StreamState, WorkDir, run_identity


def check_streamable(recipe: Recipe) -> None:
    """Refuse, before any work, what cannot run one block at a time."""
    calibrated = [s.method for s in recipe.steps if s.needs_calibration]
    if len(calibrated) > 1:
        raise RecipeError(f"recipe {recipe.name}: a streamed run takes at most one calibrated step, got "
                          f"{', '.join(calibrated)}; compress in two runs (the second on the first's output)")
    for step in recipe.steps:
        if step.needs_teacher or step.changes_shapes or step.rewrites_weights:
            raise RecipeError(f"recipe {recipe.name}: {step.method} works on the whole model and cannot stream; "
                              "run it without --stream")
        if why := step.needs_every_block():
            raise RecipeError(f"recipe {recipe.name}: {step.method} {why}; run it without --stream")
        if (step.include_lm_head or step.include_embeddings) and not step.quantizes_outer:
            raise RecipeError(f"recipe {recipe.name}: {step.method} with include_lm_head/include_embeddings "
                              "cannot stream yet; run it without --stream")


def _quality(streamed: StreamedModel, weights: CheckpointShards, split: TextSplit, settings: EvalSettings,
             progress: Progress, label: str, device: str = "cpu") -> Quality:
    r = streamed_perplexity(streamed, weights, split, PerplexityProtocol(settings.seqlen, settings.max_windows),
                            progress, f"ppl ({label}, streamed)", device)
    return Quality(metric="ppl", value=r.ppl, details=r.to_dict())


def _outer_modules(streamed: StreamedModel) -> list[torch.nn.Module]:
    from slimkit.models.adapters import submodule_at

    adapter, model = streamed.adapter, streamed.model
    mods = list(adapter.embedding_modules(model).values())
    if adapter.final_norm:
        mods.append(submodule_at(model.base_model, adapter.final_norm))
    head = submodule_at(model, adapter.lm_head) if adapter.lm_head else None
    if head is not None and all(head.weight is not m.weight for m in mods):
        mods.append(head)
    return mods


def _run_steps(streamed: StreamedModel, name: str, steps: list, ctx: StepContext, access: StreamedBlocks,
               state: StreamState) -> None:
    calibrated = [s for s in steps if s.needs_calibration]
    if calibrated:
        handler_for(calibrated[0])(calibrated[0], ctx)  # the engine drives `access` block by block
        return
    blocks = list(enumerate(streamed.adapter.get_blocks(streamed.model)))[state.next_block:]
    for index, block in ctx.run.progress.track(blocks, f"{name}: blocks"):
        access.open(index, block)
        access.close(index, block, None)


def stream_recipe(streamed: StreamedModel, recipe: Recipe, work: WorkDir, job: CompressJob, split: TextSplit,
                  progress: Progress, save_dtype: torch.dtype) -> tuple[StreamState, CompressionResult]:
    """Compress every block of `streamed` with `recipe` into `work` (resuming where it stopped);
    `job`: the calibration settings, offload dir and device."""
    settings = job.settings
    check_streamable(recipe)
    state = work.start()
    start = time.perf_counter()

    def calibration() -> torch.Tensor:
        return calibration_windows(streamed.tokenizer, split, settings.calibration_windows,
                                   settings.calibration_seqlen, settings.seed)

    run = RunResources(progress, calibration, job.offload_dir, streamed.tokenizer, split, device=job.device)
    ctx = StepContext(ModelState(streamed.model, streamed.adapter), run)
    only_outer = [s for s in recipe.steps if s.quantizes_outer and not s.needs_calibration]  # once, after the blocks
    steps = [s for s in recipe.steps if s not in only_outer]
    cut = next((i for i, s in enumerate(steps) if s.needs_calibration), len(steps))
    run.blocks = access = StreamedBlocks(streamed, ctx, work, state, steps[:cut], steps[cut + 1:], save_dtype)
    outer = _outer_modules(streamed) if any(s.quantizes_outer for s in recipe.steps) else []
    held = [m for m in outer if not any(p.is_meta for p in m.parameters())]  # real before (GPT-2's wpe): kept
    for module in outer:
        streamed.materialize(module)
    _run_steps(streamed, recipe.name, steps, ctx, access, state)
    for step in only_outer:
        handler_for(step)(step, ctx)
    if outer:
        _write_outer(streamed, ctx, work, outer, save_dtype, state)
        for module in outer:
            if all(module is not h for h in held):
                streamed.release(module)
    state.seconds += time.perf_counter() - start
    work.save_state(state)
    result = CompressionResult(recipe, {}, [state.seconds], engine_reports=ctx.state.engine_reports)
    return state, result


def _write_outer(streamed: StreamedModel, ctx: StepContext, work: WorkDir, outer: list, save_dtype,
                 state: StreamState) -> None:
    """Embedding, final norm and head after a step that rewrote them, with their records."""
    from slimkit.io.tensors import save_tensors_atomic
    from slimkit.recipes.state import save_compression_state

    tensors = {}
    for module in outer:
        prefix = streamed.prefix(module)
        tensors.update({prefix + n: p.detach().to(save_dtype) for n, p in module.named_parameters()
                        if prefix + n in streamed.shards.files})
    save_tensors_atomic(tensors, work.layout.outer)
    blocks_prefix = streamed.prefix(streamed.adapter.get_blocks(streamed.model))
    records = {n: r for n, r in ctx.state.records.items() if not n.startswith(blocks_prefix)}
    params = dict(streamed.model.named_parameters(remove_duplicate=False))  # a tied head's record: its name
    tally = LayerTally.of(records, params, streamed.source_dtype.itemsize)
    save_compression_state(records, work.layout.root / "records" / "outer.safetensors")
    total = LayerTally.from_dict(state.tally)
    total.add(tally)
    state.tally = total.to_dict()


@dataclass
class CompressedStreamed:
    """One recipe's compressed blocks, in its work dir, and its report."""

    streamed: StreamedModel
    work: WorkDir
    recipe: Recipe
    report: CompressReport
    save_dtype: torch.dtype

    def write(self, directory: Path, final: Path) -> None:
        write_streamed_output(self.streamed, self.work, directory, self.recipe, self.report, final, self.save_dtype)


class StreamedSource:
    """The model read from its files one block at a time; each recipe's blocks go to a work dir
    beside the output (`StreamWork`), from which a killed run resumes."""

    writes_output = True

    def __init__(self, job: CompressJob, progress: Progress = NoProgress()):
        self.job, self.progress, self.works = job, progress, []
        for recipe in job.recipes:
            check_streamable(recipe)

    @property
    def name(self) -> str:
        return self.streamed.name

    def open(self, log: Callable[[str], None]) -> None:
        self.streamed = streamed = open_streamed(streamed_source(self.job.model, log), name=self.job.model)
        self.save_dtype = self.job.save_dtype or streamed.source_dtype
        log(f"streaming {streamed.name} ({streamed.adapter.name}, {streamed.shards.nbytes() / 1e9:.2f} GB in "
            f"{len(set(streamed.shards.files.values()))} file(s)) one block at a time")
        self.split, self.log = load_split(self.job.settings.data), log

    def measure_dense(self) -> Quality:
        return self._quality(self.streamed.shards, "dense")

    def _quality(self, weights: CheckpointShards, label: str) -> Quality:
        return _quality(self.streamed, weights, self.split, self.job.settings, self.progress, label, self.job.device)

    def compress(self, index: int, recipe: Recipe, baseline: Quality | None) -> CompressedStreamed:
        job, streamed = self.job, self.streamed
        identity = run_identity(model=str(streamed.source), files=_files_signature(streamed.shards),
                                recipe=recipe.to_dict(), settings=job.settings, save_dtype=str(self.save_dtype))
        work = WorkDir(StreamWork.beside(job.layout.root, recipe.name), identity, self.log)
        state, result = stream_recipe(streamed, recipe, work, job, self.split, self.progress, self.save_dtype)
        self.works.append(work)
        return CompressedStreamed(streamed, work, recipe, self._report(result, state, work, baseline), self.save_dtype)

    def _report(self, result: CompressionResult, state: StreamState, work: WorkDir, baseline: Quality
                ) -> CompressReport:
        streamed = self.streamed
        after = self._quality(CheckpointShards.of_files(_compressed_files(streamed, work)), result.recipe.name)
        sparsity = state.baseline_zeros / state.baseline_total if state.baseline_total else 0.0
        dense_by_kind = streamed.shards.bytes_by_kind(streamed.adapter, streamed.source_dtype.itemsize)
        timing = {"load_s": 0.0, "compress_s": state.seconds, "eval_before_s": baseline.details["seconds"],
                  "eval_after_s": after.details["seconds"],
                  **{f"stream_{k}": v for k, v in state.phase_seconds.items()}}
        measured = Measured(baseline, sparsity, after, dense_by_kind, timing)
        return build_report(streamed, result, self.split, self.job.settings, measured,
                            LayerTally.from_dict(state.tally))

    def finish(self) -> None:
        for work in self.works:  # the output is complete: the resumable state is no longer needed
            work.remove()


def compress_streamed(model: str, recipes: list[Recipe], output: str | Path, settings: EvalSettings = EvalSettings(),
                      progress: Progress = NoProgress(), log: Callable[[str], None] = lambda m: None,
                      **options) -> list[CompressReport]:
    """`run_compress` streamed: `compress_to_dir`'s job for a model read one block at a time."""
    job = CompressJob(model, tuple(recipes), Path(output), settings, **options)
    return run_compress(job, StreamedSource(job, progress), log)


def _compressed_files(streamed: StreamedModel, work: WorkDir) -> list[Path]:
    """The compressed model's tensors: the blocks written, and the outer tensors (rewritten or
    as the checkpoint has them)."""
    n = len(streamed.adapter.get_blocks(streamed.model))
    files = [work.layout.block_weights(k) for k in range(n)]
    if work.layout.outer.is_file():
        files.append(work.layout.outer)
    return files + sorted(set(streamed.shards.files.values()))  # later files never override earlier names


def _files_signature(shards: CheckpointShards) -> list:
    return sorted((str(f), os.stat(f).st_size, int(os.stat(f).st_mtime)) for f in set(shards.files.values()))


def streamed_source(model: str, log: Callable[[str], None]) -> Path:
    """The HF dir to stream: the model dir itself, or the dequantized cache of a GGUF (made once,
    in memory: a GGUF bigger than RAM must be converted to safetensors first)."""
    from slimkit.models.loading import gguf_cache_dir, load_model, resolve

    path, _ = resolve(model)
    if path.suffix != ".gguf":
        return path
    cache = gguf_cache_dir(path)
    if not (cache / "config.json").is_file():
        log(f"dequantizing {path.name} once into {cache}")
        load_model(model)
    return cache
