"""`slimkit bench sparsity` and `slimkit bench model`: measurements on this machine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import List, Optional

import typer

from slimkit.cli.console import console, quiet_transformers
from slimkit.cli.errors import friendly_errors
from slimkit.cli.options import (
    OVERWRITE_HELP,
    settings_options,
)
from slimkit.devices import resolve_device
from slimkit.errors import SlimkitError
from slimkit.io.outputs import reserve_output
from slimkit.paths import ExportDir, MeasureDir
from slimkit.preflight import outline
from slimkit.protocol import BenchSettings

bench_app = typer.Typer(help="Measure on this machine: sparse kernels (theory vs reality), whole models.",
                        no_args_is_help=True, rich_markup_mode=None)


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
            result = bench.run(model, output, bench.SparsityGrid(tuple(levels), tuple(sizes), repeats, blocks),
                               progress, overwrite)
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
    best_dense: bool = typer.Option(True, "--best-dense/--first-baseline", help="torch: every ratio against the "
                                    "fastest dense configuration of each measurement (the baseline fp32 or bf16, "
                                    "eager or compiled; bf16 timed where a probe GEMM says it could win on this "
                                    "CPU), not against the first model's fp32 eager numbers"),
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
    from slimkit.io.outputs import output_directory

    if runtime not in ("torch", "llamacpp"):
        raise SlimkitError(f"--runtime must be torch or llamacpp, not {runtime}")
    resolve_device(settings.device)  # a missing GPU is said before any model loads
    settings = settings.model_copy(update={"compiled": compiled and runtime == "torch",
                                           "best_dense": best_dense and runtime == "torch"})
    with reserve_output(output, overwrite, inputs=models) if output else contextlib.nullcontext():
        for m in models:
            if not (runtime == "llamacpp" and (m.endswith(".gguf") or ExportDir(Path(m)).gguf.is_file())):
                outline(m)
        rows, md = _measure_models(models, settings, runtime, threads, llamacpp)
        console.print(md)
        if output is not None:
            with output_directory(output, overwrite, inputs=models, command="bench model") as tmp:
                written = MeasureDir(tmp, "bench")
                written.md.write_text(md + "\n")
                written.json.write_text(json.dumps([r.to_dict() for r in rows], indent=2))


def _measure_models(models: list[str], settings, runtime: str, threads: int, llamacpp: bool) -> tuple[list, str]:
    """(the rows, their markdown table): in slimkit's runtime (+ llama.cpp columns), or in llama.cpp's."""
    import tempfile

    from slimkit.benchmarks import model as bench
    from slimkit.progress import RichProgress

    with RichProgress(console) as progress:
        if runtime == "llamacpp":
            from slimkit.benchmarks.llamacpp_model import llamacpp_table, run_llamacpp

            with tempfile.TemporaryDirectory(prefix="slimkit-llamacpp-") as work:  # exports, base.kld
                rows = run_llamacpp(models, settings, Path(work), threads, progress)
            return rows, llamacpp_table(rows)
        rows = bench.run(models, settings, progress)
        if llamacpp:
            _llamacpp_columns(rows, models, settings, progress)
        return rows, bench.table(rows)


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
        add_llamacpp_columns(rows[:len(models)], models, settings, Path(work), progress)  # not the bf16 row

