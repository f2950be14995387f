"""Benchmarks: scripts that print one JSON row per measurement and a table (calibration.py: time vs FLOP bound; peer_llmcompressor.py: side by side with llm-compressor)."""
