"""The sequential calibration engine (block by block, statistics of each linear's inputs) and the OBS solver behind SparseGPT and GPTQ."""
