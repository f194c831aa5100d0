"""benchmarks/bench_core.py: the quick mode runs in-process and writes the expected JSON/Markdown."""
import json

from benchmarks import bench_core


def test_quick_mode_json(tmp_path):
    res = bench_core.run(
        quick=True, steps=2, warmup=1, out_dir=tmp_path, progress=False, name="core_cpu",
        sizes={"llama": dict(seq=8, vocab=64, d=32)},
        # MobileNetV2's compile time dominates at tiny sizes: one policy is enough there.
        updates={"mobilenet_v2": ["last:4+head"]},
    )
    on_disk = json.loads((tmp_path / "core_cpu.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    md = (tmp_path / "core_cpu.md").read_text()
    assert "| model" in md and "pockc ms" in md

    for key in ("benchmark", "date", "git_commit", "machine", "settings", "models", "claims", "wall_s"):
        assert key in on_disk, key
    for key in ("platform", "cpu_model", "cpu_cores", "torch", "torch_num_threads"):
        assert key in on_disk["machine"], key
    assert on_disk["settings"]["quick"] is True and on_disk["settings"]["steps"] == 2
    assert set(on_disk["models"]) == {"mobilenet_v2", "llama"}

    llama = on_disk["models"]["llama"]
    assert [c["label"] for c in llama["configs"]] == ["full", "last:2", '{"layers.1.*": "channels:0.25"}']
    assert llama["optimizer"]["type"] == "AdamW"
    for m in on_disk["models"].values():
        assert m["params"] > 0
        ef = m["eager_full"]
        assert ef["torch_optim_foreach"] is False  # torch.optim's default on CPU
        for c in m["configs"]:
            for k in ("update", "label", "trainable_tensors", "trained_params", "trained_fraction",
                      "eager_same_is_eager_full", "eager_same", "pockc", "ratios"):
                assert k in c, k
            for fig in (ef, c["eager_same"], c["pockc"]):
                t = fig["time_ms"]
                assert len(t["samples"]) == 2 and 0 < t["min"] <= t["median"] <= t["max"]
                assert fig["peak_bytes"] > 0 and fig["resident_bytes"] > 0
                assert fig["peak_total_bytes"] == fig["peak_bytes"] + fig["resident_bytes"]
            assert c["pockc"]["compile_s"] > 0
            for k in ("eager_same_over_pockc", "eager_full_over_pockc", "eager_same_over_pockc_paired",
                      "eager_full_over_pockc_paired", "peak_eager_same_over_pockc", "peak_eager_full_over_pockc"):
                assert c["ratios"][k] > 0, k
    full = llama["configs"][0]
    assert full["eager_same_is_eager_full"] and full["trained_fraction"] == 1.0
    assert full["eager_same"]["time_ms"] == llama["eager_full"]["time_ms"]
    sparse = llama["configs"][2]
    assert 0 < sparse["trained_fraction"] < 1 and not sparse["eager_same_is_eager_full"]

    claims = on_disk["claims"]
    assert any("1.8x" in c["claim"] for c in claims)
    assert all({"claim", "model", "update", "ratio", "threshold", "pass", "quick_mode"} <= set(c) for c in claims)


def test_eager_same_channel_sparse_matches_oracle():
    """The benchmark's eager channel-sparse baseline trains exactly what the oracle trains."""
    import copy

    import torch

    import pockc
    from pockc import zoo
    from tests.oracle import eager_steps

    ex = zoo.llama(batch=1, seq=8, vocab=64, d=32, layers=2)
    opt = pockc.AdamW(lr=1e-2)
    m_b, m_o = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch,
                         update={"layers.1.*": "channels:0.25"}, optimizer=opt)
    runner = bench_core.EagerStep(m_b, ex.loss_fn, opt, step.update_plan)
    for _ in range(2):
        runner(*ex.example_batch)
    eager_steps(m_o, ex.loss_fn, [ex.example_batch] * 2, step.update_plan, opt)
    for (n, a), b in zip(m_b.named_parameters(), m_o.parameters()):
        torch.testing.assert_close(a, b, msg=n)
