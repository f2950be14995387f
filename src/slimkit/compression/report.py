"""One recipe's report: the per-tensor lines (`LayerTally`, added up block by block when streamed)
and the whole `CompressReport` (`build_report`), the same for every model source."""

from __future__ import annotations

import datetime as dt
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

import slimkit
from slimkit.data.corpus import TextSplit
from slimkit.evaluation.quality import protocol_text
from slimkit.evaluation.size import bytes_by_kind, packed_bytes
from slimkit.models.adapters import ArchitectureAdapter
from slimkit.protocol import EvalSettings
from slimkit.recipes.apply import CompressionResult
from slimkit.results import (
    REPORT_SCHEMA_VERSION,
    CompressionSection,
    CompressReport,
    LayerRow,
    ModelSection,
    Quality,
    SizeSection,
)


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


def model_sparsity(model: torch.nn.Module, names: list[str]) -> tuple[int, int]:
    params = dict(model.named_parameters(remove_duplicate=False))
    zeros = sum(int((params[n + ".weight"] == 0).sum()) for n in names)
    total = sum(params[n + ".weight"].numel() for n in names)
    return zeros, total


class CompressedModel(Protocol):
    """What a report reads of the model a recipe ran on: a `LoadedModel` or a `StreamedModel`."""

    model: torch.nn.Module
    adapter: ArchitectureAdapter
    kind: str
    name: str
    source: Path
    source_dtype: torch.dtype


@dataclass(frozen=True)
class Measured:
    """What a run measured around one recipe: quality before and after, the dense model's zeros
    and bytes, and the time each phase took."""

    baseline: Quality
    baseline_sparsity: float
    compressed: Quality
    dense_by_kind: dict[str, int]
    timing: dict[str, float]


def _model_section(loaded: CompressedModel) -> ModelSection:
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


def _compression_section(result: CompressionResult, settings: EvalSettings, tally: LayerTally) -> CompressionSection:
    return CompressionSection(
        seconds=result.seconds,
        step_seconds=result.step_seconds,
        sparsity_overall=tally.zeros / tally.total if tally.total else 0.0,
        compressed_parameters=tally.total,
        bits=", ".join(sorted({layer.bits for layer in tally.rows})),
        calibration={"windows": settings.calibration_windows, "seqlen": settings.calibration_seqlen,
                     "seed": settings.seed} if result.engine_reports else None,
        engine=[engine_row(e) for e in result.engine_reports],
        layers=tally.rows,
        structure_and_training=result.details,
    )


def build_report(loaded: CompressedModel, result: CompressionResult, split: TextSplit, settings: EvalSettings,
                 measured: Measured, tally: LayerTally | None = None) -> CompressReport:
    """The report of one recipe (`result.recipe`); `tally`: the per-tensor lines when the caller
    added them up (a streamed run), else they are read from the compressed model in memory."""
    stored = loaded.source_dtype.itemsize
    if tally is None:
        tally = LayerTally.of(result.records, dict(loaded.model.named_parameters(remove_duplicate=False)), stored)
    dense_bytes = sum(measured.dense_by_kind.values())
    # structural steps shrink the dense model itself; masks and codes then pack what is left
    after_dense = (sum(bytes_by_kind(loaded.model, loaded.adapter, stored).values()) if result.details
                   else dense_bytes)
    return CompressReport(
        schema_version=REPORT_SCHEMA_VERSION,
        slimkit_version=slimkit.__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine={"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        model=_model_section(loaded),
        recipe=result.recipe.to_dict(),
        recipe_summary=result.recipe.summary(),
        data={"source": split.source, "split_hash": split.split_hash, "description": split.describe()},
        protocol=protocol_text(settings, loaded.kind),
        baseline=measured.baseline,
        baseline_sparsity=measured.baseline_sparsity,
        compressed=measured.compressed,
        compression=_compression_section(result, settings, tally),
        size=SizeSection(dense_bytes=dense_bytes, dense_by_kind=measured.dense_by_kind,
                         packed_bytes=after_dense + tally.packed_delta),
        timing=measured.timing,
    )


def engine_row(e) -> dict:
    """One calibrated pass in the report: its timings and, for MoE, the tokens routed to each expert."""
    row = {"stats_s": e.stats_seconds, "algorithm_s": e.algorithm_seconds, "forward_s": e.forward_seconds,
           "tokens": e.tokens}
    if e.expert_tokens:
        row["experts"] = {"count": len(e.expert_tokens), "min_tokens": e.min_expert_tokens,
                          "data_free": e.data_free_experts, "tokens": e.expert_tokens}
    return row
