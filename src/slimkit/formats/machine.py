"""What a measurement on this machine is keyed by, how it is timed, and where it is kept: shared by
the kernels' row crossovers (`kernel_rows.py`) and the fp32 vs bf16 GEMM probe (`gemm_dtype.py`)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

CALL_BUDGET_S = 0.25  # one call over this long is its own answer: no repeats (big layers)


def time_call(fn, repeats: int = 5) -> float:
    """Fastest of `repeats` timed calls after an untimed warm-up (the fastest is the least
    disturbed by other work); one call over CALL_BUDGET_S is the answer itself."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if times[-1] > CALL_BUDGET_S:
            break
    return min(times)


def machine_key() -> str:
    """What the crossover depends on besides the shape: CPU, threads, torch."""
    return f"{_cpu_name()} | threads {torch.get_num_threads()} | torch {torch.__version__}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_json_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: measured again


def write_json_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only means measuring again next time
