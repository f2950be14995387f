"""The element-wise math every layer above shares: the grids weights are rounded onto (integer
round-to-nearest, llama.cpp's block grids) and the masks they are pruned with (magnitude, N:M).
Plain functions over tensors; this package imports nothing of slimkit's but `errors`."""
