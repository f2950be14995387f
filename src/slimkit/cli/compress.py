"""`slimkit compress`: parse the options, check what can be checked before loading, and run
the pipeline's compress stage (and, with --bench, its pack and measure stages)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional

import typer

from slimkit.cli.console import console, quiet_transformers
from slimkit.cli.errors import friendly_errors
from slimkit.cli.options import (
    COMPRESS_SETTINGS,
    OVERWRITE_HELP,
    SAVE_DTYPES,
    device_option,
    settings_options,
    stream_option,
)
from slimkit.compression import CompressJob
from slimkit.devices import resolve_device
from slimkit.errors import SlimkitError
from slimkit.io.outputs import reserve_output
from slimkit.preflight import outline
from slimkit.protocol import BenchSettings, EvalSettings

OFFLOAD_HELP = "keep calibration activations in this dir on disk instead of RAM (big models)"
RESTART_HELP = "distill steps: discard an interrupted training run (e.g. a damaged checkpoint) and start it from step 0"
BUDGET_HELP = {"target_bpw": "GGML types chosen tensor by tensor (gguf_allocate) so that the GGUF's whole file "
                             "has these bits per weight",
               "target_size": "... so that the GGUF's whole file takes this many bytes (100MB, 1.5GB)",
               "max_kld": "... the smallest file whose predicted mean KLD from the model stays within this",
               "max_decode_ms": "... the least predicted KLD whose llama.cpp decode takes at most this many ms per "
                                "token here (each type's cost measured with llama-bench once per machine: make peers)"}


@friendly_errors
@settings_options(EvalSettings, COMPRESS_SETTINGS)
def compress(
    model: str = typer.Argument(..., help="packaged name (see `slimkit models`), HF model dir, or .gguf file"),
    recipe: List[str] = typer.Option([], "--recipe", "-r", help="built-in recipe name or YAML/JSON file; repeat to compare several"),
    output: Path = typer.Option(..., "--output", "-o", help="output dir (written atomically)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    offload_activations: Optional[Path] = typer.Option(None, help=OFFLOAD_HELP),
    save_dtype: str = typer.Option("auto", help="dtype of the saved dense weights: auto (the checkpoint's own), "
                                   "float32, bfloat16, float16; compression always computes in float32"),
    restart: bool = typer.Option(False, "--restart", help=RESTART_HELP),
    bench: bool = typer.Option(False, "--bench", help="also pack each output (OUT/.../packed) and measure "
                               "decode/prefill latency, throughput, RSS and size against the dense model"),
    stream: str = stream_option("a killed run resumes at the block where it stopped"),
    device: str = device_option("the block being calibrated, its statistics and solves; the rest stays on "
                                "the CPU or on disk"),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help=BUDGET_HELP["target_bpw"]),
    target_size: Optional[str] = typer.Option(None, "--target-size", help=BUDGET_HELP["target_size"]),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help=BUDGET_HELP["max_kld"]),
    max_decode_ms: Optional[float] = typer.Option(None, "--max-decode-ms", help=BUDGET_HELP["max_decode_ms"]),
    settings=None,
    explicit=frozenset(),
) -> None:
    """Compress a model with one or more recipes, evaluate before and after, write HF dirs.

    With one recipe, OUTPUT is the model dir; with several, each goes to OUTPUT/<recipe>/ and
    OUTPUT/summary.md compares them. Each model dir loads with plain transformers and holds
    recipe.yaml, report.json, report.md and compression.safetensors (masks, scales).

    Examples:

      slimkit compress smollm2-135m -r rtn-int4-g64 -o out/int4

      slimkit compress smollm2-135m -r magnitude-2of4 -r rtn-int4-g64 -o out/cmp

      slimkit compress smollm2-135m -r gptq-int4-g64 -o out/gptq --full     # the papers' sizes

      slimkit compress ./llama-8b -r gptq-int4-g64 -o out/8b --stream on   # bigger than RAM; rerun resumes

      slimkit compress smollm2-135m --target-bpw 4.5 -o out/4.5bpw   # the best GGUF for a budget (or --max-decode-ms 30)
    """
    from slimkit.calibration.distributed import init_from_env
    from slimkit.pipeline import check_several_processes

    if save_dtype not in SAVE_DTYPES:
        raise SlimkitError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype}")
    place = str(resolve_device(device))
    rank, size = init_from_env()  # under torchrun: join the group; rank 0 alone evaluates and writes
    if size > 1 and bench:
        raise SlimkitError("several processes (torchrun) do not benchmark: drop --bench")
    with reserve_output(output, overwrite) if rank == 0 else contextlib.nullcontext():  # a clash fails first
        recipes_ = _recipes(recipe, budget_recipes(target_bpw, target_size, max_kld, max_decode_ms))
        if size > 1:
            check_several_processes(recipes_, stream)  # before the model is touched
        settings = _preflight(model, recipes_, settings, explicit, offload_activations)
        quiet_transformers()
        job = CompressJob(model, tuple(recipes_), output, settings, overwrite, _dtype(save_dtype),
                          str(offload_activations) if offload_activations else None, place,
                          restart_training=restart)
        reports = _run(job, stream)
    if reports and bench:  # (no reports: a torchrun rank other than 0)
        _bench_outputs(model, recipes_, output, settings)


def _recipes(names: list[str], budgets: list) -> list:
    from slimkit.recipes import get_recipe

    recipes = [get_recipe(r) for r in names] + budgets
    if not recipes:
        raise SlimkitError("name a recipe (-r) or a budget (--target-bpw, --target-size, --max-kld, "
                           "--max-decode-ms)")
    given = [r.name for r in recipes]
    if len(set(given)) != len(given):
        raise SlimkitError(f"recipe names must differ to share an output dir, got {given}")
    return recipes


def budget_recipes(target_bpw: float | None, target_size: str | None, max_kld: float | None,
                   max_decode_ms: float | None = None) -> list:
    """The gguf_allocate recipe of a budget option (at most one), named after it."""
    from slimkit.recipes import parse_recipe

    given = {k: v for k, v in (("target_bpw", target_bpw), ("target_size", target_size), ("max_kld", max_kld),
                               ("max_decode_ms", max_decode_ms)) if v is not None}
    if len(given) > 1:
        raise SlimkitError(f"give one budget, not {' and '.join('--' + k.replace('_', '-') for k in given)}")
    if not given:
        return []
    (key, value), = given.items()
    name = f"gguf-allocated-{key.replace('_', '-')}-{str(value).lower()}"
    return [parse_recipe({"name": name, "steps": [{"method": "gguf_allocate", key: value}]})]


def _run(job: CompressJob, stream: str) -> list:
    """The pipeline's compress stage, with progress; its table printed (rank 0)."""
    from slimkit.pipeline import compress_stage
    from slimkit.progress import RichProgress
    from slimkit.reports.tables import comparison_rows, metric_legend, rich_table

    with RichProgress(console) as progress:
        _, reports = compress_stage(job, progress, lambda m: console.print(f"[dim]{m}[/dim]"), stream)
    if reports:
        console.print(rich_table(comparison_rows(reports), f"slimkit compress: {reports[0].model.name}"))
        console.print(f"{metric_legend(reports[0])}\npacked MB = the packed format's arithmetic; "
                      f"total time {reports[-1].timing['total_s']:.0f}s; output: {job.output}")
    return reports


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def _preflight(model: str, recipes: list, settings, explicit: frozenset[str], offload: Optional[Path]):
    """Everything that can be checked before the model loads (seconds, not minutes); returns
    the settings with sequence lengths that fit the model."""
    from slimkit.preflight import check_data, check_recipe_shapes, check_work_dir, fit_settings

    check_data(Path(settings.data) if settings.data else None)
    check_work_dir(offload, "--offload-activations")
    shape = outline(model)
    settings = fit_settings(shape, settings, explicit)
    for recipe in recipes:
        check_recipe_shapes(shape, recipe)
    shape.adapter  # an architecture slimkit has no adapter for fails here, before loading
    return settings


def _bench_outputs(model: str, recipes: list, root: Path, settings) -> None:
    """`compress --bench`: pack each output (OUT/.../packed) and measure it against the dense model."""
    from slimkit.benchmarks import model as bench_model
    from slimkit.io.outputs import record_written, write_text_atomic
    from slimkit.paths import CompressOutput
    from slimkit.pipeline import Variant, measure_stage, pack_stage
    from slimkit.progress import RichProgress

    layout = CompressOutput(root.absolute(), tuple(r.name for r in recipes))
    with RichProgress(console) as progress:
        measured = pack_stage(layout, [Variant(r.name, r) for r in recipes],
                              lambda v: layout.model_dir(v.recipe.name).packed, progress,
                              on_error=lambda v, exc: console.print(f"[yellow]not benchmarked[/yellow] {v.label}: {exc}"))
        base, rows = measure_stage(model, list(measured.values()), progress, BenchSettings(windows=settings.max_windows))
        rows = bench_model.compare([base, *rows])
    md = bench_model.table(rows)
    console.print(md)
    write_text_atomic(layout.bench_md, md + "\n")
    record_written(layout.root, layout.bench_md)  # the output's manifest now lists it
