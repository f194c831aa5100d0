"""pockc bench: a tiny configuration end to end (worker processes, JSON, Markdown, CLI)."""
import json

import pytest

from pockc import bench, cli
from pockc.runtime import heap


def test_bench_tiny_config_writes_json_and_markdown(tmp_path):
    [res] = bench.run(quick=True, devices=["cpu"], models=["mcu_cnn"], schemes=["bias"],
                      variants=["eager_full", "eager_same", "pockc[aten]"], steps=2, warmup=1,
                      out_dir=tmp_path, name="t", progress=False)
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["machine"]["torch"] and data["git_commit"] and data["date"]
    [cfg] = data["models"]["mcu_cnn"]["configs"]
    for v in ("eager_full", "eager_same", "pockc[aten]"):
        fig = cfg["variants"][v]
        assert "error" not in fig, fig
        assert len(fig["time_ms"]["samples"]) == 2 and fig["time_ms"]["min"] <= fig["time_ms"]["median"]
        assert fig["peak_bytes"] > 0 and fig["setup_s"] > 0
    if heap._glibc() is not None:  # --malloc kept: every process with the same malloc thresholds
        assert len({json.dumps(cfg["variants"][v]["malloc_thresholds"]) for v in cfg["variants"]}) == 1
        assert cfg["variants"]["eager_full"]["malloc_thresholds"]["trim_threshold"] > 0
    assert data["settings"]["malloc"] == "kept"
    assert cfg["ratios"]["eager_same/pockc[aten]"] > 0
    assert any(c["scheme"] == "bias" for c in data["claims"])
    md = (tmp_path / "t.md").read_text()
    assert "| mcu_cnn" in md and "bias" in md


@pytest.mark.skipif(heap._glibc() is None, reason="glibc malloc only")
def test_bench_malloc_default_leaves_baselines_alone(tmp_path):
    [res] = bench.run(quick=True, devices=["cpu"], models=["mcu_cnn"], schemes=["bias"],
                      variants=["eager_same", "pockc[aten]"], steps=1, warmup=1, out_dir=tmp_path, name="t",
                      progress=False, malloc="default")
    vs = res["models"]["mcu_cnn"]["configs"][0]["variants"]
    assert vs["eager_same"]["malloc_thresholds"] == {"trim_threshold": 0, "mmap_threshold": 0}
    assert vs["pockc[aten]"]["malloc_thresholds"]["trim_threshold"] > 0   # the step raised its own
    assert "--malloc default" in (tmp_path / "t.md").read_text()


def test_bench_cli_rejects_unknown_variant(capsys):
    assert cli.main(["bench", "--variants", "eager_full,bogus"]) == cli.COMPILE_ERROR
    assert "unknown variant" in capsys.readouterr().err


def test_worker_environment():
    env = bench.worker_env("pockc[inductor]", 2)
    assert env["OMP_NUM_THREADS"] == "2"
    assert env.get("OMP_WAIT_POLICY") == "PASSIVE" or "OMP_WAIT_POLICY" in __import__("os").environ
    assert "OMP_WAIT_POLICY" not in bench.worker_env("eager_same", 2) or "OMP_WAIT_POLICY" in __import__("os").environ
    assert bench.worker_env("pockc[inductor]", 1).get("OMP_NUM_THREADS") == "1"
