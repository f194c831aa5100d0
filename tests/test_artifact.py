"""Saved steps (runtime/artifact.py): save, load, resume bit for bit, without the compiler."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.runtime.program import graph_from_json, graph_to_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"differ after resume: {bad[:5]}"


def _resume_equals_uninterrupted(make, batches, tmp_path, n=3, compile_fn=None):
    """``n`` steps, save, load, ``n`` more == ``2n`` uninterrupted steps, bit for bit."""
    torch.manual_seed(7)
    m1, step1 = make()
    for i in range(2 * n):
        step1(*batches[i % len(batches)])
    torch.manual_seed(7)
    m2, step2 = make()
    for i in range(n):
        step2(*batches[i % len(batches)])
    step2.save(tmp_path / "step")
    torch.manual_seed(12345)            # the saved generator state is restored by load
    loaded = pockc.load(tmp_path / "step")
    assert loaded.step_count == n
    for i in range(n, 2 * n):
        loaded(*batches[i % len(batches)])
    _states_equal(m1.state_dict(), loaded.state_dict())
    return loaded


def _compiled(ex, update, opt):
    def make():
        m = copy.deepcopy(ex.model)
        return m, pockc.compile(m, ex.loss_fn, ex.example_batch, update=update, optimizer=copy.deepcopy(opt))
    return make


def _batches(ex, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        b = []
        for t in ex.example_batch:
            if t.is_floating_point():
                b.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
            else:
                b.append(t[torch.randperm(t.shape[0], generator=g)] if t.dim() else t)
        out.append(tuple(b))
    return out


@pytest.mark.parametrize("case", ["sgd_momentum_bn", "adamw_full", "channel_sparse_adamw", "dropout_rows"])
def test_resume_is_bit_identical(case, tmp_path):
    if case == "sgd_momentum_bn":            # BN in train mode: running statistics travel too
        ex, update, opt = zoo.small_cnn(), "last:2", pockc.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)
    elif case == "adamw_full":
        ex, update, opt = zoo.mlp(), "full", pockc.AdamW(lr=1e-3, weight_decay=0.01)
    elif case == "channel_sparse_adamw":
        ex, update, opt = zoo.mobilenet_v2(), {"*": "channels:0.5"}, pockc.AdamW(lr=1e-3)
    else:                                      # dropout: the generator's state is saved and restored
        ex, update, opt = zoo.mobilenet_v2(), {"classifier.*": "channels:0.25", "features.1[5-7].*": "full"}, pockc.SGD(lr=0.05)
    assert any(isinstance(m, nn.BatchNorm2d) and m.training for m in ex.model.modules()) or case == "adamw_full"
    loaded = _resume_equals_uninterrupted(_compiled(ex, update, opt), _batches(ex), tmp_path)
    assert isinstance(loaded, pockc.TrainStep) and loaded.source == str(tmp_path / "step")
    if case == "dropout_rows":
        assert loaded.saved_rng_state is not None


def test_lora_step_resumes(tmp_path):
    ex = zoo.llama(layers=2)
    lora = pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    def make():
        m = copy.deepcopy(ex.model)
        return m, pockc.finetune(m, ex.loss_fn, ex.example_batch, lora=lora, layers="last:1",
                                 optimizer=pockc.AdamW(lr=1e-2))
    loaded = _resume_equals_uninterrupted(make, [ex.example_batch], tmp_path)
    assert any("lora_A" in k for k in loaded.state_dict())


def test_tied_weights_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)))

    torch.manual_seed(0)
    model = Tied()
    x = torch.randint(0, 20, (4, 5))

    def loss_fn(m, x):
        return F.cross_entropy(m(x).flatten(0, 1), x.flatten())

    def make():
        m = copy.deepcopy(model)
        return m, pockc.compile(m, loss_fn, (x,), update="full", optimizer=pockc.AdamW(lr=1e-2))
    loaded = _resume_equals_uninterrupted(make, [(x,)], tmp_path)
    assert loaded.model.emb.weight is loaded.model.head.weight
    sd = loaded.state_dict()
    assert torch.equal(sd["emb.weight"], sd["head.weight"])
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(sd)          # the user's class takes the loaded state dict as it is


def test_artifact_files_and_plans(tmp_path):
    ex = zoo.small_cnn()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:2", optimizer=pockc.SGD(lr=0.1))
    step(*ex.example_batch)
    step.save(tmp_path / "s")
    names = sorted(os.listdir(tmp_path / "s"))
    kinds = sorted(n.split("-")[0] for n in names if "-" in n)
    assert kinds == ["plan", "program", "state", "weights"] and "manifest.json" in names and "program.py" in names
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["pockc"] == pockc.__version__ and m["torch"] == torch.__version__
    assert m["step"]["step_count"] == 1 and len(m["content_hash"]) == 64
    loaded = pockc.load(tmp_path / "s")
    assert loaded.update_plan.trainable_names() == step.update_plan.trainable_names()
    assert loaded.memory.peak_bytes == step.memory.peak_bytes
    assert loaded.update_plan.summary() == step.update_plan.summary()
    assert loaded.graph.code == step.graph.code
    # the frozen weights are not in the trained file, and not rewritten by a later save
    before = {n for n in names if n.startswith("weights-")}
    step(*ex.example_batch)
    step.save(tmp_path / "s")
    after = sorted(os.listdir(tmp_path / "s"))
    assert {n for n in after if n.startswith("weights-")} == before
    assert len([n for n in after if n.startswith("state-")]) == 1      # the old one is removed
    # a loaded step saves again, and that loads
    loaded(*ex.example_batch)
    loaded.save(tmp_path / "t")
    again = pockc.load(tmp_path / "t")
    assert again.step_count == 2
    _states_equal(again.state_dict(), loaded.state_dict())


def test_load_into_users_model(tmp_path):
    ex = zoo.small_cnn()
    model = copy.deepcopy(ex.model)
    step = pockc.compile(model, ex.loss_fn, ex.example_batch, update="last:2", optimizer=pockc.SGD(lr=0.1))
    step(*ex.example_batch)
    step.save(tmp_path / "s")
    mine = copy.deepcopy(ex.model).eval()
    loaded = pockc.load(tmp_path / "s", model=mine)
    assert loaded.model is mine and mine.training          # put back in the mode it was compiled for
    _states_equal(mine.state_dict(), model.state_dict())
    step(*ex.example_batch)
    loaded(*ex.example_batch)
    _states_equal(mine.state_dict(), model.state_dict())
    other = zoo.mlp().model
    with pytest.raises(pockc.ArtifactError, match="model= does not have"):
        pockc.load(tmp_path / "s", model=other)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:1", optimizer=pockc.SGD(lr=0.1))
    d = tmp_path_factory.mktemp("a") / "step"
    step.save(d)
    return d, ex


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_errors_name_the_file(saved, tmp_path):
    d, ex = saved
    # a truncated tensor file
    t = _copy(d, tmp_path / "trunc")
    state = next(n for n in os.listdir(t) if n.startswith("state-"))
    data = (t / state).read_bytes()
    (t / state).write_bytes(data[: len(data) // 2])
    with pytest.raises(pockc.ArtifactError, match=rf"{state}: truncated"):
        pockc.load(t)
    # a missing one
    t = _copy(d, tmp_path / "missing")
    weights = next(n for n in os.listdir(t) if n.startswith("weights-"))
    os.unlink(t / weights)
    with pytest.raises(pockc.ArtifactError, match=rf"{weights}: missing"):
        pockc.load(t)
    # altered content of the same size
    t = _copy(d, tmp_path / "altered")
    data = bytearray((t / state).read_bytes())
    data[-1] ^= 1
    (t / state).write_bytes(bytes(data))
    with pytest.raises(pockc.ArtifactError, match="sha256"):
        pockc.load(t)
    # another pockc or torch version
    for key, value, what in (("pockc", "0.0.1", "pockc 0.0.1"), ("torch", "1.13.0", "torch 1.13.0")):
        t = _copy(d, tmp_path / f"v{key}")
        m = json.loads((t / "manifest.json").read_text())
        m[key] = value
        (t / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(pockc.ArtifactError, match=rf"manifest.json: saved (by|with) {what}"):
            pockc.load(t)
        pockc.load(t, strict_versions=False)          # the escape hatch
    with pytest.raises(pockc.ArtifactError, match="manifest.json: missing"):
        pockc.load(tmp_path)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "manifest.json").write_text("{not json")
    with pytest.raises(pockc.ArtifactError, match="manifest.json: unreadable"):
        pockc.load(tmp_path / "garbage")


def test_batch_of_another_signature(saved):
    d, ex = saved
    step = pockc.load(d)
    x, y = ex.example_batch
    with pytest.raises(pockc.BatchError, match=rf"{d}: .*batch\[0\] is a float32 tensor of shape \[3, 32\]"):
        step(x[:3], y[:3])
    with pytest.raises(pockc.BatchError, match=rf"{d}: batch has 1 elements"):
        step(x)
    with pytest.raises(pockc.BatchError, match=rf"{d}: batch\[0\] is a float64 tensor"):
        step(x.double(), y)
    step(x, y)                                           # the saved signature runs


def test_save_refuses_a_foreign_directory(tmp_path):
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:1")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(pockc.ArtifactError, match="not a saved pockc step"):
        step.save(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies before its manifest is written leaves the previous checkpoint loadable."""
    import pockc.runtime.artifact as art
    ex = zoo.small_cnn()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:2", optimizer=pockc.SGD(lr=0.1))
    step(*ex.example_batch)
    step.save(tmp_path / "s")
    first = copy.deepcopy(step.state_dict())
    step(*ex.example_batch)
    real = art.atomic_write

    def dying(path, data):
        if str(path).endswith("manifest.json"):
            raise KeyboardInterrupt            # killed between the data files and the commit
        return real(path, data)
    monkeypatch.setattr(art, "atomic_write", dying)
    with pytest.raises(KeyboardInterrupt):
        step.save(tmp_path / "s")
    monkeypatch.setattr(art, "atomic_write", real)
    loaded = pockc.load(tmp_path / "s")
    assert loaded.step_count == 1
    _states_equal(loaded.state_dict(), first)


