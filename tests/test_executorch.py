"""ExecuTorch export (runtime/executorch.py): a .pte step trains like the aten step and like eager
autograd + torch.optim, through ExecuTorch's own runtime; its forward method sees the trained
weights; its planned arena is read back from the file and bounded by a budget.

Lowering a graph through ExecuTorch costs seconds per hundred nodes on this CPU, so the models
are small: an MLP, a CNN with train-mode batch norm, and a MobileNetV2-style net of three inverted
residual blocks (the real blocks of pockc.zoo, depthwise convolutions, ReLU6, residuals)."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.runtime.errors import ArenaOverBudget, ArtifactError, BatchError, StepError
from tests import reference
from tests.oracle import eager_steps

et = pytest.importorskip("pockc.runtime.executorch")
if not et.available():
    pytest.skip("executorch is not installed (pip install --no-deps executorch==1.5.1; see the README)",
                allow_module_level=True)


class SmallMobileNet(nn.Module):
    """A stem, three of zoo's inverted residual blocks (one with a residual) and a head."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(zoo.conv_bn(3, 8, 3, 2, act=nn.ReLU6),
                                      zoo.InvertedResidual(8, 8, 1, 1),
                                      zoo.InvertedResidual(8, 16, 2, 4),
                                      zoo.InvertedResidual(16, 16, 1, 4))
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _ce(model, x, y):
    return F.cross_entropy(model(x), y)


def _mobilenet():
    torch.manual_seed(0)
    return zoo.Example("small_mobilenet", SmallMobileNet(), (torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))),
                       _ce)


CASES = {   # name -> (example, update, optimizer, export with XNNPACK)
    "mlp_sgd": (lambda: zoo.mlp(batch=8, depth=3), "full", lambda: pockc.SGD(lr=0.05, momentum=0.9,
                                                                             weight_decay=1e-3), False),
    "cnn_bn_adamw": (lambda: zoo.small_cnn(batch=4, image=16), "last:2",
                     lambda: pockc.AdamW(lr=1e-2, weight_decay=0.05), False),
    "mobilenet_last": (_mobilenet, "last:3", lambda: pockc.SGD(lr=0.05, momentum=0.9), False),
    "mobilenet_channels": (_mobilenet, {"features.3.conv.0.0.weight": "channels:0.25", "classifier.*": "full"},
                           lambda: pockc.AdamW(lr=1e-2), False),
}
XNNPACK_CASE = (lambda: zoo.small_cnn(batch=4, image=16), "last:3", lambda: pockc.SGD(lr=0.05, momentum=0.9), True)


