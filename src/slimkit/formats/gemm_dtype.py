"""Whether GEMM could run faster in bf16 than in fp32 on this CPU, measured: for dense models and
for packed layers' dequantize + GEMM path (`kernel_rows.py` then times both on each shape).

A speed-up is only honest against the fastest dense configuration the machine has. On CPUs with
AMX or AVX-512 BF16 (oneDNN), a bf16 GEMM runs several times faster than fp32; on AVX2-only CPUs
it runs several times slower (no native bf16 arithmetic). `bench model` therefore times one
typical small-model GEMM in both dtypes at decode and prefill row counts; when bf16 is not
clearly slower at every row count, the baseline model is benchmarked again, whole, in bf16, and
the fastest dense row of each measurement becomes the reference of every ratio.

The probe belongs to the machine: kept per (CPU, threads, torch) in the slimkit cache
(`gemm_dtype.json`, beside the kernels' `kernel_rows.json`).
"""

from __future__ import annotations

import torch

from slimkit.formats.machine import machine_key, read_json_cache, time_call, write_json_cache
from slimkit.paths import cache_root

PROBE_ROWS = (1, 128, 512)  # a decode step, and the two prefills `bench model` times
PROBE_SHAPE = (1536, 576)  # [out, in]: SmolLM2-135M's MLP projection, a typical small-model GEMM
SLOWER_BY = 1.25  # bf16 is left out only when its GEMM is this much slower than fp32 at every row count
CACHE_FILE = "gemm_dtype.json"


@torch.no_grad()
def measure_gemm_dtypes(shape: tuple[int, int] = PROBE_SHAPE, rows=PROBE_ROWS, repeats: int = 5) -> dict:
    """{"shape": [out, in], "rows": [...], "float32": [ms...], "bfloat16": [ms...]} on random data."""
    weight = torch.randn(shape)
    result: dict = {"shape": list(shape), "rows": list(rows)}
    for dtype in (torch.float32, torch.bfloat16):
        w = weight.to(dtype)
        result[str(dtype).removeprefix("torch.")] = [
            round(time_call(lambda x=torch.randn(m, shape[1], dtype=dtype): torch.nn.functional.linear(x, w),
                            repeats) * 1e3, 4) for m in rows]
    return result


def bf16_is_a_candidate(probe: dict, min_rows: int = 1) -> bool:
    """False when bf16's GEMM lost to fp32's by SLOWER_BY or more at every row count from `min_rows`."""
    return any(b < f * SLOWER_BY for m, f, b in zip(probe["rows"], probe["float32"], probe["bfloat16"])
               if m >= min_rows)


def gemm_probe(measure=measure_gemm_dtypes) -> dict:
    """This machine's probe: from the cache, or measured once and cached."""
    path = cache_root() / CACHE_FILE
    cache = read_json_cache(path)
    probe = cache.get(machine_key())
    if not (isinstance(probe, dict) and {"float32", "bfloat16", "rows"} <= set(probe)):
        probe = cache[machine_key()] = measure()
        write_json_cache(path, cache)
    return probe


def probe_note(probe: dict) -> str:
    """One line for the bench table: the measured ratio of bf16 to fp32 GEMM time at each row count."""
    ratios = "/".join(f"{b / f:.1f}x" for f, b in zip(probe["float32"], probe["bfloat16"]))
    rows = "/".join(map(str, probe["rows"]))
    out, inp = probe["shape"]
    verdict = "so the baseline was also timed in bf16" if bf16_is_a_candidate(probe) else \
        f"so bf16 is no candidate for the fastest dense model here (it would need < {SLOWER_BY}x at some row count)"
    return (f"- dense dtype on this CPU: a {out}x{inp} bf16 GEMM takes {ratios} the time of fp32 at "
            f"{rows} rows (measured, cached per CPU and torch), {verdict}")
