"""The pockc CLI, through a subprocess, with exit codes."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cnn.py")


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "pockc", *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=None if env is None else {**os.environ, **env})


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


TASK = """
import torch, torch.nn as nn, torch.nn.functional as F
import pockc

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

def _data(seed, n):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

def example_batch():
    return train_data()[0]

def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)

def metric(model, x, y):
    return (model(x).argmax(1) == y).float().mean()

def optimizer():
    return pockc.SGD(lr=0.05, momentum=0.9)

def scoring():
    return {"steps": 4, "base": "head"}
"""
DATA = """
def train_data():
    x, y = _data(1, 64)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]

def val_data():
    return [_data(2, 50)]
"""


def test_task_data_scores_budget_and_epochs(tmp_path):
    f = tmp_path / "task.py"
    f.write_text(TASK + DATA)
    env = {"POCKC_CACHE": str(tmp_path / "cache")}
    r = run("compile", str(f), "--budget", "24KB", "--epochs", "3", "-o", str(tmp_path / "o"), env=env)
    assert r.returncode == 0, r.stderr
    assert "scoring 10 candidates" in r.stdout and "contribution scores (measured" in r.stdout
    assert "over the base head alone" in r.stdout and "always" in r.stdout
    assert "fine-tuned 3 epochs (12 steps" in r.stdout and "validation metric():" in r.stdout
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["settings"]["base"] == "head" and len(scores["scores"]) == 10
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["rules"]["4.weight"] == "full"
    r = run("compile", str(f), "--budget", "24KB", "-o", str(tmp_path / "o2"), env=env)   # cache hit
    assert r.returncode == 0 and "contribution scores (cached" in r.stdout, r.stderr
    r = run("compile", str(f), "--budget", "24KB", "--scores", str(tmp_path / "o" / "scores.json"),
            "-o", str(tmp_path / "o3"), env=env)
    assert r.returncode == 0 and "10 candidates from" in r.stdout and "scoring" not in r.stdout, r.stderr
    sel = lambda d: json.loads((tmp_path / d / "plan.json").read_text())["rules"]  # noqa: E731
    assert sel("o") == sel("o2") == sel("o3")


def test_no_task_data_uses_the_prior_and_says_so(tmp_path):
    f = tmp_path / "task.py"
    f.write_text(TASK + "\ndef train_data():\n    return [_data(1, 16)]\n"
                 .replace("train_data():\n    return [_data(1, 16)]", "example_batch():\n    return _data(1, 16)"))
    r = run("compile", str(f), "--budget", "24KB", "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "defines no train_data()/val_data(): choosing on the prior" in r.stdout
    r = run("compile", str(f), "--epochs", "2", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "--epochs needs train_data() and val_data()" in r.stderr


@pytest.mark.parametrize("data,text", [
    ("def train_data():\n    return []\ndef val_data():\n    return [_data(2, 8)]\n", "train_data() is empty"),
    ("def train_data():\n    return [_data(1, 16), _data(1, 5)]\ndef val_data():\n    return [_data(2, 8)]\n",
     "train_data() batch 1 has shapes"),
    ("def train_data():\n    return [_data(1, 16)]\n", "defines train_data() but not val_data()"),
    ("def train_data():\n    return 7\ndef val_data():\n    return [_data(2, 8)]\n", "train_data() must be an iterable"),
    ("def train_data():\n    raise OSError('no disk')\ndef val_data():\n    return []\n",
     "train_data() in the model file raised OSError: no disk"),
])
def test_bad_task_data_is_a_usage_error(tmp_path, data, text):
    f = tmp_path / "task.py"
    f.write_text(TASK.replace("return train_data()[0]", "return _data(1, 16)") + data)
    r = run("compile", str(f), "--budget", "24KB", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and text in r.stderr and "Traceback" not in r.stderr, (r.stdout, r.stderr)


def test_scores_file_errors(tmp_path):
    r = run("compile", EXAMPLE, "--scores", str(tmp_path / "s.json"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "--scores needs --budget" in r.stderr
    r = run("compile", EXAMPLE, "--budget", "1MB", "--scores", str(tmp_path / "s.json"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "not found" in r.stderr
    (tmp_path / "s.json").write_text('{"x": 1}')
    r = run("compile", EXAMPLE, "--budget", "1MB", "--scores", str(tmp_path / "s.json"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a scores file" in r.stderr
