"""Typed configs for quantization recipe steps."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimkit.quantization.rtn import QuantSpec
from slimkit.recipes.base import StepConfig

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class RTNQuantizeConfig(StepConfig):
    """Round-to-nearest weight quantization, per channel or per group."""

    method: Literal["rtn_quantize"] = "rtn_quantize"
    bits: int = Field(4, ge=2, le=8, description="bits per weight (2-8)")
    symmetric: bool = Field(True, description="symmetric (no zero point) or asymmetric")
    group_size: int | None = Field(None, gt=0, description="columns per group; null = per channel")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size, _SCALE_DTYPES[self.scale_dtype])

    def summary(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"RTN int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"
