"""Models bigger than RAM: compress one block at a time, from disk to disk, and resume."""
