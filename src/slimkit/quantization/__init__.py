"""Quantization: round-to-nearest as pure functions, AWQ scales, and the RTN / GPTQ / AWQ recipe steps."""
