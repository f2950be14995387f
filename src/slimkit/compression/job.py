"""One compress body: a `CompressJob` run by `run_compress` over any `ModelSource`.

A source is where the model lives while its recipes run: in memory (`compression/memory.py`),
streamed one block at a time from disk (`streaming/job.py`), or one rank of several under
torchrun (a rank other than 0 joins the calibration collectives and writes nothing). The loop is
the same for all of them: reserve the output, measure the dense model, run each recipe, write
its model dir, and with several recipes the summary that compares them; every output file comes
from here, whichever the source.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from slimkit.io.outputs import output_directory, reserve_output
from slimkit.paths import CompressOutput
from slimkit.protocol import EvalSettings
from slimkit.recipes.schema import Recipe
from slimkit.reports.tables import comparison_rows, markdown_table, metric_legend
from slimkit.results import CompressReport, Quality


@dataclass(frozen=True)
class CompressJob:
    """Everything a compress run depends on (the model source is chosen from it, not stored in it)."""

    model: str  # packaged name, HF dir or .gguf
    recipes: tuple[Recipe, ...]
    output: Path  # the model dir for one recipe, else OUTPUT/<recipe>/ each and a summary
    settings: EvalSettings = EvalSettings()
    overwrite: bool = False
    save_dtype: torch.dtype | None = None  # None: the checkpoint's own
    offload_dir: str | None = None  # calibration activations on disk instead of RAM
    device: str = "cpu"
    runs_dir: str | None = None  # training runs (distill steps), resumable
    restart_training: bool = False

    @property
    def layout(self) -> CompressOutput:
        return CompressOutput(Path(self.output).absolute(), tuple(r.name for r in self.recipes))


class Compressed(Protocol):
    """One recipe's result, held by its source until it is written."""

    report: CompressReport

    def write(self, directory: Path, final: Path) -> None:
        """Write the model dir into `directory` (inside the atomic output; `final` is where it will be)."""


class ModelSource(Protocol):
    """Where the model lives while the job's recipes run."""

    writes_output: bool  # False: a rank other than 0 (it computes, rank 0 evaluates and writes)
    name: str

    def open(self, log: Callable[[str], None]) -> None: ...

    def measure_dense(self) -> Quality: ...

    def compress(self, index: int, recipe: Recipe, baseline: Quality | None) -> Compressed | None: ...

    def finish(self) -> None:
        """After the output is complete: drop what a resumed run would have needed."""


def run_compress(job: CompressJob, source: ModelSource, log: Callable[[str], None] = lambda m: None
                 ) -> list[CompressReport]:
    """Run `job` on `source`; the reports, one per recipe ([] on a rank that writes nothing)."""
    start = time.perf_counter()
    if not source.writes_output:
        source.open(log)
        for index, recipe in enumerate(job.recipes):
            source.compress(index, recipe, None)
        return []
    layout = job.layout
    with reserve_output(layout.root, job.overwrite, inputs=[job.model]):
        source.open(log)
        baseline = source.measure_dense()
        reports = []
        with output_directory(layout.root, job.overwrite, inputs=[job.model], command="compress") as root:
            written = CompressOutput(root, layout.recipes)
            for index, recipe in enumerate(job.recipes):
                done = source.compress(index, recipe, baseline)
                done.report.timing["total_s"] = time.perf_counter() - start
                done.write(written.model_dir(recipe.name).root, layout.model_dir(recipe.name).root)
                reports.append(done.report)
                log(f"done: {recipe.name} (-> {layout.model_dir(recipe.name).root})")
            if len(reports) > 1:
                write_summary(written, reports, source.name)
        source.finish()
    log(f"wrote {layout.root}")
    return reports


def write_summary(written: CompressOutput, reports: list[CompressReport], model_name: str) -> None:
    """OUTPUT/summary.md and summary.json: the recipes side by side."""
    summary = "\n".join([f"# slimkit compress: {model_name}", "", markdown_table(comparison_rows(reports)), "",
                         f"- {metric_legend(reports[0])}", ""])
    written.summary_md.write_text(summary)
    written.summary_json.write_text(json.dumps([r.to_dict() for r in reports], indent=2))
