"""Test-session settings. Under pytest-xdist (``pytest -n``, the README's test command) every
worker runs one intra-op thread: two workers with torch's default thread count each would
oversubscribe the cores, and OpenMP's spinning threads then slow both by far more than 2x."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
