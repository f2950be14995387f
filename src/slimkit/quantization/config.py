"""Typed configs for quantization recipe steps."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimkit.numerics.rtn import QuantSpec
from slimkit.recipes.base import BlockTraining, StepConfig

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class QuantFields(BaseModel):
    """Integer weight format: bits, symmetry, grouping, and the dtype scales are stored in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(4, ge=2, le=8, description="bits per weight (2-8)")
    symmetric: bool = Field(True, description="symmetric (no zero point) or asymmetric")
    group_size: int | None = Field(None, gt=0, description="columns per group; null = per channel")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    full_range: bool = Field(False, description="symmetric only: scale = the group's signed extreme / 2^(b-1) "
                             "(llama.cpp's Q4_0 and AutoRound's grid: a finer step, the extreme exact, scales may "
                             "be negative) instead of absmax / (2^(b-1) - 0.5)")

    @model_validator(mode="after")
    def _full_range_is_symmetric(self):
        if self.full_range and not self.symmetric:
            raise ValueError("full_range needs symmetric: true (an asymmetric grid already spans [min, max])")
        return self

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size, _SCALE_DTYPES[self.scale_dtype], self.full_range)

    def describe(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        grid = ("sym full-range" if self.full_range else "sym") if self.symmetric else "asym"
        return f"int{self.bits} {group} {grid}"


class RTNQuantizeConfig(StepConfig, QuantFields):
    """Round-to-nearest weight quantization, per channel or per group."""

    method: Literal["rtn_quantize"] = "rtn_quantize"

    def summary(self) -> str:
        return f"RTN {self.describe()}"


class ScaleTuning(BlockTraining):
    """After a block is quantized, train its group scales (codes fixed) so that it reproduces the
    dense output at its depth: Adam on a factor per scale, `iters` steps of `batch` windows."""

    iters: int = Field(100, ge=1, description="Adam steps per block (each a forward and backward of the block)")
    lr: float = Field(1e-3, gt=0.0, description="first step's learning rate, relative to each scale (decays to 0)")
    floats: bool = Field(False, description="also train the block's 1-D parameters (norm weights, biases), "
                         "which stay in floating point")


class GPTQConfig(StepConfig, QuantFields):
    """GPTQ: quantize column by column, compensating each rounding error through H^-1.

    Keeps any mask an earlier pruning step left. With act_order, columns go in order of
    decreasing diag(H), with static groups (no group index needed at inference). With
    `tune_scales`, each quantized block's scales are then trained to the dense output (codes fixed).
    """

    method: Literal["gptq"] = "gptq"
    needs_calibration: ClassVar[bool] = True
    act_order: bool = Field(False, description="process columns by decreasing diag(H)")
    blocksize: int = Field(128, gt=0, description="columns per lazy-update block")
    percdamp: float = Field(0.01, gt=0.0, description="damping, as a fraction of mean(diag H)")
    tune_scales: ScaleTuning | None = Field(
        None, description="train each quantized block's group scales (codes fixed) to the dense output")

    def one_process_only(self) -> str | None:
        if self.tune_scales is None:
            return None
        return ("gptq with tune_scales runs in one process: its steps follow one gradient through the block; "
                "run it without torchrun")

    def summary(self) -> str:
        return (f"GPTQ {self.describe()}" + (" act-order" if self.act_order else "")
                + (f" +scales {self.tune_scales.iters}" if self.tune_scales else ""))


class AWQConfig(StepConfig, QuantFields):
    """AWQ: activation-aware scales (folded into the previous op) and a clip search, then RTN or GPTQ."""

    method: Literal["awq"] = "awq"
    needs_calibration: ClassVar[bool] = True
    grid: int = Field(20, ge=2, description="alpha grid points in [0, 1)")
    clip: bool = Field(True, description="search a clip ratio per group")
    quantizer: Literal["rtn", "gptq"] = Field("rtn", description="how the scaled weights are rounded")
    percdamp: float = Field(0.01, gt=0.0, description="damping for the GPTQ quantizer")

    def summary(self) -> str:
        return f"AWQ {self.describe()}" + (" +GPTQ" if self.quantizer == "gptq" else "")


class AutoRoundConfig(StepConfig, QuantFields):
    """Learned rounding (SignRound, as in AutoRound): per block, signed gradient descent on each
    weight's rounding offset and each group's range, so that the quantized block reproduces the
    dense block's output on the calibration inputs. Codes stay on the RTN grid (same packing and
    export); a block whose tuned codes do worse than RTN's keeps RTN's. The papers' sizes are
    200 steps of 8 windows; each step is one forward and backward of the block."""

    method: Literal["autoround"] = "autoround"
    needs_calibration: ClassVar[bool] = True
    iters: int = Field(200, ge=1, description="signed-gradient steps per block")
    lr: float | None = Field(None, gt=0.0, description="first step's size (decays linearly to 0); null = 1 / iters")
    batch: int = Field(8, ge=1, description="calibration windows per step")
    tune_range: bool = Field(True, description="also learn each group's clipping (range factors in [0.5, 1])")
    seed: int = Field(0, ge=0, description="seed of the batch draws")
    targets: Literal["compressed-path", "dense-model"] = Field(
        "compressed-path", description="what each block learns to output: the dense block on the inputs the "
        "compressed blocks before it produce, or the dense model's own activations at that depth (AutoRound's "
        "and llm-compressor's choice; measured: docs/results.md)")
    tune_scales: ScaleTuning | None = Field(
        None, description="then train each block's group scales with Adam (the tuned codes fixed) to the dense output")

    def one_process_only(self) -> str | None:
        return ("autoround runs in one process: its steps follow one gradient through the block; "
                "run it without torchrun (gptq and awq do use several processes)")

    def summary(self) -> str:
        return (f"AutoRound {self.describe()} ({self.iters} steps)"
                + (f" +scales {self.tune_scales.iters}" if self.tune_scales else ""))


class GridSolverFields(BaseModel):
    """How codes are chosen on a fitted GGML grid."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    solver: Literal["gptq", "imatrix"] = Field("gptq", description="gptq: codes by GPTQ on the fitted grid; "
                                               "imatrix: round-to-nearest on it (llama.cpp's method)")
    act_order: bool = Field(True, description="GPTQ: columns by decreasing diag(H) (the grid is fixed, so free)")
    blocksize: int = Field(128, gt=0, description="GPTQ: columns per lazy-update block")
    percdamp: float = Field(0.01, gt=0.0, description="GPTQ: damping, as a fraction of mean(diag H)")


class GGUFQuantizeConfig(StepConfig, GridSolverFields):
    """llama.cpp's GGUF types (K-quants and the legacy ones), with codes chosen by calibration.

    Each linear gets the GGML type llama.cpp's mix gives it in a file of `gguf_type`
    (quantization/gguf_mix.py); its grid (scales, offsets, 6-bit sub-block scales) is fitted
    with the layer's importance (imatrix: mean x^2 of its input), then GPTQ rounds every weight
    onto that grid (`solver: gptq`), or round-to-nearest does (`solver: imatrix`, llama.cpp's
    own method, the baseline). The token embedding and the head (one tensor when tied) get their
    types of the mix by round-to-nearest, as no Hessian reaches them. The packed blocks are what
    `slimkit export --to gguf` writes.
    """

    method: Literal["gguf_quantize"] = "gguf_quantize"
    needs_calibration: ClassVar[bool] = True
    quantizes_outer: ClassVar[bool] = True
    gguf_type: Literal["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K_M", "Q4_K_S", "Q5_K_M",
                       "Q5_K_S", "Q6_K", "Q8_0", "Q5_0", "Q4_0"] = Field(
        "Q4_K_M", description="llama.cpp file type: the per-tensor type mix")

    def summary(self) -> str:
        return f"GGUF {self.gguf_type} ({'GPTQ' if self.solver == 'gptq' else 'imatrix RTN'} on llama.cpp's grids)"


ALLOCATABLE_TYPES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: int | float | str) -> int:
    """Bytes from 123456, "100MB", "1.5 GB", "512MiB"."""
    if isinstance(value, (int, float)):
        return int(value)
    import re

    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
    if not found or found.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (say 100MB, 1.5GB, 512MiB or a number of bytes)")
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2).upper()])


class GGUFAllocateConfig(StepConfig, GridSolverFields):
    """llama.cpp's types chosen tensor by tensor for a budget (the GGUF's whole file: tensors,
    tokenizer and metadata), then calibrated codes in those types.

    Each tensor's sensitivity is measured: for every candidate type, the Hessian-weighted error of
    round-to-nearest on its fitted grid, scaled by the KLD the model's output moves when that tensor
    alone takes its worst and its best type (measured on `probe_windows` calibration windows,
    interpolated between; the head and the embedding are measured at every type). The predicted KLD of an assignment is the sum over
    tensors; the allocator (quantization/allocation.py) solves the budget exactly. Then GPTQ (or
    imatrix rounding) writes every linear's codes in its type, in one calibrated pass."""

    method: Literal["gguf_allocate"] = "gguf_allocate"
    needs_calibration: ClassVar[bool] = True
    quantizes_outer: ClassVar[bool] = True

    target_bpw: float | None = Field(None, gt=0.0, description="whole-file bits per weight of the GGUF")
    target_size: int | None = Field(None, gt=0, description="whole-file bytes of the GGUF (100MB, 1.5GB, ...)")
    max_kld: float | None = Field(None, gt=0.0, description="the smallest file whose predicted mean KLD is within this")
    max_decode_ms: float | None = Field(None, gt=0.0, description="llama.cpp's decode ms/token on this machine, "
                                        "predicted from each type's measured cost (needs llama.cpp's tools)")
    types: tuple[str, ...] = Field(ALLOCATABLE_TYPES, description="candidate GGML types (each tensor gets one that "
                                   "tiles its rows)")
    probe_windows: int = Field(4, ge=1, description="calibration windows on which each tensor's KLD is measured")

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data):
        if isinstance(data, dict) and isinstance(data.get("target_size"), str):
            data = {**data, "target_size": parse_size(data["target_size"])}
        return data

    @model_validator(mode="after")
    def _one_budget(self) -> "GGUFAllocateConfig":
        from slimkit.numerics.ggml_grids import TYPES

        given = [k for k in ("target_bpw", "target_size", "max_kld", "max_decode_ms") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"gguf_allocate needs exactly one budget of target_bpw, target_size, max_kld, "
                             f"max_decode_ms (got "
                             f"{', '.join(given) or 'none'})")
        unknown = [t for t in self.types if t not in TYPES]
        if unknown:
            raise ValueError(f"unknown GGML types {unknown}; known: {', '.join(TYPES)}")
        return self

    def needs_every_block(self) -> str | None:
        return "gguf_allocate measures every tensor's sensitivity on the whole model before it chooses any type"

    def one_process_only(self) -> str | None:
        return "gguf_allocate measures sensitivities with forward passes of the whole model: it runs in one process"

    def budget(self) -> str:
        if self.target_bpw is not None:
            return f"{self.target_bpw:g} bpw"
        if self.target_size is not None:
            return f"{self.target_size / 1e6:.1f} MB"
        if self.max_decode_ms is not None:
            return f"llama.cpp decode <= {self.max_decode_ms:g} ms/token"
        return f"predicted KLD <= {self.max_kld:g}"

    def summary(self) -> str:
        return f"GGUF types allocated to {self.budget()} ({'GPTQ' if self.solver == 'gptq' else 'imatrix RTN'})"


