"""slimkit's own CPU kernels: C++ built by `torch.utils.cpp_extension` (ninja and the system's
compiler) the first time they are needed; `make setup` builds them at install.

Today: `bitmask_matmul`, the sparse matmul of the `sparse` and `2:4` formats (AVX2), and
`q4_matmul` / `q8_matmul`, the int4 and int8 formats' matmuls with int8 activations and integer
dot products (AVX2; int_matmul.cpp), registered as the torch ops `torch.ops.slimkit.*` with shape
functions, so a compiled model calls them as they are. A machine without a C++ compiler or
without AVX2 gets `None` from `bitmask_kernel()` / `int_kernels()`, and the formats fall back to
torch's paths (and say so in `path_for`); `kernel_status()` says why.

    python -m slimkit.kernels      # build now, and print what was built or why not
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).parent
_status = {"bitmask": "not built yet", "int": "not built yet"}


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


def _build(key: str, name: str, source: str, flags: list[str], python_module: bool = True):
    """The extension `name` built from `source` (the module, or True for an op library), or None
    with the reason in `_status[key]`."""
    if not has_avx2():
        _status[key] = f"no AVX2 on this CPU ({torch.backends.cpu.get_cpu_capability()})"
        return None
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        module = load(name=name, sources=[str(SOURCE_DIR / source)], extra_cflags=["-O3", "-fopenmp", *flags],
                      extra_ldflags=["-fopenmp"],
                      build_directory=str(directory), verbose=False, is_python_module=python_module)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: the fallback runs
        _status[key] = f"not built: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        return None
    _status[key] = f"built in {directory}"
    return module if python_module else True


@functools.lru_cache(maxsize=None)
def bitmask_kernel():
    """The compiled module (`bitmask_matmul(x, mask, values, row_start)`, `bitmask_densify(mask,
    values, row_start, start, stop)`), or None (see kernel_status)."""
    return _build("bitmask", "slimkit_bitmask", "bitmask_matmul.cpp", ["-mavx2", "-mfma"])


@functools.lru_cache(maxsize=None)
def int_kernels():
    """`torch.ops.slimkit` with `q4_matmul(x, codes, scales, zeros, group)` and `q8_matmul(x,
    weights, scales)` once built (int_matmul.cpp has the layouts), or None (see kernel_status)."""
    if _build("int", "slimkit_int", "int_matmul.cpp", ["-mavx2", "-mfma", "-mf16c"], python_module=False) is None:
        return None

    @torch.library.register_fake("slimkit::q4_matmul")
    def _q4(x, codes, scales, zeros, group):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("slimkit::q8_matmul")
    def _q8(x, weights, scales):
        return x.new_empty(x.shape[0], weights.shape[0])

    return torch.ops.slimkit


@functools.lru_cache(maxsize=None)
def source_version(source: str) -> str:
    """A short hash of a kernel's source: measurements cached for one build are not reused for another."""
    import hashlib

    return hashlib.sha1((SOURCE_DIR / source).read_bytes()).hexdigest()[:8]


def int_kernels_version() -> str:
    return source_version("int_matmul.cpp")


def kernel_status() -> dict[str, str]:
    return dict(_status)

