"""`python -m slimkit.kernels`: build the kernels now (as `make setup` does) and say the outcome."""

from slimkit.kernels.build import bitmask_kernel, int_kernels, kernel_status

print("bitmask_matmul:", "ready" if bitmask_kernel() is not None else "unavailable", "-", kernel_status()["bitmask"])
print("q4_matmul, q8_matmul:", "ready" if int_kernels() is not None else "unavailable", "-", kernel_status()["int"])
