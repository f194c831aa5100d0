"""AOTInductor export (runtime/aoti.py) and the C++ runner (runtime/cpp/): a packaged step trains
like the aten step and like eager autograd + torch.optim, from Python and from C++.

Exporting a tiny model costs ~20 s of C++ compilation, so each package is built once per test
session and shared by every test and every xdist worker (a file lock in the session's shared
temporary folder); each test rebuilds the aten reference step it compares with (a second), from
the same seed.
"""
import copy
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import pockc
from pockc import zoo
from pockc.runtime import aoti
from pockc.runtime.errors import ArtifactError, BatchError, StepError
from tests.oracle import eager_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (update policy, optimizer, steps the aten step runs before it is exported)
CASES = {
    "sgd": ("last:2", lambda: pockc.SGD(lr=0.1, momentum=0.9), 0),
    # exported after one step: the package starts at step_count 1, so the bias corrections it
    # needs differ from those at export time from its very first call
    "adamw": ("last:2", lambda: pockc.AdamW(lr=1e-2, weight_decay=0.05), 1),
    # channel-sparse: a row range (slice) and a row list (index); dampening adds a scalar
    "sparse": ({"features.3.0.weight": "channels:0.25", "features.2.0.weight": "channels:[1,4,9,20]",
                "fc.*": "full"}, lambda: pockc.SGD(lr=0.1, momentum=0.9, dampening=0.1), 0),
}


def _example():
    return zoo.small_cnn(batch=4, image=16)   # BatchNorm in train mode


