"""inplace_ops: batch norm writes its normalized output into its dying input.

In a frozen MobileNetV2 stage nothing saves a convolution's output for the backward, so the
train-mode BN after it becomes ``native_batch_norm.out(x, ..., out=x, ...)`` and the
expand conv's output and its BN output no longer coexist (the forward peak of the step)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.passes import inplace_ops as inplace_mod
from pockc.passes.fx_utils import is_view, returns_input
from tests.oracle import assert_match, compiled_and_eager

aten = torch.ops.aten
BN = aten.native_batch_norm.default
BN_TRAIN_OUT = aten.native_batch_norm.out
BN_EVAL_OUT = aten._native_batch_norm_legit_no_training.out
REWRITTEN = (BN_TRAIN_OUT, BN_EVAL_OUT, aten._native_batch_norm_legit.no_stats_out)
SGDM = dict(lr=0.01, momentum=0.9)
SIZE = dict(batch=4, image=64, width=0.5)     # small, with the step's peak in the forward


def _compile(ex, update="last:4+head", batch_norm=True, monkeypatch=None):
    monkeypatch.setattr(inplace_mod, "BATCH_NORM", batch_norm)
    return pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update=update, optimizer=pockc.SGD(**SGDM))


def _aliases(graph):
    """node -> the node that allocated the storage it reads (views and in-place/out= ops followed)."""
    base = {}
    for n in graph.nodes:
        b = n
        if n.op == "call_function":
            if n.target is operator.getitem and n.args[0] in base and n.args[0].target in REWRITTEN and n.args[1] == 0:
                b = base[n.args[0]]
            elif is_view(n) and isinstance(n.args[0], fx.Node):
                b = base.get(n.args[0], n.args[0])
            elif returns_input(n) is not None:
                b = base.get(returns_input(n), returns_input(n))
        base[n] = b
    return base


@pytest.fixture(scope="module")
def mp():
    m = pytest.MonkeyPatch()
    yield m
    m.undo()


@pytest.fixture(scope="module")
def steps(mp):
    on = _compile(zoo.mobilenet_v2(**SIZE), batch_norm=True, monkeypatch=mp)
    off = _compile(zoo.mobilenet_v2(**SIZE), batch_norm=False, monkeypatch=mp)
    mp.setattr(inplace_mod, "BATCH_NORM", True)
    return on, off


def test_kernel_bit_identical_when_out_aliases_input():
    """The CPU kernels the rewrite uses give the out-of-place op's bits with out=input."""
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 16, 12, 10), (3, 7, 5, 9), (4, 24, 1, 1)]:
        for cl in (False, True):
            for train in (True, False):
                x = torch.randn(shape, generator=g) * 3 + 1
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                c = shape[1]
                w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
                rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
                rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
                ref = BN(x, w, b, rm1, rv1, train, 0.1, 1e-5)
                x2 = x.clone(memory_format=torch.preserve_format)
                sm, si = torch.empty(ref[1].shape), torch.empty(ref[2].shape)
                if train:
                    res = BN_TRAIN_OUT(x2, w, b, rm2, rv2, True, 0.1, 1e-5, out=x2, save_mean=sm, save_invstd=si)
                else:
                    res = BN_EVAL_OUT(x2, w, b, rm2, rv2, 0.1, 1e-5, out0=x2, out1=sm, out2=si)
                assert res[0].data_ptr() == x2.data_ptr() and x2.stride() == ref[0].stride()
                assert torch.equal(x2, ref[0]), (shape, cl, train)
                assert torch.equal(res[1], ref[1]) and torch.equal(res[2], ref[2])
                assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
            # train mode without running statistics (track_running_stats=False)
            ref = BN(x, w, b, None, None, True, 0.1, 1e-5)
            x2 = x.clone(memory_format=torch.preserve_format)
            sm, si = torch.empty(ref[1].shape), torch.empty(ref[2].shape)
            aten._native_batch_norm_legit.no_stats_out(x2, w, b, True, 0.1, 1e-5, out=x2, save_mean=sm, save_invstd=si)
            assert torch.equal(x2, ref[0]) and torch.equal(sm, ref[1]) and torch.equal(si, ref[2])


