"""The whole job: load -> evaluate -> compress -> evaluate -> write the output dir -> report."""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import slimkit
from slimkit.data.corpus import TextSplit, load_split
from slimkit.data.tokens import calibration_windows
from slimkit.devices import placed
from slimkit.evaluation.divergence import BaseLogprobs
from slimkit.evaluation.embedding import EmbeddingProtocol, sentence_embeddings, similarity
from slimkit.evaluation.perplexity import LogprobsUse, PerplexityProtocol, perplexity
from slimkit.evaluation.size import bytes_by_kind, files_bytes, packed_bytes
from slimkit.export.hf import save_model_dir
from slimkit.io.outputs import output_directory, reserve_output
from slimkit.models.loading import LoadedModel, cache_root, load_model, require_tokenizer
from slimkit.models.snapshot import ModelSnapshot
from slimkit.paths import CompressOutput, ModelDir
from slimkit.progress import NoProgress, Progress
from slimkit.protocol import EvalSettings
from slimkit.recipes.apply import CompressionResult, compress
from slimkit.recipes.context import RunResources
from slimkit.recipes.schema import Recipe
from slimkit.recipes.state import save_compression_state
from slimkit.reports.tables import comparison_rows, markdown_table, metric_legend, report_markdown, training_plot
from slimkit.results import (
    REPORT_SCHEMA_VERSION,
    CompressionSection,
    CompressReport,
    Divergence,
    LayerRow,
    ModelSection,
    Quality,
    SizeSection,
)


def protocol_text(settings: EvalSettings, kind: str) -> str:
    """The quality protocol in words, for reports."""
    if kind == "causal-lm":
        return PerplexityProtocol(settings.seqlen, settings.max_windows).describe()
    return EmbeddingProtocol(settings.n_texts).describe()


class QualityMeter:
    """Measures a model's quality on the fixed protocol, against the dense baseline."""

    def __init__(self, loaded: LoadedModel, split: TextSplit, settings: EvalSettings, progress: Progress,
                 device: str = "cpu"):
        self.loaded, self.split, self.settings, self.progress = loaded, split, settings, progress
        self.device = device  # where the model is evaluated (it goes back to the CPU afterwards)
        self.reference: torch.Tensor | None = None  # encoders: the base model's embeddings
        self.base_logprobs: BaseLogprobs | None = None  # decoders: the base model's distributions

    def measure(self, label: str, projection: torch.Tensor | None = None) -> Quality:
        """The first call measures the base model (and keeps its next-token distributions, on
        disk); later calls, or a meter given `base_logprobs`, also measure the divergence."""
        lm, s = self.loaded, self.settings
        if lm.kind == "causal-lm":
            require_tokenizer(lm, "perplexity")
            if self.base_logprobs is None:
                self.base_logprobs = BaseLogprobs.for_model(cache_root(), Path(lm.source), self.split.split_hash,
                                                            s.seqlen)
                use = LogprobsUse(record=self.base_logprobs)
            else:
                use = LogprobsUse(compare=self.base_logprobs)
            with placed(lm.model, self.device):
                r = perplexity(lm.model, lm.tokenizer, self.split, PerplexityProtocol(s.seqlen, s.max_windows),
                               self.progress, f"ppl ({label})", use)
            divergence = Divergence.from_dict(r.divergence) if r.divergence else None
            return Quality(metric="ppl", value=r.ppl, details=r.to_dict(), divergence=divergence)
        start = time.perf_counter()
        with placed(lm.model, self.device):
            emb = sentence_embeddings(lm.model, lm.tokenizer, self.split, EmbeddingProtocol(s.n_texts), self.progress)
        if self.reference is None:
            self.reference = emb
        r = similarity(self.reference, emb, self.split.split_hash, time.perf_counter() - start, projection)
        return Quality(metric="cosine", value=r.mean_cosine, details=r.to_dict())


def layer_row(name: str, record, weight: torch.Tensor, stored_bits: int) -> LayerRow:
    """One tensor's line of the report (its sparsity read from the compressed weight)."""
    bits = record.ggml.qtype if record.ggml else f"{record.quant.spec.bits}" if record.quant else f"{stored_bits}"
    if record.quant and record.quant.spec.group_size:
        bits += f" g{record.quant.spec.group_size}"
    return LayerRow(name=name, kind=record.kind, shape=list(record.shape),
                    sparsity=float((weight == 0).sum()) / weight.numel(), bits=bits, methods=record.methods,
                    notes=record.notes)


