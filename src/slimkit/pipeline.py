"""The flow, in the README's order: load → calibrate → compress → pack → evaluate/benchmark → report.

Each stage is one function with typed inputs and outputs:
- `compress_stage`: run a `CompressJob` on the model source it needs (in memory, streamed from
  disk when it does not fit, or this process's rank under torchrun; `model_source`): evaluate
  the model, run each recipe, evaluate again, write one model dir per recipe and a summary
  (`compression.run_compress`, the one compress body);
- `pack_stage`: store each compressed model in the packed format it is measured in;
- `measure_stage`: latency, throughput, memory, size and quality of the baseline and of each model,
  each in its own process, KLD against the baseline.
`compress_pack_measure` runs the three in order; `slimkit compress --bench`, the advisor and
`slimkit reproduce` all go through it, so no caller glues the stages again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from slimkit.compression.job import CompressJob, ModelSource, run_compress
from slimkit.errors import SlimkitError
from slimkit.paths import CompressOutput
from slimkit.progress import NoProgress, Progress
from slimkit.protocol import BenchSettings, EvalSettings
from slimkit.recipes.schema import Recipe
from slimkit.results import BenchRow, CompressReport

STREAM_CHOICES = ("auto", "on", "off")
DENSE = "dense"  # measure the compressed dir as written (no packing)


@dataclass(frozen=True)
class Variant:
    """One model to produce and measure: a recipe, and the packed format it is measured in."""

    label: str
    recipe: Recipe
    pack: str = "auto"  # a format name, "auto" (what the recipe recorded), or DENSE


@dataclass
class PipelineResult:
    reports: list[CompressReport]  # one per distinct recipe
    measured: dict[str, Path]  # variant label -> the directory that was measured
    baseline: BenchRow  # the dense model: every row's KLD reference
    rows: list[BenchRow] = field(default_factory=list)  # one per variant, in order


def streams(stream: str, model: str) -> bool:
    """--stream: on, off, or auto (an HF dir whose float32 size needs more than half the free RAM)."""
    if stream not in STREAM_CHOICES:
        raise SlimkitError(f"--stream must be auto, on or off, not {stream}")
    if stream != "auto":
        return stream == "on"
    from slimkit.calibration.distributed import world
    from slimkit.models.loading import resolve
    from slimkit.models.streamed import CheckpointShards, should_stream

    path, _ = resolve(model)
    return path.is_dir() and world()[1] == 1 and should_stream(CheckpointShards.of_dir(path))


def check_several_processes(recipes: tuple[Recipe, ...] | list[Recipe], stream: str) -> None:
    """Under torchrun, what cannot run split over processes, said before any model is touched."""
    if stream == "on":
        raise SlimkitError("several processes (torchrun) calibrate in-memory models for now: drop --stream on")
    for why in filter(None, (step.one_process_only() for r in recipes for step in r.steps)):
        raise SlimkitError(why)


def model_source(job: CompressJob, stream: str, progress: Progress, log: Callable[[str], None]) -> ModelSource:
    """Where `job`'s model lives while it runs: this rank's part of a torchrun group, the model
    streamed from disk, or in memory. Said before any model loads when the job cannot run there."""
    from slimkit.calibration.distributed import world
    from slimkit.compression.memory import InMemorySource, RankSource

    rank, size = world()
    if size > 1:
        check_several_processes(job.recipes, stream)
        log(f"rank {rank} of {size}: calibration windows split, statistics summed, solves shared")
        return InMemorySource(job, progress) if rank == 0 else RankSource(job)
    if streams(stream, job.model):
        from slimkit.streaming.job import StreamedSource

        return StreamedSource(job, progress)
    return InMemorySource(job, progress)


def compress_stage(job: CompressJob, progress: Progress = NoProgress(), log: Callable[[str], None] = lambda m: None,
                   stream: str = "off") -> tuple[CompressOutput, list[CompressReport]]:
    """(the output's layout, one report per recipe; [] on a torchrun rank that writes nothing)."""
    return job.layout, run_compress(job, model_source(job, stream, progress, log), log)


def pack_stage(layout: CompressOutput, variants: list[Variant], where: Callable[[Variant], Path],
               progress: Progress, on_error: Callable[[Variant, Exception], None] | None = None) -> dict[str, Path]:
    """Pack each variant's model dir into `where(variant)` (a slimkit output, replaced if there).
    With `on_error`, a model that cannot be packed is reported there and left out."""
    from slimkit.compression.pack_dir import pack_to_dir

    measured = {}
    for v in variants:
        source = layout.model_dir(v.recipe.name).root
        if v.pack == DENSE:
            measured[v.label] = source
            continue
        try:
            pack_to_dir(str(source), where(v), fmt=v.pack, overwrite=True, progress=progress)
        except SlimkitError as exc:
            if on_error is None:
                raise
            on_error(v, exc)
            continue
        measured[v.label] = where(v)
    return measured


def measure_stage(baseline: str, models: list[Path | str], progress: Progress, bench: BenchSettings = BenchSettings(),
                  measured_baseline: BenchRow | None = None) -> tuple[BenchRow, list[BenchRow]]:
    """(the baseline's row, one row per model), each measured in a fresh process (its RSS is its own).
    The baseline is measured first (or `measured_baseline` reused) and is every model's KLD
    reference unless `bench` names another one."""
    from slimkit.benchmarks import model as bench_model

    bench = bench_model.with_reference(bench, str(baseline))
    base = measured_baseline or bench_model.measure_isolated(str(baseline), bench, note=progress.note)
    rows = [bench_model.measure_isolated(str(m), bench, note=progress.note) for m in progress.track(models, "measure")]
    return base, rows


@dataclass(frozen=True)
class MeasurePlan:
    """What `compress_pack_measure` makes and measures: the variants, where their compressed dirs
    (`compressed`) and packed dirs (`where`) go, recipes only compressed and evaluated
    (`also_compress`), and the benchmark's settings."""

    variants: list[Variant]
    compressed: Path
    where: Callable[[Variant], Path]
    also_compress: tuple[Recipe, ...] = ()
    bench: BenchSettings = BenchSettings()


def compress_pack_measure(model: str, plan: MeasurePlan, settings: EvalSettings, progress: Progress = NoProgress(),
                          log: Callable[[str], None] = lambda m: None, measured_baseline: BenchRow | None = None
                          ) -> PipelineResult:
    """Compress every variant's recipe (and `plan.also_compress`), pack each variant, and measure the
    dense model (unless `measured_baseline` is its row already) and each packed model against it."""
    recipes = list({r.name: r for r in [*plan.also_compress, *(v.recipe for v in plan.variants)]}.values())
    log(f"compressing {len(recipes)} recipe(s): {', '.join(r.name for r in recipes)}")
    job = CompressJob(model, tuple(recipes), Path(plan.compressed), settings, overwrite=True)
    layout, reports = compress_stage(job, progress, log)
    measured = pack_stage(layout, plan.variants, plan.where, progress)
    log("measuring the dense model and each compressed one, each in its own process")
    base, rows = measure_stage(model, list(measured.values()), progress, plan.bench, measured_baseline)
    return PipelineResult(reports, measured, base, rows)