def test_frozen_stage_bn_rewritten_trained_not(steps):
    on, off = steps
    g = on.graph.graph
    nodes = list(g.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    base = _aliases(g)
    rewritten = [n for n in nodes if n.op == "call_function" and n.target is BN_TRAIN_OUT]
    kept = [n for n in nodes if n.op == "call_function" and n.target is BN]
    before = [n for n in off.graph.graph.nodes if n.op == "call_function" and n.target is BN]
    assert len(rewritten) > 0 and len(rewritten) + len(kept) == len(before)
    assert not any(n.target is BN_TRAIN_OUT for n in off.graph.graph.nodes)
    for n in rewritten:
        x = n.args[0]
        assert n.kwargs["out"] is x and n.args[5] is True
        assert n.kwargs["save_mean"].target is aten.empty.memory_format
        assert n.args[1].name.startswith("frozen_"), n.args[1].name     # a frozen BN
        before_n = {a for a in nodes[:pos[n]] if base[a] is base[x]}    # x and its aliases until n
        assert not [u for u in nodes[pos[n] + 1:] if before_n & set(u.all_input_nodes)], n.name
    for n in kept:   # a trained block's BN: its backward reads the input
        x = n.args[0]
        readers = [u for u in nodes[pos[n] + 1:] if any(base.get(a) is base[x] for a in u.all_input_nodes)]
        assert any(u.target is aten.native_batch_norm_backward.default for u in readers), n.name
    # the ReLU6 after a rewritten BN still runs in place, over the convolution's storage
    relus = [u for n in rewritten for gi in n.users for u in gi.users if u.target is aten.hardtanh_.default]
    assert relus


def test_memory_plan_equals_measured_and_is_lower(steps):
    on, off = steps
    ex = zoo.mobilenet_v2(**SIZE)
    assert on.memory.measure(*ex.example_batch) == on.memory.peak_bytes
    assert off.memory.measure(*ex.example_batch) == off.memory.peak_bytes
    assert on.memory.peak_bytes < off.memory.peak_bytes, (on.memory.peak_bytes, off.memory.peak_bytes)


def test_mobilenet_matches_eager(monkeypatch):
    """One step against eager PyTorch (float tolerance, as tests/test_paging.py: the compiled
    step's GEMM convolutions round differently, and over several float32 steps this model's batch
    norms amplify that rounding to ~2e-4 of the loss, depending on the thread count, with or
    without the rewrite), and three steps bit for bit against the same step compiled without the
    rewrite (the aliased kernel is bit-identical)."""
    ex = zoo.mobilenet_v2(batch=2, image=64, width=0.5)
    update, opt = "last:4+head", pockc.SGD(**SGDM)
    monkeypatch.setattr(inplace_mod, "BATCH_NORM", True)
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, update, opt, steps=1)
    assert sum(n.target is BN_TRAIN_OUT for n in step.graph.graph.nodes) > 0
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_match(m_c, m_e, original, step.update_plan, rtol=1e-4, atol=1e-5)   # buffers included
    ob = dict(original.named_buffers())
    for name, buf in m_c.named_buffers():
        if "running" in name:
            assert not torch.equal(buf, ob[name]), name          # the running statistics moved

    m_c, _, _, step, lc, _ = compiled_and_eager(ex, update, opt, steps=3)
    monkeypatch.setattr(inplace_mod, "BATCH_NORM", False)
    m_off, _, _, step_off, l_off, _ = compiled_and_eager(ex, update, opt, steps=3)
    assert not any(n.target is BN_TRAIN_OUT for n in step_off.graph.graph.nodes)
    assert [float(x) for x in lc] == [float(x) for x in l_off]
    for (name, a), b in zip(m_c.state_dict().items(), m_off.state_dict().values()):
        assert torch.equal(a, b), name                         # bit-identical, buffers included


class _EvalNet(nn.Module):
    """conv -> ReLU -> BN (eval, frozen, not foldable: no conv before it) -> conv -> BN (train)
    -> ReLU -> pool -> fc (trained)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.bn1(F.relu(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _eval_example():
    torch.manual_seed(0)
    m = _EvalNet().train()
    with torch.no_grad():    # statistics and affine parameters away from their initial values
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    m.bn1.eval()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g))
    return zoo.Example("eval_bn", m, batch, lambda model, x, y: F.cross_entropy(model(x), y))


def test_eval_mode_bn_rewritten_and_matches_eager():
    ex = _eval_example()
    update, opt = "head", pockc.SGD(**SGDM)
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, update, opt, steps=3)
    targets = [n.target for n in step.graph.graph.nodes if n.op == "call_function"]
    assert BN_EVAL_OUT in targets and BN_TRAIN_OUT in targets and BN not in targets, targets
    for n in step.graph.graph.nodes:
        if n.op == "call_function" and n.target is BN_EVAL_OUT:
            assert n.kwargs["out0"] is n.args[0]
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_match(m_c, m_e, original, step.update_plan, rtol=1e-4, atol=1e-5)
    ob, cb = dict(original.named_buffers()), dict(m_c.named_buffers())
    assert torch.equal(cb["bn1.running_mean"], ob["bn1.running_mean"])       # eval: not updated
    assert torch.equal(cb["bn1.running_var"], ob["bn1.running_var"])
    assert not torch.equal(cb["bn2.running_mean"], ob["bn2.running_mean"])   # train: updated


def test_switch_off_keeps_native_batch_norm(monkeypatch):
    ex = _eval_example()
    step = _compile(ex, update="head", batch_norm=False, monkeypatch=monkeypatch)
    targets = {n.target for n in step.graph.graph.nodes if n.op == "call_function"}
    assert BN in targets and not targets & set(REWRITTEN)
    assert step.memory.measure(*ex.example_batch) == step.memory.peak_bytes
