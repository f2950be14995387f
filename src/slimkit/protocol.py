"""How much data a run spends: the quick and the full protocol, declared once.

Every command that calibrates, evaluates or times (compress, eval, advise, reproduce, the
benchmarks) takes one `Protocol`; `--quick/--full` picks it and single options override a field.
"Every evaluation window" has one spelling: `ALL_WINDOWS` (None), written `all` on a command line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ALL_WINDOWS = None  # evaluate every window of the fixed protocol


@dataclass(frozen=True)
class Protocol:
    name: str
    calibration_windows: int  # windows of calibration text for SparseGPT/Wanda/GPTQ/AWQ
    calibration_seqlen: int  # tokens per calibration window
    eval_windows: int | None  # perplexity windows of 512 tokens; ALL_WINDOWS: every one
    kernel_repeats: int  # timing repeats per kernel measurement (reproduce's tables 1-2)

    def with_changes(self, **changes) -> "Protocol":
        """This protocol with some fields set; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> str:
        windows = "every window" if self.eval_windows is ALL_WINDOWS else f"{self.eval_windows} windows"
        return (f"{self.name}: calibration {self.calibration_windows} x {self.calibration_seqlen} tokens, "
                f"ppl on {windows} of 512, {self.kernel_repeats} kernel repeats")


QUICK = Protocol("quick", calibration_windows=16, calibration_seqlen=256, eval_windows=16, kernel_repeats=21)
FULL = Protocol("full", calibration_windows=128, calibration_seqlen=512, eval_windows=ALL_WINDOWS,
                kernel_repeats=41)


def parse_windows(text: str, allow_zero: bool = False) -> int | None:
    """A window count from a command line: a positive number (0 too with `allow_zero`: no
    perplexity), or `all`."""
    if text.strip().lower() == "all":
        return ALL_WINDOWS
    lowest = 0 if allow_zero else 1
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < lowest:
        raise ValueError(f"windows must be a number >= {lowest} or 'all', got '{text}'")
    return value


def windows_text(windows: int | None) -> str:
    return "all" if windows is ALL_WINDOWS else str(windows)


class EvalSettings(BaseModel):
    """How one compress or eval run calibrates and measures quality. The defaults are the quick
    protocol; `from_protocol(FULL)` is the papers' sizes and every window. The descriptions are
    the command line's help: `cli/options.py` makes one option per field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seqlen: int = Field(512, ge=2, description="perplexity window length in tokens (cut to the model's "
                        "positions when it has fewer)")
    max_windows: int | None = Field(QUICK.eval_windows, ge=1, description="perplexity windows to evaluate: "
                                    "N (the first N), or all (the full protocol)",
                                    json_schema_extra={"option": "--windows"})
    n_texts: int = Field(256, ge=2, description="encoders: texts for embedding similarity")
    data: str | None = Field(None, description="your own text (.txt, blank-line separated, or .jsonl with "
                             "'text'); default: the packaged Wikipedia summaries")
    calibration_windows: int = Field(QUICK.calibration_windows, ge=1, description="calibration windows for "
                                     "SparseGPT/Wanda/GPTQ/AWQ (the papers use 128)")
    calibration_seqlen: int = Field(QUICK.calibration_seqlen, ge=2, description="tokens per calibration window "
                                    "(cut to the model's positions when it has fewer; the papers use 512)")
    seed: int = Field(0, description="seed for calibration sampling")

    @field_validator("max_windows", mode="before")
    @classmethod
    def _all_windows(cls, value):
        return parse_windows(value) if isinstance(value, str) else value

    @classmethod
    def from_protocol(cls, protocol: Protocol, **fields) -> "EvalSettings":
        return cls(max_windows=protocol.eval_windows, calibration_windows=protocol.calibration_windows,
                   calibration_seqlen=protocol.calibration_seqlen, **fields)


class BenchSettings(BaseModel):
    """How one model is timed and scored in `slimkit bench model`, the advisor and reproduce; the
    descriptions are the command line's help."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: int = Field(128, ge=1, description="prefill tokens (batch 1)")
    long_prompt: int = Field(512, ge=0, description="a second, longer prefill (batch 1; 0 skips it), cut to the "
                             "model's ppl window")
    decode: int = Field(32, ge=1, description="decode steps (median ms/token, batch 1, KV cache)")
    batch: int = Field(8, ge=1, description="sequences decoding together for the throughput measurement")
    rounds: int = Field(2, ge=1, description="timing rounds over all the models, in alternating order; each timing "
                        "keeps its fastest round (a busy machine slows a run, it never speeds one up)")
    windows: int | None = Field(QUICK.eval_windows, ge=0, description="ppl windows of 512: N (0 skips), or all "
                                "(the full protocol)")
    reference: str | None = Field(None, description="also measure the KL divergence and top-1 agreement against "
                                  "this model, on the ppl windows (its distributions are computed once, cached)")
    device: str = Field("cpu", description="where the models run: cpu, cuda (cuda:N) or auto (cuda when a GPU is "
                        "visible); timings on a GPU wait for its queue to finish")
    compiled: bool = Field(False, description="also time decode compiled: a static KV cache and torch.compile "
                           "(CUDA graphs on a GPU); the compilation is timed apart")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="compute dtype of a dense model's "
                                                  "weights and activations (packed layers keep their own path)")
    best_dense: bool = Field(False, description="ratios against the fastest dense configuration: the baseline is "
                             "also timed in bf16 where a probe GEMM says bf16 could win on this CPU")

    @field_validator("windows", mode="before")
    @classmethod
    def _all_windows(cls, value):
        return parse_windows(value, allow_zero=True) if isinstance(value, str) else value
