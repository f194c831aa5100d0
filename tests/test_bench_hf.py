"""benchmarks/bench_hf.py (pockc vs PEFT on transformers' LlamaForCausalLM): its workers build
and measure the variants, its parent side turns figures into ratios and claims honestly, and it
writes results only where it may. No timing is asserted: the figures are synthetic where the
parent side is tested, and real (quick sizes, in-process) where the workers are."""
from __future__ import annotations

import json
import operator
import statistics

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import bench_hf  # noqa: E402
from benchmarks.bench_core import summarize  # noqa: E402
from pockc import bench as pockc_bench  # noqa: E402

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt}


def worker(variant, warmup=1):
    return bench_hf._Worker(dict(variant=variant, sizes=bench_hf.sizes_for(True), warmup=warmup, threads=1))


def test_batch_is_hf_dict_with_right_padding():
    sizes = dict(bench_hf.sizes_for(False), seq=16, pad=4)     # full-size batch shape rules, short rows
    b = bench_hf.make_batch(sizes)
    assert set(b) == {"input_ids", "attention_mask", "labels"} and b["input_ids"].shape == (2, 16)
    assert b["attention_mask"][0].all() and b["attention_mask"][1, :12].all() and not b["attention_mask"][1, 12:].any()
    assert (b["labels"][1, 12:] == -100).all() and (b["labels"][:, :12] == b["input_ids"][:, :12]).all()
    one = bench_hf.make_batch(sizes, rows=1)
    assert one["input_ids"].shape == (1, 16) and (one["input_ids"] == b["input_ids"][:1]).all()


def test_workers_train_the_same_adapters_and_measure_at_the_allocator():
    peft_w, pockc_w, k8 = worker("peft_eager_fp32"), worker("pockc_fp32"), worker("pockc_fp32_k8", warmup=0)
    cfg = bench_hf.sizes_for(True)["config"]
    per_layer = 4 * 16 * (2 * cfg["hidden_size"])        # q/k/v/o: r x (in + out), all hidden x hidden here
    assert peft_w.info["trained_params"] == pockc_w.info["trained_params"] == k8.info["trained_params"] \
        == per_layer * cfg["num_hidden_layers"]
    assert peft_w.info["trained_dtypes"] == pockc_w.info["trained_dtypes"] == ["float32"]
    assert peft_w.info["compile_s"] is None and pockc_w.info["compile_s"] > 0
    assert k8.info["tokens_per_step"] == bench_hf.K * pockc_w.info["tokens_per_step"]   # quick batch: 1 row
    for w in (peft_w, pockc_w, k8):
        times = w.run(1)
        assert len(times) == 1 and times[0] > 0
        m = w.memory()
        assert m["measured_at"] == "allocator" and m["peak_bytes"] > 0 and m["resident_bytes"] > 0
        w.info.update(m)
    # the accumulation buffers are resident in the K=8 step, and they are what the plan calls them
    assert k8.info["accumulated_gradient_bytes"] == 4 * k8.info["trained_params"]
    assert k8.info["resident_bytes"] - pockc_w.info["resident_bytes"] == k8.info["accumulated_gradient_bytes"]
    assert k8.runner.step.micro_step == 0 and k8.runner.step.update_count == 3   # 3 whole cycles ran


def test_peft_bf16_keeps_float32_adapters():
    w = worker("peft_eager_bf16", warmup=0)
    assert w.info["trained_dtypes"] == ["float32"] and w.info["frozen_dtypes"] == ["bfloat16"]


# --------------------------------------------------------------------------- the parent side, synthetic
def fake_figures(names, slow="peft"):
    """Figures as time_all returns them; PEFT 3x pockc's step time (or pockc 3x PEFT's)."""
    figs, times = {}, {}
    for i, k in enumerate(names):
        o = bench_hf.VARIANTS[k]
        base = 30.0 if (o["kind"] == "peft") == (slow == "peft") else 10.0
        ts = [(base + i + j) / 1e3 for j in range(3)]
        rows = o.get("rows") or 1
        f = dict(kind=o["kind"], precision=o["precision"], compiled=bool(o.get("compile")), accumulate=o.get(
            "accumulate", 1), batch_shape=[rows, 32], tokens_per_step=32 * o.get("accumulate", 1), trained_params=16384,
            trained_dtypes=["float32"], frozen_dtypes=["float32"], first_step_s=0.1, compile_s=None,
            peak_bytes=4_000_000 + 10_000 * i if o["kind"] == "peft" else 1_000_000, resident_bytes=1_500_000,
            measured_at="allocator", time_ms=summarize(ts))
        if o["kind"] == "pockc":
            f.update(compile_s=1.0, accumulated_gradient_bytes=65536 if o.get("accumulate", 1) > 1 else 0)
            if o.get("accumulate", 1) > 1:
                f["resident_bytes"] += 65536
        f["tokens_per_s"] = f["tokens_per_step"] / (f["time_ms"]["median"] / 1e3)
        figs[k], times[k] = f, ts
    return figs, times


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    calls = {}

    def fake_time_all(specs, threads, rounds, log, slow="peft", fail=()):
        calls["specs"] = specs
        figs, times = fake_figures([k for k in specs if k not in fail], slow)
        for k in fail:
            figs[k] = {"error": "BackendCompilerFailed: inductor exploded", "failed": True}
        return figs, times, [0.5] * rounds

    def go(slow="peft", fail=(), variants=None):
        monkeypatch.setattr(bench_hf, "time_all", lambda *a: fake_time_all(*a, slow=slow, fail=fail))
        res = bench_hf.run(quick=True, steps=3, warmup=0, out_dir=tmp_path, variants=variants, progress=False)
        return res, calls["specs"]
    return go


