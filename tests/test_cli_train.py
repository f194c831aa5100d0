"""The command line's weights, checkpoints and resume: `pockc compile --epochs -o OUT`, Ctrl-C,
a kill during a write, `pockc train OUT`."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

import pockc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_FILE = textwrap.dedent("""
    import torch, torch.nn as nn, torch.nn.functional as F
    import pockc

    STEPS = {steps}

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Dropout(0.1), nn.Linear(2048, 10))

    def _batches(n, seed):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(8, 512, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]

    def example_batch():
        return _batches(1, 0)[0]

    def loss_fn(model, x, y):
        return F.cross_entropy(model(x), y)

    def optimizer():
        return pockc.SGD(lr=0.05, momentum=0.9)

    def train_data():
        return _batches(STEPS, 1)

    def val_data():
        return _batches(2, 2)
""")


def _pockc(*args, cwd, check=True, **kw):
    r = subprocess.run([sys.executable, "-m", "pockc", *args], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "PYTHONPATH": ROOT}, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _start(args, cwd):
    # SIGINT back to its default in the child: a background job's ignored SIGINT would be inherited
    return subprocess.Popen([sys.executable, "-m", "pockc", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": ROOT},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _wait_for(path, proc, timeout=300):
    """Wait until ``path`` exists with other content than now (a new checkpoint was committed)."""
    t0 = time.monotonic()
    before = _read(path)
    while _read(path) in (None, before):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {path} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The model file, and the uninterrupted run's result to compare every resumed run with."""
    d = tmp_path_factory.mktemp("train")
    (d / "m.py").write_text(MODEL_FILE.format(steps=100))
    _pockc("compile", "m.py", "--update", "full", "--epochs", "2", "-o", "ref", cwd=d)
    return d


def _same_as_reference(d, out):
    ref = load_file(d / "ref" / "model.safetensors")
    got = load_file(d / out / "model.safetensors")
    assert ref.keys() == got.keys()
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not bad, f"resumed run differs from the uninterrupted one in {bad}"


def test_weights_out_of_the_cli(workdir):
    d = workdir
    sd = load_file(d / "ref" / "model.safetensors")
    m = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                            torch.nn.Linear(2048, 10))
    m.load_state_dict(sd)                           # what the README tells users to do
    step = pockc.load(d / "ref" / "step")
    assert step.step_count == 200
    assert all(torch.equal(step.state_dict()[k], sd[k]) for k in sd)
    manifest = json.loads((d / "ref" / ".pockc-manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]


def test_ctrl_c_checkpoints_and_resume_is_exact(workdir):
    d = workdir
    p = _start(["compile", "m.py", "--update", "full", "--epochs", "2", "--save-every", "1", "-o", "int"], d)
    _wait_for(d / "int" / "step" / "manifest.json", p)      # training has started: 199 steps remain
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "resume with: pockc train int" in err
    stopped = pockc.load(d / "int" / "step")
    assert 0 < stopped.step_count < 200
    r = _pockc("train", "int", cwd=d)
    assert f"resuming the run at step {stopped.step_count + 1} of 200" in r.stdout
    _same_as_reference(d, "int")
    assert pockc.load(d / "int" / "step").step_count == 200
    r = _pockc("train", "int", cwd=d, check=False)           # finished: more needs --epochs
    assert r.returncode == 2 and "--epochs N" in r.stderr
    r = _pockc("train", "int", "--epochs", "1", cwd=d)
    assert "continuing from step 200" in r.stdout
    assert pockc.load(d / "int" / "step").step_count == 300


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(workdir):
    """SIGKILL at several moments of a run that checkpoints every step (each checkpoint writes
    ~12 MB, so most moments fall inside a write): the previous checkpoint always loads, with
    matching hashes, and resuming from it ends where the uninterrupted run does."""
    d = workdir
    args = ["compile", "m.py", "--update", "full", "--epochs", "2", "--save-every", "1", "-o", "kill"]
    for delay in (0.0, 0.05, 0.13):
        p = _start(args if delay == 0.0 else ["train", "kill", "--save-every", "1"], d)
        _wait_for(d / "kill" / "step" / "manifest.json", p)
        time.sleep(delay)
        p.kill()
        p.communicate()
        step = pockc.load(d / "kill" / "step", verify=True)       # every file present and as hashed
        load_file(d / "kill" / "model.safetensors")
        assert 0 < step.step_count <= 200
    _pockc("train", "kill", cwd=d)
    _same_as_reference(d, "kill")


def test_train_errors(workdir, tmp_path):
    d = workdir
    r = _pockc("train", str(tmp_path), cwd=d, check=False)
    assert r.returncode == 2 and "no saved step there" in r.stderr and "Traceback" not in r.stderr
    r = _pockc("train", cwd=d, check=False)
    assert r.returncode == 2 and "pockc train OUT" in r.stderr
