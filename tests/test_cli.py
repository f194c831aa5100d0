"""The pockc CLI, through a subprocess, with exit codes."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cnn.py")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pockc", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_compile_example(tmp_path):
    out = tmp_path / "build"
    r = run("compile", EXAMPLE, "--update", "last:2", "-o", str(out), "--steps", "2")
    assert r.returncode == 0, r.stderr
    assert "trainable params: 55,552 || all params: 70,618 || trainable%: 78.6655" in r.stdout
    assert "blocks.3.conv.weight" in r.stdout and "ran 2 steps" in r.stdout
    code = (out / "train_step.py").read_text()
    assert "def forward(" in code and "torch.ops.aten.convolution_backward" in code
    compile(code, "train_step.py", "exec")  # valid Python
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rules"]["blocks.3.conv.weight"] == "full" and plan["rules"]["stem.conv.weight"] == "frozen"
    assert "trainable params" in (out / "report.txt").read_text()


def test_json_dict_policy_and_plan_file(tmp_path):
    out = tmp_path / "b"
    r = run("compile", EXAMPLE, "--update", '{"blocks.3.*": "channels:0.5", "fc.*": "full"}', "-o", str(out),
            "--optimizer", "adamw", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr
    assert "channels:0.5" in r.stdout
    r2 = run("compile", EXAMPLE, "--update", str(out / "plan.json"), "-o", str(tmp_path / "c"))
    assert r2.returncode == 0, r2.stderr
    assert "channels:0.5" in r2.stdout


def test_errors_are_one_line_with_exit_codes(tmp_path):
    r = run("compile", EXAMPLE, "--update", "lst:2", "-o", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("pockc: error: unknown update preset 'lst:2'")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = run("compile", str(tmp_path / "missing.py"))
    assert r.returncode == 2 and "not found" in r.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("def model():\n    return None\n")
    r = run("compile", str(bad))
    assert r.returncode == 2 and "must define example_batch(), loss_fn()" in r.stderr
    r = run("compile", EXAMPLE, "--update", '{"nope.*": "full"}', "-o", str(tmp_path))
    assert r.returncode == 1 and "closest names" in r.stderr and "Traceback" not in r.stderr
