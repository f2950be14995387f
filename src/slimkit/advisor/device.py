"""What the target device can run: CPU ISA features, CUDA capability, and what follows from them."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    name: str
    cores: int
    cpu_flags: tuple[str, ...] = ()
    cuda_capability: tuple[int, int] | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sparse_tensor_cores(self) -> bool:
        """2:4 semi-structured kernels need NVIDIA Ampere (sm80) or newer."""
        return self.kind == "cuda" and self.cuda_capability is not None and self.cuda_capability >= (8, 0)

    @property
    def fp8_matmul(self) -> bool:
        return self.kind == "cuda" and self.cuda_capability is not None and self.cuda_capability >= (8, 9)

    def to_dict(self) -> dict:
        return {**asdict(self), "sparse_tensor_cores": self.sparse_tensor_cores, "fp8_matmul": self.fp8_matmul}

    def describe(self) -> str:
        if self.kind == "cuda":
            return f"{self.name} (CUDA sm{self.cuda_capability[0]}{self.cuda_capability[1]})"
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve") if f in self.cpu_flags]
        return f"{self.name}, {self.cores} cores ({', '.join(isa) or 'no SIMD flags read'})"


def _cpu_flags() -> tuple[str, str]:
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value
    except OSError:
        pass
    return name, flags


def detect(target: str = "auto") -> Device:
    """The device to advise for: 'cpu', 'cuda', 'auto' (CUDA when present, else the CPU), or
    'llamacpp' (this CPU, running llama.cpp's tools from `make peers`)."""
    if target not in ("auto", "cpu", "cuda", "llamacpp"):
        from slimkit.errors import SlimkitError
        raise SlimkitError(f"unknown target '{target}'; use auto, cpu, cuda or llamacpp")
    if target == "llamacpp":
        from slimkit.benchmarks.llamacpp import tool
        from slimkit.errors import SlimkitError

        if tool("llama-bench") is None or tool("llama-perplexity") is None:
            raise SlimkitError("target llamacpp needs llama.cpp's tools: run `make peers` (or set SLIMKIT_LLAMA_CPP)")
        name, flags = _cpu_flags()
        return Device("llamacpp", f"{name} (llama.cpp)", os.cpu_count() or 1, tuple(sorted(flags.split())), None,
                      ("candidates measured by llama-bench and llama-perplexity",))
    if target in ("auto", "cuda") and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        return Device("cuda", torch.cuda.get_device_name(), os.cpu_count() or 1, (), tuple(cap))
    if target == "cuda":
        from slimkit.errors import SlimkitError
        raise SlimkitError("target cuda asked for, but torch sees no CUDA device here")
    name, flags = _cpu_flags()
    notes = ("no 2:4 kernel on CPU (torch's semi-structured sparsity needs CUDA)",)
    return Device("cpu", name, os.cpu_count() or 1, tuple(sorted(flags.split())), None, notes)
