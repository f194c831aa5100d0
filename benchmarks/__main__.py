"""``python -m benchmarks [options]``: the benchmark suite, same as ``pockc bench`` (pockc/bench.py).

``python -m benchmarks.bench_core`` still runs the core CPU benchmark of issue 2."""
import sys

from pockc.bench import main

sys.exit(main())
