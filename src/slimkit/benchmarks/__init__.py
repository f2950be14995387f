"""benchmarks: planned (see the open issues); nothing here yet."""
