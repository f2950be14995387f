"""Hand a compressed model to a runtime: plain HF safetensors, compressed-tensors (vLLM) and GGUF (llama.cpp), each verified by loading it back."""