class RotateConfig(StepConfig):
    """Rotate the residual stream and each head's values by randomised Hadamard matrices, fused into
    the weights (QuaRot / SpinQuant without online rotations): the same function, weights without
    outliers for the quantizer that follows. Needs RMSNorm pre-norm blocks. On a tied model the
    residual stream is rotated only with `tied: untie` (the head then becomes a second matrix)."""

    method: Literal["rotate"] = "rotate"
    rewrites_weights: ClassVar[bool] = True

    seed: int = Field(0, ge=0, description="seed of the random signs and of the odd-size orthogonal factor")
    heads: bool = Field(True, description="also rotate each attention head's values (v_proj rows, o_proj columns)")
    tied: Literal["keep", "untie"] = Field(
        "keep", description="a head tied to the embedding: keep the tie (values rotated, the residual stream not) "
                            "or untie it and rotate the stream (the file then holds two vocabulary matrices)")

    @model_validator(mode="after")
    def _whole_stream(self) -> "RotateConfig":
        if self.ignore or self.include_lm_head or self.include_embeddings:
            raise ValueError("rotate turns the whole residual stream (embedding and head included); "
                             "ignore, include_lm_head and include_embeddings do not apply to it")
        return self

    def summary(self) -> str:
        untie = ", a tied head untied" if self.tied == "untie" else ""
        return f"rotate (Hadamard{', values per head' if self.heads else ''}{untie}, seed {self.seed})"


