"""runtime/heap.py: a CPU step keeps its working memory mapped between steps (glibc malloc
thresholds), so later steps stop page-faulting fresh memory in; POCKC_KEEP_HEAP=0 turns it off."""
import os
import subprocess
import sys

import pytest

from pockc.runtime import heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(heap._glibc() is None, reason="glibc malloc only")

PROBE = r"""
import resource, sys, torch
torch.set_num_threads(1)
import pockc
from pockc import zoo
from pockc.runtime import heap
ex = zoo.mobilenet_v2(batch=4, image=128, width=0.5)
step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="bias", optimizer=pockc.SGD(lr=0.01, momentum=0.9))
for _ in range(2):
    step(*ex.example_batch)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step(*ex.example_batch)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3
t = heap.thresholds()
print(faults, t["trim_threshold"], t["mmap_threshold"], step.memory.plan.required_bytes)
"""


def _probe(keep: bool):
    env = dict(os.environ, POCKC_KEEP_HEAP="1" if keep else "0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    faults, trim, mmap, working = out.stdout.split()[-4:]
    return float(faults), int(trim), int(mmap), int(working)


@glibc
def test_thresholds_are_only_raised_and_can_be_turned_off(monkeypatch):
    assert heap.keep_heap(1000)
    t = heap.thresholds()
    assert t["mmap_threshold"] == heap.MAX_MMAP_THRESHOLD and t["trim_threshold"] >= heap.MIN_TRIM_THRESHOLD
    assert heap.keep_heap(1)                       # a smaller step lowers nothing
    assert heap.thresholds() == t
    monkeypatch.setenv("POCKC_KEEP_HEAP", "0")
    assert not heap.enabled() and not heap.keep_heap(10 ** 9)
    assert heap.thresholds() == t


@glibc
@pytest.mark.slow
def test_a_kept_heap_stops_page_faults_between_steps():
    kept, trim, mmap, working = _probe(True)
    dropped, trim0, mmap0, _ = _probe(False)
    assert trim >= 2 * working and mmap == heap.MAX_MMAP_THRESHOLD
    assert trim0 == mmap0 == 0                     # turned off: malloc's defaults untouched
    # MobileNetV2 b4 128px width 0.5 bias-only, measured: ~3,100 minor faults per step with
    # malloc's defaults (12 MB of pages touched afresh), ~250 with the heap kept.
    assert kept < 0.25 * dropped, (kept, dropped)