def test_program_json_round_trip():
    ex = zoo.mobilenet_v2()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:4", optimizer=pockc.AdamW(lr=1e-3))
    doc, consts = graph_to_json(step.graph)
    gm = graph_from_json(json.loads(json.dumps(doc)), consts)
    assert gm.code == step.graph.code
    assert [n.meta.get("pockc.role") for n in gm.graph.nodes] == [n.meta.get("pockc.role") for n in step.graph.graph.nodes]


def test_loaded_step_runs_without_the_compiler(tmp_path):
    """In a fresh process where importing pockc.passes, pockc.api, pockc.trace (and every other
    front-end module) raises, the saved step loads and trains to the same values."""
    ex = zoo.small_cnn()
    model = copy.deepcopy(ex.model)
    step = pockc.compile(model, ex.loss_fn, ex.example_batch, update="last:2",
                         optimizer=pockc.SGD(lr=0.1, momentum=0.9))
    step(*ex.example_batch)
    step.save(tmp_path / "s")
    torch.save(ex.example_batch, tmp_path / "batch.pt")
    for _ in range(2):
        step(*ex.example_batch)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith("pockc.") and not name.startswith("pockc.runtime") and name != "pockc.errors":
                    raise ImportError("the compiler is not available here: " + name)
                return None
        sys.meta_path.insert(0, Block())
        import torch, pockc
        from safetensors.torch import load_file
        for mod in ("pockc.passes", "pockc.api", "pockc.trace"):
            try:
                __import__(mod)
            except ImportError:
                pass
            else:
                raise SystemExit(mod + " imported")
        step = pockc.load({str(tmp_path / "s")!r})
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        for _ in range(2):
            step(*batch)
        want = load_file({str(tmp_path / "expected.safetensors")!r})
        got = step.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), "differs"
        bad = [m for m in sys.modules if m.startswith("pockc.") and not m.startswith("pockc.runtime")
               and m != "pockc.errors"]
        assert not bad, bad
        print("ok", step.step_count)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", "3"]


