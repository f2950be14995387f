"""The model in memory as a `ModelSource`: loaded once, restored between recipes; and the same
model on a rank other than 0 under torchrun, which takes part in the calibration collectives and
evaluates and writes nothing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from slimkit.compression.job import CompressJob, run_compress
from slimkit.compression.report import Measured, build_report, model_sparsity
from slimkit.data.corpus import load_split
from slimkit.data.tokens import calibration_windows
from slimkit.evaluation.quality import QualityMeter
from slimkit.evaluation.size import bytes_by_kind, files_bytes
from slimkit.export.hf import save_model_dir
from slimkit.models.loading import LoadedModel, load_model
from slimkit.models.snapshot import ModelSnapshot
from slimkit.paths import ModelDir
from slimkit.progress import NoProgress, Progress
from slimkit.protocol import EvalSettings
from slimkit.recipes.apply import CompressionResult, compress
from slimkit.recipes.context import RunResources
from slimkit.recipes.schema import Recipe
from slimkit.recipes.state import save_compression_state
from slimkit.reports.allocation import allocation_plot
from slimkit.reports.tables import report_markdown, training_plot
from slimkit.results import CompressReport, Quality


def as_saved(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the weights to the dtype the output is saved in, in place, so that the report measures
    the model the directory holds (a bf16 checkpoint computes in fp32 here, and values on a grid of
    fp16 scales are not all bf16 numbers). Nothing changes when they are the same dtype."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype and not p.is_meta:
            p.data = p.data.to(dtype).to(p.dtype)


@dataclass
class CompressedInMemory:
    """One recipe's compressed model, still in memory, and its report."""

    loaded: LoadedModel
    result: CompressionResult
    report: CompressReport
    save_dtype: torch.dtype | None

    def write(self, directory: Path, final: Path) -> None:
        directory.mkdir(exist_ok=True)
        layout = ModelDir(directory)
        save_model_dir(self.loaded, directory, self.save_dtype)
        layout.recipe.write_text(self.result.recipe.to_yaml())
        save_compression_state(self.result.records, layout.compression)
        self.report.size.stored_bytes = files_bytes(directory, ModelDir.WEIGHTS_GLOB)
        self.report.output = str(final)
        layout.report_json.write_text(json.dumps(self.report.to_dict(), indent=2))
        layout.report_md.write_text(report_markdown(self.report))
        training_plot(self.report.compression.structure_and_training, layout.training_curve)
        divergence = self.report.compressed.divergence
        allocation_plot(self.report.compression.structure_and_training, divergence.mean_kld if divergence else None,
                        layout.allocation_plot)


class InMemorySource:
    """The whole model in RAM (or on `job.device`, one block at a time during calibration)."""

    writes_output = True

    def __init__(self, job: CompressJob, progress: Progress = NoProgress()):
        self.job, self.progress = job, progress

    @property
    def name(self) -> str:
        return self.loaded.name

    def open(self, log: Callable[[str], None]) -> None:
        self.loaded = load_model(self.job.model)
        log(f"loaded {self.loaded.name} ({self.loaded.adapter.name}, {self.loaded.kind}) in "
            f"{self.loaded.load_seconds:.1f}s" + (" from cache" if self.loaded.from_cache else ""))
        self.split = load_split(self.job.settings.data)
        log(f"data: {self.split.describe()}")
        self.original = ModelSnapshot.of(self.loaded.model) if len(self.job.recipes) > 1 else None
        self.original_model = self.loaded.model

    def measure_dense(self) -> Quality:
        loaded = self.loaded
        self.meter = QualityMeter(loaded, self.split, self.job.settings, self.progress, self.job.device)
        zeros, total = model_sparsity(loaded.model, list(loaded.adapter.linears(loaded.model)))
        self.dense_sparsity = zeros / total
        self.dense_by_kind = bytes_by_kind(loaded.model, loaded.adapter, loaded.source_dtype.itemsize)
        return self.meter.measure("dense")

    def _calibration(self) -> torch.Tensor:
        s = self.job.settings
        return calibration_windows(self.loaded.tokenizer, self.split, s.calibration_windows, s.calibration_seqlen,
                                   s.seed)

    def _run(self, index: int, recipe: Recipe, progress: Progress) -> CompressionResult:
        """`recipe` on the original model (restored after an earlier recipe)."""
        if index and self.original is not None:
            self.loaded.model = self.original_model  # a structural recipe replaced the object
            self.original.restore(self.loaded.model)
        job = self.job
        run = RunResources(progress, self._calibration if self.loaded.tokenizer is not None else None,
                           job.offload_dir, self.loaded.tokenizer, self.split, job.runs_dir, job.restart_training,
                           device=job.device, file_overhead=self._gguf_overhead, decode_costs=self._decode_costs)
        result = compress(self.loaded.model, recipe, self.loaded.adapter, run)
        self.loaded.model = result.model
        return result

    def _decode_costs(self, types: list[str]):
        from slimkit.benchmarks.decode_costs import decode_costs_for

        parameters = sum(p.numel() for p in self.loaded.model.parameters())
        return decode_costs_for(self.job.model, parameters, types, torch.get_num_threads(), log=self.progress.note)

    def _gguf_overhead(self, model: torch.nn.Module) -> int:
        from slimkit.export.gguf.writer import metadata_bytes

        return metadata_bytes(model, self.loaded.tokenizer)

    def compress(self, index: int, recipe: Recipe, baseline: Quality | None) -> CompressedInMemory:
        start = time.perf_counter()
        result = self._run(index, recipe, self.progress)
        compress_s = time.perf_counter() - start
        as_saved(self.loaded.model, self.job.save_dtype or self.loaded.source_dtype)
        after = self.meter.measure(recipe.name, result.hidden_projection)
        timing = {"load_s": self.loaded.load_seconds, "compress_s": compress_s,
                  "eval_before_s": baseline.details["seconds"], "eval_after_s": after.details["seconds"]}
        measured = Measured(baseline, self.dense_sparsity, after, self.dense_by_kind, timing)
        report = build_report(self.loaded, result, self.split, self.job.settings, measured)
        return CompressedInMemory(self.loaded, result, report, self.job.save_dtype)

    def finish(self) -> None:
        pass


class RankSource(InMemorySource):
    """A rank other than 0 of `torchrun ... slimkit compress`: the same recipes on the same model,
    taking part in the calibration collectives; it evaluates nothing and writes nothing."""

    writes_output = False

    def compress(self, index: int, recipe: Recipe, baseline: Quality | None) -> None:
        self._run(index, recipe, NoProgress())


def compress_to_dir(model: str, recipes: list[Recipe], output: str | Path, settings: EvalSettings = EvalSettings(),
                    progress: Progress = NoProgress(), log: Callable[[str], None] = lambda m: None,
                    **options) -> list[CompressReport]:
    """`run_compress` in memory: the Python API's one-call compress (`options`: CompressJob's fields)."""
    job = CompressJob(model, tuple(recipes), Path(output), settings, **options)
    return run_compress(job, InMemorySource(job, progress), log)
