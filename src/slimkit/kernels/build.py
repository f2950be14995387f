"""slimkit's own CPU kernels: C++ built by `torch.utils.cpp_extension` (ninja and the system's
compiler) the first time they are needed; `make setup` builds them at install.

Today: `bitmask_matmul`, the sparse matmul of the `sparse` and `2:4` formats (AVX2). A machine
without a C++ compiler or without AVX2 gets `None` from `bitmask_kernel()`, and the formats fall
back to their pure-torch paths (and say so in `path_for`); `kernel_status()` says why.

    python -m slimkit.kernels      # build now, and print what was built or why not
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).parent
_status = {"bitmask": "not built yet"}


def build_directory() -> Path:
    """Where the built extension lives: $SLIMKIT_KERNEL_DIR, else beside the sources (an
    editable install), else the slimkit cache; one folder per torch version."""
    tag = f"torch-{torch.__version__.replace('+', '-')}"
    env = os.environ.get("SLIMKIT_KERNEL_DIR")
    if env:
        return Path(env).expanduser() / tag
    if os.access(SOURCE_DIR, os.W_OK):
        return SOURCE_DIR / "_build" / tag
    from slimkit.paths import cache_root

    return cache_root() / "kernels" / tag


def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.lru_cache(maxsize=None)
def bitmask_kernel():
    """The compiled module (`bitmask_matmul(x, mask, values, row_start)`, `bitmask_densify(mask,
    values, row_start, start, stop)`), or None (see kernel_status)."""
    if not has_avx2():
        _status["bitmask"] = f"no AVX2 on this CPU ({torch.backends.cpu.get_cpu_capability()})"
        return None
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        module = load(name="slimkit_bitmask", sources=[str(SOURCE_DIR / "bitmask_matmul.cpp")],
                      extra_cflags=["-O3", "-mavx2", "-mfma"], build_directory=str(directory), verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: the fallback runs
        _status["bitmask"] = f"not built: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        return None
    _status["bitmask"] = f"built in {directory}"
    return module


def kernel_status() -> dict[str, str]:
    return dict(_status)

