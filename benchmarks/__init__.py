"""pockc's benchmarks; run them as modules from the repository root, e.g.
``python -m benchmarks.bench_core``."""
