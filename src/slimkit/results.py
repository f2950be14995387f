"""The results that cross modules, typed: a compress report, a benchmark row, an advise row.

Each is a pydantic model. Modules read them by attribute, so a renamed field fails where it is
used, at import-time checks and in tests, not in a distant module at run time. `to_dict()` is
what goes into JSON files; `from_dict()` reads a file back and checks it. report.json carries
`schema_version`: 1 lacked stored_dtype/computed_in, 2 added them (read with their defaults).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from slimkit.errors import SlimkitError
from slimkit.io.text import read_text

REPORT_SCHEMA_VERSION = 2


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()  # python values, as json.dumps wrote them before (NaN stays NaN)

    @classmethod
    def from_dict(cls, data: dict):
        return cls.model_validate(data)


class Divergence(Result):
    """How far a decoder's next-token distributions moved from the base model's
    (evaluation/divergence.py): mean and 99th percentile of KL(base || model), top-1 agreement."""

    mean_kld: float
    p99_kld: float
    top1_agreement: float
    tokens: int


class Quality(Result):
    """A model's quality on the fixed protocol: perplexity (decoders) or cosine (encoders); for a
    compressed decoder, also its divergence from the base model."""

    metric: Literal["ppl", "cosine"]
    value: float
    details: dict[str, Any]
    divergence: Divergence | None = None


class LayerRow(Result):
    name: str
    kind: str
    shape: list[int]
    sparsity: float
    bits: str
    methods: list[str]
    notes: list[str]


class ModelSection(Result):
    name: str
    source: str
    kind: str
    architecture: str
    parameters: int
    config: dict[str, Any]
    dtype_bits: int
    stored_dtype: str = "float32"  # schema 1 had no field: its models were float32
    computed_in: str = "float32"


class CompressionSection(Result):
    seconds: float
    step_seconds: list[float]
    sparsity_overall: float
    compressed_parameters: int
    bits: str
    calibration: dict[str, int] | None
    engine: list[dict]
    layers: list[LayerRow]
    structure_and_training: list[dict[str, Any]]


class SizeSection(Result):
    dense_bytes: int
    dense_by_kind: dict[str, int]
    packed_bytes: float
    stored_bytes: int | None = None  # set once the model dir is written


class CompressReport(Result):
    """report.json: what one recipe did to one model, and its quality before and after."""

    model_config = ConfigDict(extra="ignore")  # a newer slimkit's report still reads
    schema_version: int = 1
    slimkit_version: str
    created: str
    machine: dict[str, Any]
    model: ModelSection
    recipe: dict[str, Any]
    recipe_summary: str
    data: dict[str, str]
    protocol: str
    baseline: Quality
    baseline_sparsity: float
    compressed: Quality
    compression: CompressionSection
    size: SizeSection
    timing: dict[str, float]
    output: str | None = None

    @property
    def recipe_name(self) -> str:
        return self.recipe["name"]

    @property
    def packed_bits_per_weight(self) -> float:
        """The whole model packed (embeddings, head and norms included), in bits per parameter."""
        return self.size.packed_bytes * 8 / max(self.model.parameters, 1)

    @classmethod
    def read(cls, path: Path) -> "CompressReport":
        """A report.json file, checked; a damaged or foreign one is a clear error."""
        try:
            return cls.from_dict(json.loads(read_text(path)))
        except (ValueError, ValidationError) as exc:
            raise SlimkitError(f"{path} is not a slimkit report: {str(exc).splitlines()[0]}") from None


class BenchRow(Result):
    """One model measured in its own process (`benchmarks/model.py`); ratios are against the
    first row of the same run, or (`bench model`) against the fastest dense row of each timing."""

    model: str
    prefill_ms: float
    prompt_tokens: int
    decode_ms_per_token: float
    throughput_tok_s: float
    batch: int
    peak_rss_mb: float
    weights_ram_mb: float
    disk_mb: float
    ppl: float | None
    eval_tokens: int
    bits_per_weight: float | None = None  # the whole files on disk * 8 / the model's parameters (embeddings too)
    formats: list[str]
    kernels_batch_1: list[str]
    threads: int
    device: str = "cpu"  # where the model ran (`--device`)
    dtype: str = "float32"  # the compute dtype of a dense model's weights (`BenchSettings.dtype`)
    long_prefill_ms: float | None = None  # the second, longer prefill (`--long-prompt`)
    long_prompt_tokens: int | None = None
    mean_kld: float | None = None  # KL(reference || model) per token, when a reference was given
    top1_agreement: float | None = None
    compiled_decode_ms_per_token: float | None = None  # static KV cache + torch.compile, when asked
    compile_s: float | None = None  # what the first compiled step cost beyond a normal one
    compiled_error: str | None = None  # why the compiled step could not run, when it could not
    decode_speedup: float | None = None
    prefill_speedup: float | None = None
    long_prefill_speedup: float | None = None
    throughput_ratio: float | None = None
    compiled_decode_speedup: float | None = None  # compiled decode against the baseline's decode
    baseline: dict[str, str] | None = None  # measurement -> the dense row and path each ratio is against
    gemm_probe: dict | None = None  # fp32 vs bf16 GEMM ms on this CPU (`formats/gemm_dtype.py`)
    llamacpp_file_type: str | None = None  # the same model's GGUF in llama.cpp (when `make peers` built it)
    llamacpp_decode_tok_s: float | None = None  # llama-bench at this row's thread count, same run
    llamacpp_prefill_tok_s: float | None = None
    llamacpp_error: str | None = None  # why this model has no llama.cpp numbers (no GGUF export, ...)


class LlamaCppRow(Result):
    """One GGUF measured by llama.cpp's own tools (`bench model --runtime llamacpp`,
    `benchmarks/peer_llamacpp.py`): llama-bench speeds, llama-perplexity ppl and KL divergence
    from the first row's model on the same chunks."""

    model: str
    made_by: str  # "slimkit ..." or "llama.cpp ..."
    gguf: str
    file_mb: float
    bits_per_weight: float  # file bytes * 8 / parameters, llama.cpp's BPW
    ppl: float
    mean_kld: float
    p99_kld: float
    top1_agreement: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_tok_s_std: float
    threads: int
    chunks: int  # llama-perplexity chunks of 512 tokens scored
    repack: bool = True  # llama-bench ran with llama.cpp's weight repacking (off after a repack crash)


class AdviseRow(BenchRow):
    """A benchmark row of one advisor candidate, with where it stands in the framework."""

    candidate: str
    rule: int  # 0: the dense model
    order: int  # the framework's order; -1: the dense model
    recipe: str | None
    pack: str | None = None
    what: str
    meets: bool | None = None  # every constraint met (set by `decide`)
    pareto: bool = False
    ppl_increase: float | None = None


class SkippedCandidate(Result):
    candidate: str
    rule: int
    reason: str


class AdviseResult(Result):
    """advise.json: the candidates measured, those skipped, and the recommendation with its reason."""

    model: str
    device: dict[str, Any]
    constraints: dict[str, Any]
    settings: dict[str, Any]
    baseline: AdviseRow
    candidates: list[AdviseRow]
    skipped: list[SkippedCandidate]
    recommended: str | None
    recommended_recipe: str | None
    recommended_pack: str | None
    reason: str