@dataclass
class LayerTally:
    """The report's per-tensor lines and their totals; a streamed run adds them up block by block."""

    rows: list[LayerRow] = field(default_factory=list)
    zeros: int = 0  # zero weights in the compressed tensors
    total: int = 0  # weights in the compressed tensors
    packed_delta: int = 0  # packed bytes minus dense bytes, over the compressed tensors

    @classmethod
    def of(cls, records: dict, params: dict[str, torch.Tensor], stored: int) -> LayerTally:
        tally = cls()
        for name, rec in records.items():
            rec.element_size = stored  # sizes as stored, not as computed
            w = params[name + ".weight"]
            tally.rows.append(layer_row(name, rec, w, stored * 8))
            tally.zeros += int((w == 0).sum())
            tally.total += w.numel()
            tally.packed_delta += packed_bytes(rec) - rec.element_size * math.prod(rec.shape)
        return tally

    def add(self, other: LayerTally) -> None:
        self.rows += other.rows
        self.zeros, self.total = self.zeros + other.zeros, self.total + other.total
        self.packed_delta += other.packed_delta

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows], "zeros": self.zeros, "total": self.total,
                "packed_delta": self.packed_delta}

    @classmethod
    def from_dict(cls, d: dict) -> LayerTally:
        return cls([LayerRow.from_dict(r) for r in d["rows"]], d["zeros"], d["total"], d["packed_delta"])