def test_paged_and_recomputed_step_resumes(tmp_path):
    """A step whose program pages activations out and back (pockc.runtime.paging calls) and draws
    dropout masks (bert) saves and resumes exactly."""
    from tests.test_paging import FAST_PAGE, PLAIN as OPT, _p0
    ex = zoo.bert()
    p0, persist = _p0(ex, OPT)
    budget = int(persist + 0.75 * (p0 - persist))

    def make():
        m = copy.deepcopy(ex.model)
        return m, pockc.compile(m, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(**OPT),
                                budget=budget, device_profile=FAST_PAGE)
    _, probe = make()
    assert probe.remat is not None and probe.remat.paged
    loaded = _resume_equals_uninterrupted(make, [ex.example_batch], tmp_path)
    assert any(getattr(n.target, "__module__", "") == "pockc.runtime.paging" for n in loaded.graph.graph.nodes)


def test_mcu_example_resumes(tmp_path):
    from pockc.cli import load_model_file
    mod = load_model_file(os.path.join(ROOT, "examples", "mcu_cnn.py"))
    model, batch = mod.model(), tuple(mod.example_batch())

    def make():
        m = copy.deepcopy(model)
        return m, pockc.compile(m, mod.loss_fn, batch, update="last:3", optimizer=pockc.SGD(lr=0.05, momentum=0.9))
    _resume_equals_uninterrupted(make, [batch], tmp_path)


def test_save_takes_the_program_of_the_current_modes_and_settings(tmp_path):
    """After model.eval() (a recompiled step), the saved step is the eval program with eval modes;
    with settings the step has no program for yet, save says so."""
    ex = zoo.small_cnn()
    model = copy.deepcopy(ex.model)
    step = pockc.compile(model, ex.loss_fn, ex.example_batch, update="last:2", optimizer=pockc.SGD(lr=0.1))
    step(*ex.example_batch)
    model.eval()
    with pytest.warns(UserWarning, match="train/eval mode"):
        step(*ex.example_batch)
    step.save(tmp_path / "s")
    loaded = pockc.load(tmp_path / "s")
    assert not any(m.training for m in loaded.model.modules())
    step(*ex.example_batch)
    loaded(*ex.example_batch)
    _states_equal(loaded.state_dict(), model.state_dict())
    step.optimizer.momentum = 0.9
    with pytest.raises(pockc.ArtifactError, match="run one step"):
        step.save(tmp_path / "t")
