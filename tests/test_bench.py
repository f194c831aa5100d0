"""pockc bench: a tiny configuration end to end (worker processes, JSON, Markdown, CLI)."""
import json
import os

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


def test_worker_environment(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = bench.worker_env("pockc[inductor]", 2)
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"          # compiled variants: OpenMP threads sleep, not spin
    assert "OMP_WAIT_POLICY" not in bench.worker_env("eager_same", 2)
    assert "OMP_WAIT_POLICY" not in bench.worker_env("pockc[inductor]", 1)
    assert bench.worker_env("pockc[inductor]", 1)["OMP_NUM_THREADS"] == "1"
    assert str(bench.REPO) in env["PYTHONPATH"].split(os.pathsep)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")        # the user's own setting wins
    assert bench.worker_env("pockc[inductor]", 2)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_results_only_from_a_committed_tree(tmp_path, monkeypatch, capsys):
    """benchmarks/results records the commit that produced each file: a dirty tree may not write
    there (elsewhere it may), and the refusal is a BenchError naming the changed files."""
    monkeypatch.setattr(bench, "tree_changes", lambda: ["passes/prune_backward.py"])
    with pytest.raises(bench.BenchError, match="prune_backward.py.*commit first"):
        bench.require_committed(bench.RESULTS_DIR)
    with pytest.raises(bench.BenchError):
        bench.require_committed(bench.RESULTS_DIR / "sub")
    bench.require_committed(tmp_path)                        # --out elsewhere: allowed
    # the command line refuses before any work, in one line
    assert cli.main(["bench", "--quick", "--models", "mcu_cnn", "--out", str(bench.RESULTS_DIR)]) == cli.COMPILE_ERROR
    assert "commit first" in capsys.readouterr().err
    monkeypatch.setattr(bench, "tree_changes", lambda: [])
    bench.require_committed(bench.RESULTS_DIR)


def test_noisy_run_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    quiet = {"git_commit": None, "machine": {"load_average_start": [0.5, 1, 1], "load_average_end": [1.9, 1, 1]},
             "configs": [{"load_1min": [1.0, 1.2]}]}
    bench.write_results(tmp_path, "quiet", quiet, "# title\nbody\n")
    assert json.loads((tmp_path / "quiet.json").read_text())["load"] == {"max_1min": 1.9, "cores": 2,
                                                                        "exceeded_cores": False}
    assert "Noisy" not in (tmp_path / "quiet.md").read_text()
    noisy = {"machine": {"load_average_start": [0.5, 1, 1], "load_average_end": [1.0, 1, 1]},
             "configs": [{"load_1min": [1.0, 3.5]}]}
    bench.write_results(tmp_path, "noisy", noisy, "# title\nbody\n")
    assert json.loads((tmp_path / "noisy.json").read_text())["load"]["exceeded_cores"] is True
    md = (tmp_path / "noisy.md").read_text()
    assert md.startswith("# title\n\n> **Noisy run:** the 1-minute load average reached 3.50 on 2 cores")
    assert md.rstrip().endswith("body")
