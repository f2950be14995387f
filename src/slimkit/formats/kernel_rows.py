"""Which path a packed int8/int4/sparse linear takes, by the number of rows (tokens) in the call, measured.

A weight-only kernel reads 0.5-1 byte per weight: it wins while a call is bound by reading the
weights (decode, small batches). With many rows the call is bound by arithmetic instead, and
fp32 GEMM over weights dequantized a tile at a time (a few MB, never a full fp32 copy) can win.
Where the two cross depends on the CPU, the thread count and the shape, so it is measured: both
paths timed side by side at growing row counts on random inputs of the layer's shape, and the
kernel keeps every row count below the first one where dequantizing wins by more than
`MARGIN` (and all counts from there go to dequantize + GEMM); up to 8 rows it always runs.

The crossover belongs to the machine, not to the model: it is measured once per (format, shape,
group, threads, CPU, torch) and kept in the slimkit cache (`kernel_rows.json`), then applied to
every layer of that shape when a model is packed or a packed model is loaded.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from slimkit.formats.base import KERNEL_MAX_ROWS, PackedLinear
from slimkit.formats.machine import CALL_BUDGET_S, machine_key, read_json_cache, time_call, write_json_cache
from slimkit.paths import cache_root

ROWS = (16, 64, 128, 256, 512, 1024, 2048)
ALWAYS_KERNEL_ROWS = 8  # decode-sized calls: dequantizing a whole weight for a few rows cannot pay
MARGIN = 0.05  # dequantize + GEMM must beat the kernel by 5%, twice, for the kernel to give way
CACHE_FILE = "kernel_rows.json"


def _dequantizing_wins(layer: PackedLinear, x: torch.Tensor, repeats: int,
                       dtypes: tuple[str, ...] = ("float32",)) -> tuple[bool, str, list[float]]:
    """(dequantize + GEMM beats the kernel, its fastest GEMM dtype, ms of the kernel then of each dtype)."""
    kernel = time_call(lambda: layer.kernel_matmul(x), repeats)
    dense = {d: time_call(lambda d=d: layer.dequantized_matmul(x, getattr(torch, d)), repeats) for d in dtypes}
    best = min(dense, key=dense.get)
    return dense[best] < kernel * (1 - MARGIN), best, [round(t * 1e3, 4) for t in (kernel, *dense.values())]


@torch.no_grad()
def measure_crossover(layer: PackedLinear, rows=ROWS, repeats: int = 5, dtypes: tuple[str, ...] = ("float32",)) -> dict:
    """{"kernel_max_rows": N, "gemm_dtype": d, "gemm_dtypes": [...], "ms": {rows: [kernel, dequantize +
    GEMM in each dtype]}} for this layer's shape: the kernel keeps every row count below the first where
    dequantizing wins (confirmed by a second timing, so that one disturbed measurement does not decide);
    the GEMM's dtype is the one fastest at the largest row count measured."""
    limit, ms, fastest = KERNEL_MAX_ROWS, {}, "float32"
    for index, m in enumerate(rows):
        x = torch.randn(m, layer.in_features)
        wins, fastest, ms[m] = _dequantizing_wins(layer, x, repeats, dtypes)
        if wins and _dequantizing_wins(layer, x, repeats, dtypes)[0]:
            limit = max(rows[index - 1] if index else 0, ALWAYS_KERNEL_ROWS)
            break
        if max(ms[m][0], min(ms[m][1:])) > CALL_BUDGET_S * 1e3:  # the kernel or the best GEMM dtype
            break
    return {"kernel_max_rows": limit, "gemm_dtype": fastest, "gemm_dtypes": list(dtypes), "ms": ms}


def gemm_dtypes_to_try() -> tuple[str, ...]:
    """fp32, and bf16 too where this CPU's probe GEMM says bf16 could be faster at prefill-sized row
    counts (AMX, AVX-512 BF16): the dequantize path only runs above the kernel's rows."""
    from slimkit.formats.gemm_dtype import bf16_is_a_candidate, gemm_probe

    return ("float32", "bfloat16") if bf16_is_a_candidate(gemm_probe(), min_rows=ROWS[0]) else ("float32",)


def shape_key(layer: PackedLinear) -> str:
    group = getattr(layer, "group", None)
    zero = getattr(layer, "zero", None)
    return (f"{layer.format} {layer.out_features}x{layer.in_features}" + (f" g{group}" if group else "")
            + (" asym" if zero is not None else "") + layer.shape_tag())


def _cache_path() -> Path:
    return cache_root() / CACHE_FILE


def choose_kernel_rows(layers, measure=None) -> dict[str, int]:
    """Sets each int8/int4/bitmask-sparse layer's kernel row limit and dequantize + GEMM dtype from the
    machine's measured crossover (measured for shapes not seen before, then cached); returns {shape: limit}."""
    layers = [m for m in layers if m.has_row_choice() and _on_cpu(m)]
    if not layers:
        return {}
    dtypes = gemm_dtypes_to_try()
    measure = measure or functools.partial(measure_crossover, dtypes=dtypes)
    path = _cache_path()
    cache = read_json_cache(path)
    known = cache.setdefault(machine_key(), {})
    fresh = False
    for layer in layers:
        key = shape_key(layer)
        if not _measured_for(known.get(key), dtypes):
            known[key], fresh = measure(layer), True
        layer.kernel_max_rows = int(known[key]["kernel_max_rows"])
        layer.gemm_dtype = getattr(torch, known[key].get("gemm_dtype", "float32"))
    if fresh:
        write_json_cache(path, cache)
    return {shape_key(m): m.kernel_rows() for m in layers}


def _measured_for(entry, dtypes: tuple[str, ...]) -> bool:
    """A cached crossover that timed every GEMM dtype now worth trying (entries from before bf16 was
    tried count for fp32 only)."""
    return isinstance(entry, dict) and "kernel_max_rows" in entry and (
        dtypes == ("float32",) or entry.get("gemm_dtypes") == list(dtypes))


def _on_cpu(layer: PackedLinear) -> bool:
    return all(t.device.type == "cpu" for t in layer.buffers())
