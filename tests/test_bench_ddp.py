"""benchmarks/bench_ddp.py in quick mode on one workload: both variants run on 2 gloo ranks, the
bytes are measured (pockc's equal its plan's, DDP's its buckets'), and the table is written."""
from __future__ import annotations

import json

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")


def test_quick_run_measures_both_variants(tmp_path):
    from benchmarks import bench_ddp
    res = bench_ddp.run(quick=True, steps=2, warmup=1, rounds=1, out_dir=tmp_path, only=["llama last:2"])
    (e,) = res["workloads"]
    assert e["pockc"]["bytes"] == e["pockc"]["planned_bytes"] == e["ddp"]["bytes"] > 0
    assert len(e["pockc"]["step_s"]) == len(e["ddp"]["step_s"]) == 2
    assert {c["claim"] for c in res["claims"]} >= {"pockc all-reduces exactly its trained rows' bytes"}
    md = bench_ddp.markdown(res)
    assert "llama last:2" in md and "DDP/pockc time" in md
    json.dumps(res, default=str)
