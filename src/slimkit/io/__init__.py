"""Low-level input/output: the output policy with atomic writes, and tensor de-duplication."""