def _model_sparsity(model: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(model.named_parameters(remove_duplicate=False))
    zeros = sum(int((params[n + ".weight"] == 0).sum()) for n in names)
    total = sum(params[n + ".weight"].numel() for n in names)
    return zeros, total


def _model_section(loaded: LoadedModel) -> ModelSection:
    return ModelSection(
        name=loaded.name,
        source=str(loaded.source),
        kind=loaded.kind,
        architecture=loaded.adapter.name,
        parameters=sum(p.numel() for p in loaded.model.parameters()),
        config={k: getattr(loaded.model.config, k, None) for k in
                ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim")},
        dtype_bits=loaded.source_dtype.itemsize * 8,
        stored_dtype=str(loaded.source_dtype).removeprefix("torch."),
        computed_in=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
    )


def build_report(
    loaded: LoadedModel,
    recipe: Recipe,
    result: CompressionResult,
    split: TextSplit,
    settings: EvalSettings,
    baseline: Quality,
    baseline_sparsity: float,
    compressed: Quality,
    dense_by_kind: dict[str, int],
    timing: dict[str, float],
    tally: LayerTally | None = None,
) -> CompressReport:
    """The report of one recipe; `tally`: the per-tensor lines when the caller added them up
    (a streamed run), else they are read from the compressed model in memory."""
    stored = loaded.source_dtype.itemsize
    if tally is None:
        tally = LayerTally.of(result.records, dict(loaded.model.named_parameters(remove_duplicate=False)), stored)
    layers, zeros, total = tally.rows, tally.zeros, tally.total
    dense_bytes = sum(dense_by_kind.values())
    # structural steps shrink the dense model itself; masks and codes then pack what is left
    after_dense = (sum(bytes_by_kind(loaded.model, loaded.adapter, stored).values()) if result.details
                   else dense_bytes)
    packed = after_dense + tally.packed_delta
    return CompressReport(
        schema_version=REPORT_SCHEMA_VERSION,
        slimkit_version=slimkit.__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine={"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        model=_model_section(loaded),
        recipe=recipe.to_dict(),
        recipe_summary=recipe.summary(),
        data={"source": split.source, "split_hash": split.split_hash, "description": split.describe()},
        protocol=protocol_text(settings, loaded.kind),
        baseline=baseline,
        baseline_sparsity=baseline_sparsity,
        compressed=compressed,
        compression=CompressionSection(
            seconds=result.seconds,
            step_seconds=result.step_seconds,
            sparsity_overall=zeros / total if total else 0.0,
            compressed_parameters=total,
            bits=", ".join(sorted({layer.bits for layer in layers})),
            calibration={"windows": settings.calibration_windows, "seqlen": settings.calibration_seqlen,
                         "seed": settings.seed} if result.engine_reports else None,
            engine=[engine_row(e) for e in result.engine_reports],
            layers=layers,
            structure_and_training=result.details,
        ),
        size=SizeSection(dense_bytes=dense_bytes, dense_by_kind=dense_by_kind, packed_bytes=packed),
        timing=timing,
    )


def engine_row(e) -> dict:
    """One calibrated pass in the report: its timings and, for MoE, the tokens routed to each expert."""
    row = {"stats_s": e.stats_seconds, "algorithm_s": e.algorithm_seconds, "forward_s": e.forward_seconds,
           "tokens": e.tokens}
    if e.expert_tokens:
        row["experts"] = {"count": len(e.expert_tokens), "min_tokens": e.min_expert_tokens,
                          "data_free": e.data_free_experts, "tokens": e.expert_tokens}
    return row


def write_output(loaded: LoadedModel, result: CompressionResult, report: CompressReport, directory: Path,
                 final: Path, save_dtype: torch.dtype | None) -> CompressReport:
    """Write one recipe's model dir into `directory` (inside an atomic output; `final` is where
    it will be once the output is complete)."""
    directory.mkdir(exist_ok=True)
    layout = ModelDir(directory)
    save_model_dir(loaded, directory, save_dtype)
    layout.recipe.write_text(result.recipe.to_yaml())
    save_compression_state(result.records, layout.compression)
    report.size.stored_bytes = files_bytes(directory, ModelDir.WEIGHTS_GLOB)
    report.output = str(final)
    layout.report_json.write_text(json.dumps(report.to_dict(), indent=2))
    layout.report_md.write_text(report_markdown(report))
    training_plot(report.compression.structure_and_training, layout.training_curve)
    return report


def compress_worker(model: str, recipes: list[Recipe], settings: EvalSettings = EvalSettings(),
                    offload_dir: str | None = None, device: str = "cpu") -> None:
    """A rank other than 0 of `torchrun ... slimkit compress`: the same recipes on the same model,
    taking part in the calibration collectives; it evaluates nothing and writes nothing."""
    loaded = load_model(model)
    split = load_split(settings.data)
    original = ModelSnapshot.of(loaded.model) if len(recipes) > 1 else None
    model_object = loaded.model

    def calibration() -> torch.Tensor:
        return calibration_windows(loaded.tokenizer, split, settings.calibration_windows,
                                   settings.calibration_seqlen, settings.seed)

    for i, recipe in enumerate(recipes):
        if i and original is not None:
            loaded.model = model_object
            original.restore(loaded.model)
        run = RunResources(NoProgress(), calibration if loaded.tokenizer else None, offload_dir, loaded.tokenizer,
                           split, device=device)
        loaded.model = compress(loaded.model, recipe, loaded.adapter, run).model


def compress_to_dir(
    model: str,
    recipes: list[Recipe],
    output: str | Path,
    settings: EvalSettings = EvalSettings(),
    overwrite: bool = False,
    save_dtype: torch.dtype | None = None,
    progress: Progress = NoProgress(),
    log: Callable[[str], None] = lambda msg: None,
    offload_dir: str | None = None,
    runs_dir: str | None = None,
    restart_training: bool = False,
    device: str = "cpu",
) -> list[CompressReport]:
    """Compress `model` with each recipe; write one HF dir per recipe (the output dir itself
    when there is one recipe, else OUTPUT/<recipe name>/) and return the reports.

    The output is reserved before the model loads and written atomically at the end."""
    output = Path(output).absolute()
    with reserve_output(output, overwrite, inputs=[model]):
        return _compress_reserved(model, recipes, output, settings, overwrite, save_dtype, progress, log,
                                  offload_dir, runs_dir, restart_training, device)


def _compress_reserved(model, recipes, output, settings, overwrite, save_dtype, progress, log, offload_dir,
                       runs_dir, restart_training, device) -> list[CompressReport]:
    start = time.perf_counter()
    loaded = load_model(model)
    log(f"loaded {loaded.name} ({loaded.adapter.name}, {loaded.kind}) in {loaded.load_seconds:.1f}s"
        + (" from cache" if loaded.from_cache else ""))
    split = load_split(settings.data)
    log(f"data: {split.describe()}")
    meter = QualityMeter(loaded, split, settings, progress, device)
    baseline = meter.measure("dense")
    dense_by_kind = bytes_by_kind(loaded.model, loaded.adapter, loaded.source_dtype.itemsize)
    original = ModelSnapshot.of(loaded.model) if len(recipes) > 1 else None
    original_model = loaded.model
    base_names = list(loaded.adapter.linears(loaded.model))
    zeros, total = _model_sparsity(loaded.model, base_names)
    calibration = None
    if loaded.tokenizer is not None:
        def calibration() -> torch.Tensor:
            return calibration_windows(loaded.tokenizer, split, settings.calibration_windows,
                                       settings.calibration_seqlen, settings.seed)
    reports = []
    layout = CompressOutput(output, tuple(r.name for r in recipes))
    with output_directory(output, overwrite, inputs=[model], command="compress") as root:
        written = CompressOutput(root, layout.recipes)
        for i, recipe in enumerate(recipes):
            if i and original is not None:
                loaded.model = original_model  # a structural recipe replaced the object
                original.restore(loaded.model)
            t0 = time.perf_counter()
            run = RunResources(progress, calibration, offload_dir, loaded.tokenizer, split, runs_dir, restart_training,
                               device=device)
            result = compress(loaded.model, recipe, loaded.adapter, run)
            loaded.model = result.model
            t_compress = time.perf_counter() - t0
            after = meter.measure(recipe.name, result.hidden_projection)
            report = build_report(loaded, recipe, result, split, settings, baseline, zeros / total, after,
                                  dense_by_kind, {"load_s": loaded.load_seconds, "compress_s": t_compress,
                                                  "eval_before_s": baseline.details["seconds"],
                                                  "eval_after_s": after.details["seconds"]})
            reports.append(write_output(loaded, result, report, written.model_dir(recipe.name).root,
                                        layout.model_dir(recipe.name).root, save_dtype))
            log(f"done: {recipe.name} (-> {layout.model_dir(recipe.name).root})")
        if len(recipes) > 1:
            summary = "\n".join([f"# slimkit compress: {loaded.name}", "",
                                 markdown_table(comparison_rows(reports)), "", f"- {metric_legend(reports[0])}", ""])
            written.summary_md.write_text(summary)
            written.summary_json.write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    log(f"wrote {output}")
    for r in reports:
        r.timing["total_s"] = time.perf_counter() - start
    return reports
