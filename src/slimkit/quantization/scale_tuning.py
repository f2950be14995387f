"""Scale tuning after quantization: each linear's integer codes stay as GPTQ chose them, and each
group's scale is trained so that the quantized block reproduces the dense output at its depth
(the step-size training of EfficientQAT's E2E-QP, done block by block; AutoRound's targets).

GPTQ fits each linear alone to its own inputs and never revisits a scale once its group is
rounded. Here the scales of a whole block move together, so a layer can absorb its neighbours'
errors and the drift of the quantized blocks before it. Each scale is the stored one times a
factor that starts at 1 (Adam's step is then relative, the same for every layer); the loss sees
the scales rounded as they are stored (fp16 by default), so what is fitted is what is packed.
Codes, zero points and masks do not change: packing and export are GPTQ's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from slimkit.calibration.block_data import BlockData
from slimkit.calibration.block_fit import FitResult, FitSettings, fit_block
from slimkit.numerics.rtn import QuantParams, dequantize


def _as_stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` rounded to its storage dtype, with the fp32 scale's gradient (straight through)."""
    return scale + (scale.detach().to(dtype).float() - scale.detach())


def tuned_params(params: QuantParams, factor: torch.Tensor) -> QuantParams:
    """`params` with every scale multiplied by its group's factor, rounded to the stored dtype."""
    scale = (params.scale.float() * factor.detach()).to(params.spec.scale_dtype)
    return QuantParams(params.spec, params.q, scale, params.zero)


@dataclass(frozen=True)
class CodedLinear:
    """A linear of the block, its quantization (codes fixed while the scales train) and its mask
    (True = kept; None: dense)."""

    module: nn.Linear
    params: QuantParams
    mask: torch.Tensor | None = None


def _one_dimensional(block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's 1-D parameters (norm weights, biases) by name, for `tune_scales(..., floats)`."""
    return {n: p for n, p in block.named_parameters() if p.dim() == 1}


def tune_scales(block: nn.Module, linears: dict[str, CodedLinear], data: BlockData, settings: FitSettings,
                steps: Iterable[int] | None = None, floats: bool = False) -> tuple[dict[str, QuantParams], FitResult]:
    """Train the group scales of `linears` (names relative to `block`) so that the block's output
    matches `data.outputs`; with `floats`, the block's 1-D parameters (norm weights, biases: kept in
    floating point) too, each by a factor. Returns the new parameters and the fit's errors; the
    linears' weights become what the new parameters decode to, and the 1-D parameters take their
    fitted values."""
    extra = _one_dimensional(block) if floats else {}

    def weights_of(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {n: (p * factors[n]).to(p.dtype) for n, p in extra.items()}
        for name, linear in linears.items():
            p, mask = linear.params, linear.mask
            w = dequantize(p.q, _as_stored(p.scale.float() * factors[name], p.spec.scale_dtype), p.zero, p.spec)
            out[f"{name}.weight"] = (w if mask is None else w * mask).to(linear.module.weight.dtype)
        return out

    params = {n: linear.params for n, linear in linears.items()}
    start = {n: torch.ones(p.scale.shape, device=p.scale.device) for n, p in params.items()}
    start.update({n: torch.ones(p.shape, device=p.device) for n, p in extra.items()})
    result = fit_block(block, start, weights_of, data, settings, steps)
    with torch.no_grad():
        for name, value in weights_of(result.values).items():
            block.get_parameter(name).copy_(value.to(block.get_parameter(name).dtype))
    return {n: tuned_params(params[n], result.values[n]) for n in params}, result
