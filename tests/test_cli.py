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


# --- every failure is one line on stderr and a non-zero exit; no traceback, no corrupt files ---------

def cli(capsys, *args):
    """``pockc`` in this process: (exit status, stdout, stderr)."""
    from pockc.cli import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:        # argparse's own exits
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err):
    return err.startswith("pockc: ") and err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


@pytest.fixture
def task(tmp_path, monkeypatch):
    """A tiny task file (model, data, metric) whose model() leaves a mark when it runs."""
    monkeypatch.setenv("POCKC_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "task.py"
    f.write_text(TASK + DATA + f"\n_model = model\ndef model():\n    open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                 "    return _model()\n")
    return f


@pytest.mark.parametrize("where", ["a file", "under a file", "/proc/pockc-out", "/proc", "immutable"])
def test_a_bad_output_directory_fails_first(task, tmp_path, capsys, where):
    (tmp_path / "afile").write_text("user data")
    out = {"a file": tmp_path / "afile", "under a file": tmp_path / "afile" / "build",
           "immutable": tmp_path / "locked" / "build"}.get(where, where)
    if where == "immutable":
        os.mkdir(tmp_path / "locked")
        if subprocess.run(["chattr", "+i", str(tmp_path / "locked")], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
    try:
        rc, _, err = cli(capsys, "compile", task, "--steps", 1, "-o", out)
    finally:
        if where == "immutable":
            subprocess.run(["chattr", "-i", str(tmp_path / "locked")])
    assert rc == 2 and one_line(err) and f"-o {out}" in err, err
    assert not (tmp_path / "ran").exists()                   # checked before any work
    assert (tmp_path / "afile").read_text() == "user data"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_output_directory_fails_first(task, tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    rc, _, err = cli(capsys, "compile", task, "-o", d / "build")
    assert rc == 2 and one_line(err) and "cannot create the output directory" in err


@pytest.mark.parametrize("args,text", [
    (["--epochs", "-1"], "argument --epochs: must be 0 or more, got -1"),
    (["--steps", "-1"], "argument --steps: must be 0 or more, got -1"),
    (["--steps", "two"], "argument --steps: 'two' is not a whole number"),
    (["--lr", "inf"], "argument --lr: must be a finite number >= 0, got inf"),
    (["--lr", "nan"], "argument --lr: must be a finite number >= 0, got nan"),
    (["--lr", "-0.1"], "argument --lr: must be a finite number >= 0, got -0.1"),
    (["--momentum=-inf"], "argument --momentum: must be a finite number >= 0"),
    (["--update", "channels:0.5"], """write --update '{"*": "channels:0.5"}'"""),
    (["--update", "head+channels:[0,1]"], """'{"*": "channels:[0,1]"}'"""),
    (["--update", "nofile.json"], "--update: plan file 'nofile.json' not found"),
])
def test_bad_arguments_are_one_line_usage_errors(task, tmp_path, capsys, args, text):
    rc, out, err = cli(capsys, "compile", task, *args, "-o", tmp_path / "o")
    assert rc == 2 and one_line(err) and text in err, err
    assert not (tmp_path / "o").exists() and "ran -1" not in out


@pytest.mark.parametrize("content,text", [
    ('{"rules": {"0.weight": "full",\n', "broken.json is not valid JSON: Expecting"),
    ("", "broken.json is empty"),
    ("[1, 2]", "broken.json is not a plan.json written by pockc"),
])
def test_a_broken_plan_file_is_named(task, tmp_path, capsys, content, text):
    (tmp_path / "broken.json").write_text(content)
    rc, _, err = cli(capsys, "compile", task, "--update", tmp_path / "broken.json", "-o", tmp_path / "o")
    assert rc == 2 and one_line(err) and text in err, err


@pytest.mark.parametrize("value,shown", [("42", "42 (int)"), ("None", "None"), ("'x'", "'x' (str)"),
                                         ("(1, 2)", "(1, 2) (tuple)")])
def test_example_batch_must_be_tensors(tmp_path, capsys, value, shown):
    f = tmp_path / "m.py"
    f.write_text(TASK.replace("return train_data()[0]", f"return {value}"))
    rc, _, err = cli(capsys, "compile", f, "-o", tmp_path / "o")
    assert rc == 2 and one_line(err), err
    assert f"example_batch() in the model file must return a tensor or a tuple of tensors, e.g. (x, y); " \
           f"it returned {shown}" in err
    f.write_text(TASK.replace("return train_data()[0]", "return _data(1, 16)").replace(
        "return nn.Sequential(", "return 42 or nn.Sequential("))
    rc, _, err = cli(capsys, "compile", f, "-o", tmp_path / "o")
    assert rc == 2 and one_line(err) and "model() in the model file must return a torch.nn.Module, got 42" in err


@pytest.mark.parametrize("how", [["--steps", "4"], ["--epochs", "2"]])
def test_a_non_finite_loss_fails_and_writes_nothing(task, tmp_path, capsys, how):
    rc, out, err = cli(capsys, "compile", task, "--lr", "1e30", *how, "-o", tmp_path / "o")
    assert rc == 1 and one_line(err) and "training diverged: the loss is nan" in err and "lower the learning" in err
    assert not (tmp_path / "o").exists()          # created for the run, removed again: nothing half-done left


def test_unexpected_errors_are_one_line(task, tmp_path, capsys, monkeypatch):
    import pockc

    def broken(*a, **k):
        raise RuntimeError("boom\n  in a multi-line message")
    monkeypatch.setattr(pockc, "compile", broken)
    rc, _, err = cli(capsys, "compile", task, "-o", tmp_path / "o")
    assert rc == 1 and one_line(err) and "unexpected RuntimeError: boom | in a multi-line message" in err
    monkeypatch.undo()
    f = tmp_path / "m.py"
    f.write_text(TASK.replace("return (model(x).argmax(1) == y)", "return 1 / 0 + (model(x).argmax(1) == y)")
                 + DATA)
    rc, _, err = cli(capsys, "compile", f, "--update", "head", "--epochs", "1", "-o", tmp_path / "o")
    assert rc == 2 and one_line(err) and "metric() on val_data() raised ZeroDivisionError" in err


def test_keyboard_interrupt_is_one_line_exit_130(tmp_path):
    f = tmp_path / "m.py"                    # (a subprocess: an escaping KeyboardInterrupt would stop pytest)
    f.write_text(TASK.replace("torch.manual_seed(0)", "raise KeyboardInterrupt"))
    r = run("compile", str(f), "-o", str(tmp_path / "o"))
    assert r.returncode == 130 and r.stderr == "pockc: interrupted\n" and not (tmp_path / "o").exists(), r.stderr


def test_ctrl_c_in_a_real_run(tmp_path):
    import signal
    f = tmp_path / "m.py"
    f.write_text(TASK.replace("torch.manual_seed(0)", "import time; print('ready', flush=True); time.sleep(120)"))
    p = subprocess.Popen([sys.executable, "-m", "pockc", "compile", str(f), "-o", str(tmp_path / "o")],
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),   # even from a background job
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and err == "pockc: interrupted\n", err
    assert not (tmp_path / "o").exists()


def test_a_rerun_removes_only_the_files_pockc_wrote_before(task, tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = cli(capsys, "compile", task, "--budget", "24KB", "-o", out)
    assert rc == 0, err
    assert {"train_step.py", "plan.json", "report.txt", "scores.json", ".pockc-manifest.json"} <= set(os.listdir(out))
    (out / "notes.txt").write_text("mine")                 # the user's own file
    rc, stdout, err = cli(capsys, "compile", task, "--update", "head", "-o", out)
    assert rc == 0, err
    assert "removed scores.json from an earlier run" in stdout
    assert sorted(os.listdir(out)) == [".pockc-manifest.json", "model.safetensors", "notes.txt", "plan.json",
                                       "report.txt", "step", "train_step.py"]
    assert json.loads((out / "plan.json").read_text())["rules"]["0.weight"] == "frozen"
    assert sorted(json.loads((out / ".pockc-manifest.json").read_text())["files"]) == [
        "model.safetensors", "plan.json", "report.txt", "train_step.py"]
    rc, _, err = cli(capsys, "compile", task, "--budget", "24KB", "-o", out)        # scores.json again
    assert rc == 0 and (out / "scores.json").exists(), err
    with open(out / "scores.json", "a") as fh:           # edited by the user since: pockc's no longer
        fh.write(" ")
    rc, _, err = cli(capsys, "compile", task, "--update", "head", "-o", out)
    assert rc == 0 and (out / "scores.json").exists() and (out / "notes.txt").read_text() == "mine", err
    assert not [n for n in os.listdir(out) if n.endswith(".pockc-tmp")]


def test_scores_of_another_model_are_refused(task, tmp_path, capsys):
    rc, _, err = cli(capsys, "compile", task, "--budget", "24KB", "-o", tmp_path / "o")
    assert rc == 0, err
    wider = tmp_path / "wider.py"
    wider.write_text((TASK + DATA).replace("nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)",
                                           "nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 3)"))
    rc, _, err = cli(capsys, "compile", wider, "--budget", "24KB", "--scores", tmp_path / "o" / "scores.json",
                     "-o", tmp_path / "o2")
    assert rc == 2 and one_line(err) and "were measured on another model" in err
    assert "'2.weight' is 32x32 there but 48x32 here" in err
    (tmp_path / "empty.json").write_text("")
    rc, _, err = cli(capsys, "compile", task, "--budget", "24KB", "--scores", tmp_path / "empty.json",
                     "-o", tmp_path / "o2")
    assert rc == 2 and one_line(err) and "empty.json is not a scores file written by pockc: the file is empty" in err


def test_argument_errors_through_the_entry_point(tmp_path):
    r = run("compile", EXAMPLE, "--epochs", "-1", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("pockc: error: argument --epochs") and one_line(r.stderr)
    r = run("compile", EXAMPLE, "--update", "channels:0.5", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and one_line(r.stderr) and '{"*": "channels:0.5"}' in r.stderr


def test_a_failed_write_is_one_line_and_leaves_whole_files(task, tmp_path, capsys, monkeypatch):
    from pockc.runtime import fileio
    out = tmp_path / "o"
    rc, _, err = cli(capsys, "compile", task, "--update", "head", "-o", out)
    assert rc == 0, err
    before = (out / "report.txt").read_text()
    real = fileio.atomic_write

    def disk_full(path, data):
        if str(path).endswith("report.txt"):
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)
    monkeypatch.setattr(fileio, "atomic_write", disk_full)
    rc, _, err = cli(capsys, "compile", task, "--update", "last:1", "--steps", "1", "-o", out)
    assert rc == 1 and one_line(err) and "could not write the output files (No space left on device)" in err
    assert (out / "report.txt").read_text() == before
    json.loads((out / "plan.json").read_text())            # whole, parseable
