"""The step-side of scale tuning, shared by the GPTQ and AutoRound handlers: train a quantized
block's group scales to its targets (codes fixed) and record the outcome on each linear."""

from __future__ import annotations

from slimkit.calibration.block_data import BlockData
from slimkit.calibration.block_fit import FitSettings
from slimkit.calibration.engine import BlockWork
from slimkit.quantization.config import ScaleTuning
from slimkit.quantization.scale_tuning import CodedLinear, tune_scales
from slimkit.recipes.context import StepContext


def tune_block_scales(tuning: ScaleTuning, ctx: StepContext, work: BlockWork, selected: dict, targets,
                      method: str) -> None:
    """Train the quantized block's group scales to `targets`, codes fixed (quantization/scale_tuning.py);
    `method` names whose scales are kept when tuning does not pay."""
    local = {id(m): n for n, m in work.block.named_modules()}
    records = {local[id(m)]: ctx.state.records[n] for n, m in selected.items()}
    linears = {local[id(m)]: CodedLinear(m, ctx.state.records[n].quant, ctx.state.records[n].mask)
               for n, m in selected.items()}
    steps = ctx.run.progress.track(range(tuning.iters), f"block {work.index}: scales")
    params, result = tune_scales(work.block, linears, BlockData(work.inputs.batch, targets),
                                 FitSettings(tuning.iters, tuning.lr, tuning.batch, tuning.seed), steps, tuning.floats)
    ratio = result.error_after / max(result.error_before, 1e-30)
    for name, record in records.items():
        record.quant = params[name]
        record.notes.append(f"scales tuned: block output error x{ratio:.3f}" if result.kept else
                            f"scale tuning did worse (x{ratio:.3f}): {method}'s scales kept")