def _batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def _aten_step(case):
    """(model, its pristine copy, the aten step after the case's warm-up steps)."""
    update, opt, warm = CASES[case]
    ex = _example()
    original = copy.deepcopy(ex.model)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update=update, optimizer=opt())
    for b in _batches(warm, seed=99):
        step(*b)
    return ex, original, step


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder every xdist worker of this session sees (the session's base temp folder)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _built_once(shared_dir, name, build):
    from filelock import FileLock
    target = shared_dir / name
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            build(target)
    return str(target)


@pytest.fixture(scope="session")
def package(shared_dir):
    """case -> path of its exported package (built on first use, once per session)."""
    def get(case):
        return _built_once(shared_dir, f"aoti_{case}.pt2", lambda p: _aten_step(case)[2].export(p, target="aoti"))
    return get


@pytest.fixture(scope="session")
def runner(shared_dir):
    if aoti.find_compiler() is None:
        pytest.skip("no C++ compiler found (set CXX or install g++/clang++): the C++ runner cannot be built")
    return _built_once(shared_dir, "runner_build/" + aoti.RUNNER_NAME,
                       lambda p: aoti.build_runner(os.path.dirname(p)))


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_same_training(loaded, ex, original, step, atol=1e-6):
    """``loaded`` (an AotiStep) holds what the aten ``step`` trained into ``ex.model``."""
    sd, ref = loaded.state_dict(), ex.model.state_dict()
    assert list(sd) == list(ref)
    trained = set(step.update_plan.trainable_names())
    frozen = dict(original.named_parameters())
    for name, t in sd.items():
        if name in frozen and name not in trained:
            assert torch.equal(t, frozen[name]), f"frozen {name} changed"
        elif t.dtype.is_floating_point:
            _close(t, ref[name], name, atol=atol)
        else:
            assert torch.equal(t, ref[name]), f"{name}: {t} != {ref[name]}"   # num_batches_tracked
    for key, t in step.state.items():
        _close(loaded.state[key], t, f"optimizer state {key}", atol=atol)


# -- numerics ------------------------------------------------------------------------------
def test_sgd_bn_train_matches_aten_and_eager(package):
    loaded = pockc.load(package("sgd"))
    assert isinstance(loaded, aoti.AotiStep) and loaded.step_count == 0
    ex, original, step = _aten_step("sgd")
    eager_model = copy.deepcopy(original)
    batches = _batches(5)
    for b in batches:
        _close(loaded(*b), step(*b), "loss")
    assert loaded.step_count == step.step_count == 5
    _assert_same_training(loaded, ex, original, step)
    assert int(loaded.state_dict()["features.0.1.num_batches_tracked"]) == 5
    # and both where eager autograd + torch.optim leaves the model
    eager_steps(eager_model, ex.loss_fn, batches, step.update_plan, CASES["sgd"][1]())
    ref = eager_model.state_dict()
    for name, t in loaded.state_dict().items():
        if t.dtype.is_floating_point:
            _close(t, ref[name], f"eager {name}")


def test_adamw_from_step_one_matches_aten_and_eager(package):
    loaded = pockc.load(package("adamw"))
    assert loaded.step_count == 1 and type(loaded.optimizer).__name__ == "AdamW"
    ex, original, step = _aten_step("adamw")
    batches = _batches(4)
    for b in batches:
        _close(loaded(*b), step(*b), "loss")
    _assert_same_training(loaded, ex, original, step, atol=1e-5)
    eager_model = copy.deepcopy(original)
    eager_steps(eager_model, ex.loss_fn, _batches(1, seed=99) + batches, step.update_plan, CASES["adamw"][1]())
    ref = eager_model.state_dict()
    for name in step.update_plan.trainable_names():
        _close(loaded.state_dict()[name], ref[name], f"eager {name}", atol=1e-5)


def test_channel_sparse_rows(package):
    loaded = pockc.load(package("sparse"))
    ex, original, step = _aten_step("sparse")
    sels = dict(loaded.layout.grads)
    assert sels["features.3.0.weight"][0] == "slice" and sels["features.2.0.weight"][0] == "index"
    for key, t in loaded.state.items():      # rows-shaped optimizer state
        assert t.shape == step.state[key].shape
    for b in _batches(4):
        _close(loaded(*b), step(*b), "loss")
    _assert_same_training(loaded, ex, original, step)
    sd, orig = loaded.state_dict(), original.state_dict()
    for name, sel in sels.items():
        if sel is None:
            continue
        rows = list(range(sel[1], sel[2])) if sel[0] == "slice" else list(sel[1])
        keep = torch.ones(sd[name].shape[0], dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(sd[name][keep], orig[name][keep]), f"unselected rows of {name} changed"
        assert not torch.equal(sd[name][~keep], orig[name][~keep]), f"selected rows of {name} did not train"
    trained = loaded.trainable_parameters()
    assert trained["features.3.0.weight"].shape[0] == sels["features.3.0.weight"][2]


def test_lr_change_between_steps_is_honoured(package):
    loaded = pockc.load(package("sgd"))
    ex, original, step = _aten_step("sgd")
    for i, b in enumerate(_batches(4)):
        lr = [0.1, 0.02, 0.3, 0.0][i]
        loaded.optimizer.lr = step.optimizer.lr = lr
        _close(loaded(*b), step(*b), f"loss at lr {lr}")
    _assert_same_training(loaded, ex, original, step)
    # lr 0 on the last step: the momentum buffer moved, the weights did not
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    loaded(*_batches(1, seed=5)[0])
    assert torch.equal(before["fc.weight"], loaded.state_dict()["fc.weight"])


def test_package_contents_and_state_dict(package):
    path = package("sgd")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        man = json.loads(z.read(next(n for n in names if n.endswith(aoti.MANIFEST_RECORD))))
    assert any("/data/aotinductor/model/" in n and n.endswith(".so") for n in names)
    assert man["pockc"] == pockc.runtime.__version__ and man["torch"] == torch.__version__
    assert man["optimizer"]["type"] == "SGD" and man["scalars"] == ["neg_lr"]
    trained = [t["name"] for t in man["tensors"] if t["trained"]]
    assert trained == list(man["layout"]["params"]) and trained
    ex = _example()
    assert [k for k, _, _ in man["state_dict"]] == list(ex.model.state_dict())
    loaded = pockc.load(path)
    meta = loaded._compiled.get_metadata()
    assert meta["pockc.optimizer"] == "SGD" and meta["pockc.scalars"] == "neg_lr"
    # the scalars are inputs of the compiled step, not constants
    assert set(loaded._compiled.get_constant_fqns()) == {t["constant"] for t in man["tensors"]} | set(
        man["graph_constants"])


# -- user errors: one line, naming the file ------------------------------------------------
def _one_line(exc_info, path):
    msg = str(exc_info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert os.fspath(path) in msg, msg
    return msg


def test_wrong_batch_is_one_line_batch_error(package):
    path = package("sgd")
    loaded = pockc.load(path)
    x, y = _batches(1)[0]
    for bad, words in [((x[:2], y[:2]), "shape"), ((x.double(), y), "float64"), ((x,), "elements"),
                       ((x[0], y), "rank")]:
        with pytest.raises(BatchError) as e:
            loaded(*bad)
        assert words in _one_line(e, path)
    assert loaded.step_count == 0     # nothing ran


def test_optimizer_change_other_than_lr_is_step_error(package):
    path = package("sgd")
    loaded = pockc.load(path)
    loaded.optimizer.momentum = 0.5
    with pytest.raises(StepError) as e:
        loaded(*_batches(1)[0])
    assert "momentum" in _one_line(e, path)
    loaded.optimizer = pockc.AdamW()
    with pytest.raises(StepError) as e:
        loaded(*_batches(1)[0])
    assert "AdamW" in _one_line(e, path)


def test_truncated_missing_and_foreign_files(package, tmp_path):
    data = open(package("sgd"), "rb").read()
    cases = {"truncated.pt2": data[: len(data) // 2], "empty.pt2": b"",
             "garbage.pt2": b"not a zip" * 100}
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("archive/data/x", b"1")
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for p in [*(tmp_path / n for n in cases), foreign, tmp_path / "missing.pt2"]:
        with pytest.raises((ValueError, OSError)) as e:
            pockc.load(p) if p.exists() else aoti.load_aoti(p)
        _one_line(e, p)
    # a damaged tensor record (its CRC no longer matches)
    bad = bytearray(data)
    with zipfile.ZipFile(package("sgd")) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(aoti.STATE_RECORD))
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    bad[at] ^= 0xFF
    (tmp_path / "damaged.pt2").write_bytes(bytes(bad))
    with pytest.raises(ArtifactError) as e:
        aoti.load_aoti(tmp_path / "damaged.pt2")
    _one_line(e, tmp_path / "damaged.pt2")


def test_export_is_atomic_and_checks_the_name(tmp_path, monkeypatch):
    ex, _, step = _aten_step("sgd")
    with pytest.raises(ValueError, match=r"\.pt2"):
        aoti.export_aoti(step, tmp_path / "step.zip")
    target = tmp_path / "step.pt2"
    target.write_bytes(b"previous package")

    def boom(*a, **k):
        raise RuntimeError("compiler killed")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", boom)
    with pytest.raises(RuntimeError, match="compiler killed"):
        aoti.export_aoti(step, target)
    assert target.read_bytes() == b"previous package"
    assert os.listdir(tmp_path) == ["step.pt2"]


def test_runtime_module_needs_no_front_end():
    code = ("import sys, pockc.runtime.aoti; bad = [m for m in sys.modules if m.startswith("
            "('pockc.api', 'pockc.passes', 'pockc.trace', 'pockc.plan', 'pockc.capture'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# -- the C++ runner ------------------------------------------------------------------------
def _run_cpp(runner, path, batches, tmp_path, *extra):
    aoti.write_batches(tmp_path / "batches.pt", batches)
    env = dict(os.environ, OMP_NUM_THREADS="1")   # the same threads as this test process
    r = subprocess.run([runner, path, str(tmp_path / "batches.pt"), str(tmp_path / "out.pt"), "--quiet", *extra],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return aoti.read_runner_output(tmp_path / "out.pt")


@pytest.mark.parametrize("case", ["sgd", "adamw"])
def test_cpp_runner_matches_python(runner, package, tmp_path, case):
    path = package(case)
    loaded = pockc.load(path)
    batches = _batches(3)
    lrs = [loaded.optimizer.lr] * 3
    extra = ()
    if case == "sgd":          # --lr: the runner's learning rate for every step
        lrs, extra = [0.05] * 3, ("--lr", "0.05")
    losses = []
    for lr, b in zip(lrs, batches):
        loaded.optimizer.lr = lr
        losses.append(float(loaded(*b)))
    out = _run_cpp(runner, path, batches, tmp_path, *extra)
    assert out["step_count"] == loaded.step_count
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    sd = loaded.state_dict()
    keys = set(out["tensors"])
    for row in loaded.manifest["tensors"]:
        name, role = row["name"], row["role"]
        if role == "frozen":
            continue
        key = {"param": name, "buffer": f"buffer/{name}", "state": f"optimizer/{name}/{row['state']}"}[role]
        keys.discard(key)
        mine = loaded.state[(name, row["state"])] if role == "state" else sd[name]
        theirs = out["tensors"][key]
        if mine.dtype.is_floating_point:
            _close(theirs, mine, f"C++ {key}")
        else:
            assert torch.equal(theirs, mine), key
    assert not keys, f"unexpected runner outputs {keys}"


def test_cpp_runner_errors_are_one_line(runner, tmp_path):
    r = subprocess.run([runner, str(tmp_path / "missing.pt2"), "b.pt", "o.pt"], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([runner], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_build_runner_without_compiler_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(aoti, "find_compiler", lambda: None)
    with pytest.raises(aoti.RunnerBuildError, match="no C\\+\\+ compiler"):
        aoti.build_runner(tmp_path)


def test_cli_target_aoti_writes_a_package_pockc_loads(tmp_path):
    """`pockc compile ... --target aoti` writes -o/train_step.pt2 beside the saved step; both load
    and train from the same values."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "m.py").write_text(
        "import torch, torch.nn as nn, torch.nn.functional as F\n"
        "def model():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))\n"
        "def example_batch():\n    g = torch.Generator().manual_seed(1)\n"
        "    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)\n"
        "def loss_fn(model, x, y):\n    return F.cross_entropy(model(x), y)\n")
    r = subprocess.run([sys.executable, "-m", "pockc", "compile", "m.py", "--update", "last:1", "--steps", "2",
                        "--target", "aoti", "-o", "out"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train_step.pt2 (AOTInductor package)" in r.stdout
    pkg = pockc.load(str(tmp_path / "out" / "train_step.pt2"))
    step = pockc.load(tmp_path / "out" / "step")
    assert pkg.step_count == step.step_count == 2
    ns = {}
    exec((tmp_path / "m.py").read_text(), ns)
    batch = ns["example_batch"]()
    for _ in range(3):
        a, b = float(pkg(*batch)), float(step(*batch))
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    got, want = pkg.state_dict(), step.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
