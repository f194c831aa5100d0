"""benchmarks/bench_remat.py: the allocator metric agrees with the exact tracker, and a tiny
configuration runs end to end through its worker processes (no timing assertions)."""
import importlib.util
import json

import pytest
import torch

import pockc
from benchmarks import bench_remat
from pockc import zoo
from pockc.bench import EagerStep
from pockc.runtime.memory import measure_peak


def test_allocator_peak_matches_tracker_on_an_eager_step():
    ex = zoo.mlp(batch=16, d_in=64, hidden=256, depth=3)
    step = EagerStep(ex.model, ex.loss_fn, pockc.SGD(lr=0.1, momentum=0.9))
    step(*ex.example_batch)
    step.release_grads()
    _, tracked = measure_peak(step, *ex.example_batch)
    step.release_grads()
    _, seen = bench_remat.allocator_peak(step, *ex.example_batch)
    assert tracked > 0 and abs(seen - tracked) <= 0.01 * tracked, (seen, tracked)
    # a second measurement starts from its own baseline (blocks freed between sessions are unseen)
    step.release_grads()
    assert bench_remat.allocator_peak(step, *ex.example_batch)[1] == seen


def test_allocator_peak_sees_tensors_made_outside_the_dispatcher():
    def fn():
        a = torch.empty(1 << 20, dtype=torch.uint8)  # 1 MiB
        b = torch.empty(1 << 19, dtype=torch.uint8)
        del a
        return b
    assert bench_remat.allocator_peak(fn)[1] == (1 << 20) + (1 << 19)


def test_rss_peak_sees_a_fresh_block():
    n = 64 << 20  # above glibc's largest dynamic mmap threshold: its own mapping, whatever the settings
    rss, samples = bench_remat.rss_peak(lambda: torch.ones(n, dtype=torch.uint8), reps=3)
    if rss is None:
        pytest.skip(samples)
    assert 0.9 * n <= rss <= 1.1 * n, samples


def test_tiny_configuration_end_to_end(tmp_path):
    """pockc without a budget and eager, each in a timed and an RSS process (checkpoint, budgets and
    torch.compile take the same paths; they are left out to keep this test short)."""
    rows = bench_remat.bench_model("bert", dict(batch=1, seq=8, d=32, layers=1, ffn=64), fractions=(), ambs=(),
                                   steps=2, threads=1, cache_dir=str(tmp_path), warmup=1, baselines=("eager",),
                                   log=lambda *a: None)
    assert [(r["method"], r["setting"]) for r in rows] == [("pockc", "no remat"), ("eager", "eager")]
    for r in rows:
        assert r["step_s"] > 0 and len(r["step_samples_ms"]) == 2 and r["resident"] > 0
        assert r["allocator_peak"] == r["resident"] + r["allocator_transient"]
        assert abs(r["allocator_over_tracker"] - 1) < 0.02, r
        assert r["malloc_env"] == bench_remat.RSS_ENV and len(r["rss_samples"]) == 5
        assert r["rss_peak"] == r["resident"] + r["rss_transient"]
    pockc_row, eager_row = rows
    assert pockc_row["vs_eager"] == pockc_row["step_s"] / eager_row["step_s"]
    assert pockc_row["overhead_paired"] == 1.0   # its own reference: every paired ratio is one
    assert "vs_eager" in eager_row and "overhead" in eager_row
    meta = dict(date="d", machine="m", torch=torch.__version__, commit="c", threads=1, steps=2)
    md = bench_remat.markdown(rows, meta)
    assert "allocator peak (KB)" in md and "| bert" in md
    json.dumps(rows, default=str)
    if importlib.util.find_spec("matplotlib") is not None:  # the optional extra "plot"
        assert bench_remat.plot(rows, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 0