def _close(a, b, what, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _setup(case, tmp_path, **export_kw):
    make, update, opt, xnnpack = XNNPACK_CASE if case == "xnnpack" else CASES[case]
    ex = make()
    original = copy.deepcopy(ex.model)
    m_aten, m_et = copy.deepcopy(original), copy.deepcopy(original)
    aten = pockc.compile(m_aten, ex.loss_fn, ex.example_batch, update=update, optimizer=opt())
    step = pockc.compile(m_et, ex.loss_fn, ex.example_batch, update=update, optimizer=opt())
    path = step.export(str(tmp_path / f"{case}.pte"), target="executorch", xnnpack=xnnpack, **export_kw)
    return ex, original, aten, path


@pytest.mark.parametrize("case", list(CASES))
def test_pte_steps_match_aten_and_eager(case, tmp_path):
    ex, original, aten, path = _setup(case, tmp_path)
    loaded = pockc.load(path)
    assert isinstance(loaded, et.ExecutorchStep) and loaded.step_count == 0
    batches = reference.varied_batches(ex.example_batch, 10, seed=4)
    for i, b in enumerate(batches):
        _close(loaded(*b), aten(*b), f"loss at step {i}")
    assert loaded.step_count == 10
    m_aten = aten.model
    params, buffers = dict(m_aten.named_parameters()), dict(m_aten.named_buffers())
    for name, t in loaded.named_tensors("param").items():       # trained weights, read back from the program
        _close(t, params[name], f"param {name}")
    for name, t in loaded.named_tensors("buffer").items():      # batch-norm statistics
        if t.dtype.is_floating_point:
            _close(t, buffers[name], f"buffer {name}")
        else:
            assert torch.equal(t, buffers[name]), name           # num_batches_tracked
    for key, t in loaded.state.items():
        _close(t, aten.state[key], f"optimizer state {key}")
    # eager autograd + torch.optim from the same start
    m_e = copy.deepcopy(original)
    eager_steps(m_e, ex.loss_fn, batches, aten.update_plan, CASES[case][2]())
    eager = dict(m_e.named_parameters())
    for name, t in loaded.named_tensors("param").items():
        _close(t, eager[name], f"eager {name}", rtol=1e-4)
    # predict: the model in eval mode over the weights the program trained
    x = batches[-1][0]
    m_aten.eval()
    with torch.no_grad():
        want = m_aten(x)
    _close(loaded.predict(x), want, "predict")


def test_xnnpack_delegates_frozen_layers_and_trains(tmp_path):
    """XNNPACK runs the frozen layers' work; the trained layers and the backward stay on portable
    kernels. XNNPACK's float arithmetic differs from ATen's: losses agree to 1e-4 relative here."""
    ex, original, aten, path = _setup("xnnpack", tmp_path)
    rep = et.program_report(path)["methods"]["train_step"]
    assert rep["delegates"] == ["XnnpackBackend"]
    loaded = pockc.load(path)
    for i, b in enumerate(reference.varied_batches(ex.example_batch, 4, seed=4)):
        _close(loaded(*b), aten(*b), f"loss at step {i}", rtol=1e-3, atol=1e-4)


def test_state_persists_in_the_program_and_the_file_restarts(tmp_path):
    ex, original, aten, path = _setup("cnn_bn_adamw", tmp_path)
    first = pockc.load(path)
    b = ex.example_batch
    l0 = first(*b)
    x = b[0]
    before = pockc.load(path).predict(x)          # a fresh load holds the exported weights
    after = first.predict(x)
    assert not torch.allclose(before, after)      # the first program's forward sees its own training
    l1 = first(*b)
    assert float(l1) < float(l0)                  # same batch again: the update took
    again = pockc.load(path)
    _close(again(*b), l0, "a new load starts from the exported state")


def test_exported_after_steps_continues(tmp_path):
    """AdamW's bias corrections depend on the step count: a program exported after 3 steps
    continues at step 3."""
    make, update, opt, _ = CASES["cnn_bn_adamw"]
    ex = make()
    m_a, m_b = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    a = pockc.compile(m_a, ex.loss_fn, ex.example_batch, update=update, optimizer=opt())
    s = pockc.compile(m_b, ex.loss_fn, ex.example_batch, update=update, optimizer=opt())
    batches = reference.varied_batches(ex.example_batch, 6, seed=1)
    for bt in batches[:3]:
        a(*bt)
        s(*bt)
    loaded = pockc.load(s.export(str(tmp_path / "s3.pte"), target="executorch", predict=False))
    assert loaded.step_count == 3
    for bt in batches[3:]:
        _close(loaded(*bt), a(*bt), "loss")
    for name, t in loaded.named_tensors("param").items():
        _close(t, dict(m_a.named_parameters())[name], name)


# -- memory ---------------------------------------------------------------------------------
def _train_specs(path):
    rep = et.program_report(path)
    return rep["methods"]["train_step"]


def test_pockc_planning_beats_greedy_and_is_verified(tmp_path):
    """On full SGD-momentum training of an MLP, pockc's planning (write-backs moved early, weight
    transposes made at their uses, the smaller of pockc's and ExecuTorch's layouts) plans a
    train_step arena at least one weight matrix smaller than ExecuTorch's greedy planner on its
    own graph; ExecuTorch's own verifier finds no two live tensors overlapping in pockc's layout;
    the report is the program's own non_const_buffer_sizes."""
    from executorch.exir.tensor import TensorSpec
    ex = zoo.mlp(batch=8, d_in=64, hidden=256, depth=3)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full",
                         optimizer=pockc.SGD(lr=0.05, momentum=0.9))
    sizes = {}
    for mp in ("greedy", "pockc"):
        p = step.export(str(tmp_path / f"{mp}.pte"), target="executorch", memory_planning=mp, predict=False)
        sizes[mp] = _train_specs(p)
        assert sizes[mp]["buffer_sizes"][1:] == [sizes[mp]["activations"], sizes[mp]["state"]]
    assert sizes["pockc"]["activations"] + 256 * 256 * 4 <= sizes["greedy"]["activations"], sizes
    assert sizes["pockc"]["state"] == sizes["greedy"]["state"]
    # the planner's result, checked by ExecuTorch's verifier on the lowered graph
    from executorch.exir import to_edge, ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    class M(nn.Module):
        def forward(self, x):
            a = torch.relu(x) * 2
            b = a + 1
            c = torch.sin(b) + a
            return (c * b).sum(0)
    edge = to_edge(torch.export.export(M(), (torch.randn(64, 32),), strict=False))
    prog = edge.to_executorch(ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(memory_planning_algo=et._pockc_layout_sizes)))
    gm = prog.exported_program().graph_module
    specs = {id(n.meta["spec"]): n.meta["spec"] for n in gm.graph.nodes
             if n.op != "output" and isinstance(n.meta.get("spec"), TensorSpec) and n.meta["spec"].mem_id == 1}
    specs = list(specs.values())
    shared = 0
    for i, a in enumerate(specs):
        for b in specs[i + 1:]:
            alive = a.lifetime[0] <= b.lifetime[1] and b.lifetime[0] <= a.lifetime[1]
            space = a.mem_offset < b.mem_offset + b.allocated_memory and b.mem_offset < a.mem_offset + a.allocated_memory
            assert not (alive and space), (a, b)
            shared += space
    assert shared >= 1    # it reused storage, and no two live tensors overlap