class QuantizeOuterConfig(StepConfig):
    """The head and the token embedding on llama.cpp's grids, round to nearest, typed as
    llama-quantize types them in a Q4_0 or Q3_K_S file: the head (and an embedding tied to it: one
    tensor) Q6_K, or Q8_0 where Q6_K's 256-wide blocks do not tile its rows; an untied embedding
    `embedding`. Put after the steps that quantize the blocks: the model evaluated is then the
    whole file (on a 262k vocabulary the embedding is most of the weights). `dense` keeps one."""

    method: Literal["quantize_outer"] = "quantize_outer"
    quantizes_outer: ClassVar[bool] = True

    head: Literal["Q6_K", "Q8_0", "dense"] = Field("Q6_K", description="the head's type (a tied embedding's too)")
    embedding: Literal["Q4_0", "Q5_0", "Q8_0", "dense"] = Field(
        "Q4_0", description="an untied token embedding's type (llama-quantize: the file's body type)")

    @model_validator(mode="after")
    def _outer_only(self) -> "QuantizeOuterConfig":
        if self.include_lm_head or self.include_embeddings:
            raise ValueError("quantize_outer compresses the head and the embedding by itself; "
                             "include_lm_head and include_embeddings do not apply to it")
        return self

    def summary(self) -> str:
        return f"head {self.head}, embedding {self.embedding} (round to nearest)"
