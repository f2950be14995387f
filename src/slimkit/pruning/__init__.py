"""Pruning: magnitude (unstructured, N:M, global), Wanda, SparseGPT steps, structured pruning into smaller dense models, and lottery tickets."""
