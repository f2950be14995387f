"""`slimkit advise`, `slimkit reproduce`, `slimkit report` and `slimkit lottery`: runs that
measure and decide, and the page that shows them."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from slimkit.advisor.search import Constraints
from slimkit.cli.console import console, quiet_transformers
from slimkit.cli.errors import friendly_errors
from slimkit.cli.options import (
    OVERWRITE_HELP,
    settings_options,
)
from slimkit.io.outputs import reserve_output
from slimkit.paths import MeasureDir
from slimkit.preflight import outline
from slimkit.protocol import FULL, QUICK
from slimkit.pruning.lottery import LotteryConfig


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


@friendly_errors
@settings_options(Constraints, ("max_ppl_increase", "max_kld", "max_memory_mb", "max_decode_ms", "min_throughput",
                                "max_size"),
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

      slimkit advise smollm2-135m --target llamacpp --max-size 100MB  # allocated types vs llama.cpp's
    """
    from slimkit.advisor import AdviseSettings, detect
    from slimkit.advisor import advise as run_advise
    from slimkit.progress import RichProgress

    with reserve_output(output, overwrite, inputs=[model]):
        outline(model)
        quiet_transformers()
        device = detect(target)
        settings = AdviseSettings(QUICK if quick else FULL, include_research=include_research, overwrite=overwrite)
        console.print(f"device: {device.describe()}")
        with RichProgress(console) as progress:
            result = run_advise(model, constraints, device, output, settings, progress, log=console.print)
    console.print(MeasureDir(output, "advise").md.read_text(), markup=False, highlight=False)
    console.print(f"wrote {output} (advise.md, advise.json, frontier.png"
                  + (", recommended.yaml)" if result.recommended else ")"))


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
    from slimkit.advisor.reproduce import reproduce as run_reproduce
    from slimkit.advisor.reproduce import table
    from slimkit.progress import RichProgress

    with reserve_output(output, overwrite, inputs=[model]):
        outline(model)
        quiet_transformers()
        with RichProgress(console) as progress:
            rows = run_reproduce(model, output, QUICK if quick else FULL, progress, log=console.print, overwrite=overwrite)
    console.print(table(rows), markup=False, highlight=False)
    console.print(f"wrote {output} (reproduce.md, reproduce.json, reproduce.png)")
