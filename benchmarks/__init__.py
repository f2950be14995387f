"""Lab scripts, not installed with slimkit: peer harnesses (llm-compressor, llama.cpp), synthetic
checkpoints, scale runs and profilers. Run from the repository root, e.g.
`python -m benchmarks.peer_llmcompressor --help`. What `slimkit bench`, `advise` and `reproduce`
measure lives in the package (`slimkit.benchmarks`)."""