def check_claims(r):
    for c in r["claims"]:
        if c["ratio"] is None:
            assert c["pass"] is None and c["not_measured"]
        else:
            assert c["pass"] is OPS[c["op"]](c["ratio"], c["threshold"]), c


def test_ratios_and_claims_come_from_the_figures(fake_run, tmp_path):
    res, specs = fake_run()
    r = res["result"]
    assert set(specs) == set(bench_hf.VARIANTS) == set(r["variants"])
    med = lambda k: statistics.median(r["variants"][k]["time_ms"]["samples"])  # noqa: E731
    for a, b in (("peft_eager_fp32", "pockc_fp32"), ("peft_compile_fp32", "pockc_fp32"),
                 ("peft_eager_bf16", "pockc_bf16"), ("peft_compile_bf16", "pockc_bf16"),
                 ("peft_eager_fp32_k8", "pockc_fp32_k8")):
        assert r["ratios"][f"{a}/{b}"] == pytest.approx(med(a) / med(b), rel=1e-3)
        peak = r["variants"][b]["peak_bytes"] / r["variants"][a]["peak_bytes"]
        assert r["ratios"][f"peak {b}/{a}"] == pytest.approx(peak)
    check_claims(r)
    by = {c["claim"]: c for c in r["claims"]}
    assert len(by) == 7 and all(c["pass"] for c in r["claims"])   # pockc 3x faster, 1/4 the peak
    acc = r["accumulation"]
    assert acc["bound_bytes"] == r["variants"]["pockc_fp32_b1"]["peak_bytes"] + 65536
    assert acc["k8_cycle_bytes"] == r["variants"]["pockc_fp32_k8"]["peak_bytes"] + 65536
    # the written files: the same figures, every variant in the table, the tracker named
    data = json.loads((tmp_path / "hf_lora_cpu_quick.json").read_text())
    assert data["result"]["ratios"] == pytest.approx(r["ratios"])
    md = (tmp_path / "hf_lora_cpu_quick.md").read_text()
    for k in bench_hf.VARIANTS:
        assert f"| {k} " in md
    assert "measure_allocator_peak" in md and md.count("PASS") == 7


def test_claims_fail_honestly_and_failures_are_recorded(fake_run):
    res, _ = fake_run(slow="pockc", fail=("peft_compile_fp32", "pockc_bf16"))
    r = res["result"]
    check_claims(r)
    by = {c["claim"]: c for c in r["claims"]}
    assert by["pockc at least 1.3x faster than PEFT eager (float32)"]["pass"] is False
    assert by["pockc (backend='inductor') faster than PEFT + torch.compile (float32)"]["pass"] is None     # its baseline failed
    assert by["pockc at least 1.3x faster than PEFT eager (bf16)"]["pass"] is None    # pockc bf16 failed
    assert r["variants"]["peft_compile_fp32"]["failed"]
    md = bench_hf.markdown(res)
    assert "FAIL: pockc at least 1.3x faster than PEFT eager (float32)" in md
    assert "failed: peft_compile_fp32: BackendCompilerFailed" in md and "failed: pockc_bf16" in md
    assert "NOT MEASURED" in md


def test_different_trainable_sets_are_an_error(fake_run, monkeypatch):
    real = fake_figures

    def lopsided(names, slow="peft"):
        figs, times = real(names, slow)
        figs["pockc_fp32"]["trained_params"] += 1
        return figs, times
    monkeypatch.setitem(globals(), "fake_figures", lopsided)
    with pytest.raises(RuntimeError, match="different numbers of parameters"):
        fake_run(variants=["peft_eager_fp32", "pockc_fp32"])


def test_refuses_to_write_results_from_an_uncommitted_tree(monkeypatch):
    monkeypatch.setattr(pockc_bench, "tree_changes", lambda: ["pockc/api.py"])
    monkeypatch.setattr(bench_hf, "time_all", lambda *a: pytest.fail("ran before checking the tree"))
    with pytest.raises(pockc_bench.BenchError, match="uncommitted"):
        bench_hf.run(quick=True, out_dir=bench_hf.RESULTS, progress=False)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="unknown variant"):
        bench_hf.bench(True, 1, 0, 1, variants=["peft_eager_fp64"], progress=False)
