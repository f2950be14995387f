"""slimkit's own CPU kernels (C++, built by torch.utils.cpp_extension; see build.py)."""

from slimkit.kernels.build import bitmask_kernel, int_kernels, int_kernels_version, kernel_status

__all__ = ["bitmask_kernel", "int_kernels", "int_kernels_version", "kernel_status"]