def test_memory_passes_shrink_the_arena(tmp_path, monkeypatch):
    """Full SGD-momentum training of an MLP with 256x256 weights: without pockc's passes on
    ExecuTorch's graph, each transposed weight the forward copies lives into the backward and
    each new weight and momentum lives to the end of the step; with them the train arena is at
    least one weight matrix (256 KiB) smaller, and the program still trains."""
    ex = zoo.mlp(batch=8, d_in=64, hidden=256, depth=3)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full",
                         optimizer=pockc.SGD(lr=0.05, momentum=0.9))
    p = step.export(str(tmp_path / "early.pte"), target="executorch", predict=False)
    early = _train_specs(p)["activations"]
    monkeypatch.setattr(et, "write_back_early", _noop)
    monkeypatch.setattr(et, "late_from_inputs", _noop)
    p2 = step.export(str(tmp_path / "late.pte"), target="executorch", predict=False)
    late = _train_specs(p2)["activations"]
    assert early + 256 * 256 * 4 <= late, (early, late)
    loaded = pockc.load(p)
    loaded(*ex.example_batch)   # and it still runs


def _noop(gm):
    from executorch.exir.pass_base import PassResult
    return PassResult(gm, False)


def test_budget_bounds_the_arena(tmp_path):
    ex = zoo.small_cnn(batch=4, image=16)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:2", optimizer=pockc.SGD(lr=0.1))
    ok = step.export(str(tmp_path / "ok.pte"), target="executorch", budget="1MB")
    arena = _train_specs(ok)["arena"]
    assert 0 < arena <= 1024 ** 2
    with pytest.raises(ArenaOverBudget, match="over the budget"):
        step.export(str(tmp_path / "small.pte"), target="executorch", budget=arena - 1)
    assert not os.path.exists(tmp_path / "small.pte")
    loaded = pockc.load(ok)
    assert "train_step" in loaded.table() and f"{arena:,}" in loaded.table()


# -- refusals -------------------------------------------------------------------------------
def test_refusals(tmp_path):
    ex = zoo.small_cnn(batch=4, image=16)
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="last:1",
                         optimizer=pockc.SGD(lr=0.1))
    with pytest.raises(ValueError, match=r"\.pte"):
        step.export(str(tmp_path / "x.bin"), target="executorch")
    with pytest.raises(ValueError, match="unknown export target"):
        step.export(str(tmp_path / "x.pte"), target="tflite")
    acc = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="last:1",
                        optimizer=pockc.SGD(lr=0.1), accumulate=2)
    with pytest.raises(StepError, match="accumulate"):
        acc.export(str(tmp_path / "x.pte"), target="executorch")
    drop = zoo.mobilenet_v2(batch=2, image=32)        # dropout in train mode
    ds = pockc.compile(drop.model, drop.loss_fn, drop.example_batch, update="last:1", optimizer=pockc.SGD(lr=0.1))
    with pytest.raises(StepError, match="dropout"):
        ds.export(str(tmp_path / "x.pte"), target="executorch")
    path = step.export(str(tmp_path / "ok.pte"), target="executorch")
    loaded = pockc.load(path)
    x, y = ex.example_batch
    with pytest.raises(BatchError, match="exported for"):
        loaded(x[:2], y[:2])
    with pytest.raises(BatchError, match="static shapes"):
        loaded.predict(x[:2])
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program at all")
    with pytest.raises(ArtifactError, match="not a loadable ExecuTorch program"):
        pockc.load(str(bad))


def test_cli_target_executorch_fits_the_mcu_budget(tmp_path, capsys):
    """`pockc compile examples/mcu_cnn.py --budget 256KB --target executorch`: the .pte's planned
    train_step arena fits the 256 KB budget, is reported, and the program trains."""
    from pockc.cli import main
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    assert main(["compile", os.path.join(root, "examples", "mcu_cnn.py"), "--budget", "256KB", "--target",
                 "executorch", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train_step.pte (ExecuTorch program; train_step arena" in printed and "within --budget 256KB" in printed
    arena = et.program_report(str(out / "train_step.pte"))["methods"]["train_step"]["arena"]
    assert 0 < arena <= 256 * 1024
    loaded = pockc.load(str(out / "train_step.pte"))
    assert loaded.step_count == 0 and loaded.predict is not None
