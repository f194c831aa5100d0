"""runtime/heap.py: a CPU step keeps its working memory mapped between steps (glibc malloc
thresholds), so later steps reuse it instead of mapping fresh memory; POCKC_KEEP_HEAP=0 turns it off.
Checked through malloc's own accounting (mallinfo2), not page-fault counts, which vary by machine."""
import json
import os
import subprocess
import sys

import pytest

from pockc.runtime import heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
glibc = pytest.mark.skipif(heap._glibc() is None, reason="glibc malloc only")

# A fresh process loads runtime/heap.py alone (no torch: nothing else allocates in between) and
# asks glibc itself, through mallinfo2(), where blocks come from: hblkhd counts bytes in mmap'd
# chunks, arena the bytes of the brk heap. Deterministic: no page-fault counts, no timing.
PROBE = r"""
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
libc = heap._glibc()

class Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
info = lambda: libc.mallinfo2()
MiB = 1 << 20
working = int(sys.argv[2])
kept = heap.keep_heap(working)
out = {"kept": kept, "thresholds": heap.thresholds()}
# 1. an 8 MiB block (a typical activation): mmap'd under malloc's defaults, from the heap once kept
a0 = info()
p = libc.malloc(8 * MiB)
a1 = info()
out["block_mmapped"] = a1.hblkhd - a0.hblkhd
out["block_from_heap"] = a1.uordblks - a0.uordblks
libc.free(p)
# 2. blocks of 3 x 24 MiB (72 MiB, under 2 x working when working is 40 MiB), freed: the heap keeps them
b0 = info()
ps = [libc.malloc(24 * MiB) for _ in range(3)]
b1 = info()
for q in ps:
    libc.free(q)
b2 = info()
out["big_from_heap"] = b1.uordblks - b0.uordblks     # bytes handed out from the heap
out["heap_after_free"] = b2.arena                     # the heap's size once they are freed
# 3. the freed memory is what the next step gets: the same address again, no new memory
c0 = info()
again = [libc.malloc(24 * MiB) for _ in range(3)]
c1 = info()
out["reused"] = sorted(again) == sorted(ps) and c1.arena == c0.arena and c1.hblkhd == c0.hblkhd
print(json.dumps(out))
"""


def _probe(keep: bool, working=40 << 20):
    env = dict(os.environ, POCKC_KEEP_HEAP="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", PROBE, os.path.join(ROOT, "runtime", "heap.py"), str(working)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.splitlines()[-1])


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


mallinfo2 = pytest.mark.skipif(heap._glibc() is None or not hasattr(heap._glibc(), "mallinfo2"),
                               reason="glibc >= 2.33 (mallinfo2)")


@glibc
@mallinfo2
def test_a_kept_heap_serves_and_keeps_step_sized_blocks_from_the_heap():
    MiB = 1 << 20
    kept = _probe(True)
    assert kept["kept"] and kept["thresholds"] == {"trim_threshold": 80 * MiB, "mmap_threshold": 32 * MiB}
    assert kept["block_mmapped"] == 0 and kept["block_from_heap"] >= 8 * MiB     # not mmap'd: reusable
    assert kept["big_from_heap"] >= 72 * MiB
    assert kept["heap_after_free"] >= 72 * MiB    # not trimmed: 72 MiB free < 2 x 40 MiB working memory
    assert kept["reused"]                         # the next "step" gets the same memory back
    # turned off, malloc's defaults stay: the same blocks are mmap'd and given back on free
    off = _probe(False)
    assert not off["kept"] and off["thresholds"] == {"trim_threshold": 0, "mmap_threshold": 0}
    assert off["block_mmapped"] >= 8 * MiB and off["block_from_heap"] < 8 * MiB
    assert off["big_from_heap"] < 72 * MiB and off["heap_after_free"] < 72 * MiB


@glibc
@mallinfo2
def test_the_trim_threshold_follows_the_working_memory():
    """2 x the working memory, at least 64 MiB: with 20 MiB working memory (threshold 64 MiB) the
    freed 72 MiB at the top of the heap is given back; with 40 MiB (80 MiB) it is kept."""
    MiB = 1 << 20
    small = _probe(True, working=20 * MiB)
    assert small["thresholds"]["trim_threshold"] == 64 * MiB
    assert small["big_from_heap"] >= 72 * MiB and small["heap_after_free"] < 72 * MiB and not small["reused"]
    assert _probe(True, working=40 * MiB)["heap_after_free"] >= 72 * MiB
