"""pointwise_conv: 1x1 convolutions over channels-last activations run as one GEMM (or oneDNN's
convolution over many pixels); forward and backward match eager PyTorch."""
import copy
import importlib
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.zoo import Example
from tests.oracle import assert_match, compiled_and_eager

pw = importlib.import_module("pockc.passes.pointwise_conv")

aten = torch.ops.aten
SGD = pockc.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _pointwise_convs_left(gm):
    """Forward or backward convolutions with a 1x1, ungrouped kernel still in the graph."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.convolution.default, aten.convolution_backward.default):
            w = n.args[1 if n.target is aten.convolution.default else 2].meta["val"]
            groups = n.args[8] if n.target is aten.convolution.default else n.args[9]
            if tuple(w.shape[2:]) == (1, 1) and groups == 1:
                out.append(n)
    return out


def _double(ex):
    ex.model.double()
    ex.example_batch = tuple(b.double() if b.is_floating_point() else b for b in ex.example_batch)
    return ex


F64 = dict(rtol=1e-7, atol=1e-9)   # float64: a wrong rewrite is off by far more


@pytest.mark.parametrize("update", ["full", "last:2"])
def test_mobilenet_pointwise_convs_become_gemms_and_match_eager(update):
    # 64x64 images: the step runs channels-last. float64: the check is about the rewrite, not
    # about float32 reordering noise (which batch 2 amplifies through batch norm).
    ex = _double(zoo.mobilenet_v2(batch=2, image=64, width=0.25))
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, update, SGD, steps=2)
    gm = step.graph
    # Every 1x1 convolution over a map larger than one pixel is a GEMM now, forward and backward
    # (the last block's 2x2 maps included); what is left runs over a 1x1 map or is not 1x1.
    for n in _pointwise_convs_left(gm):
        x = n.args[0 if n.target is aten.convolution.default else 1].meta["val"]
        assert x.shape[2] * x.shape[3] == 1, n.format_node()
    assert _count(gm, aten.mm.default) > 0
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), **F64)
    assert_match(m_c, m_e, original, step.update_plan, **F64)


def test_backward_computes_only_what_the_plan_needs():
    ex = _double(zoo.mobilenet_v2(batch=2, image=64, width=0.25))
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "bias", SGD, steps=2)
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), **F64)
    assert_match(m_c, m_e, original, step.update_plan, **F64)
    gm = step.graph
    # bias-only: no weight is trained, so no GEMM computes a weight gradient (g^T @ x); each
    # backward GEMM is g @ W (grad input), whose second operand is a view of a frozen weight.
    frozen = {ph for ph in gm.graph.nodes if ph.op == "placeholder" and ph.name.startswith("frozen_")}
    for n in gm.graph.nodes:
        if n.target is aten.mm.default and n.meta.get("pockc.role") == "backward":
            src = n.args[1]
            while src.op == "call_function" and src.target in (aten.view.default, aten.t.default):
                src = src.args[0]
            assert src in frozen, n.format_node()


class PointwiseNet(nn.Module):
    """Two 1x1 convolutions (one with a bias) and BN over 64x64 maps: 8192 pixels at batch 2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.expand = nn.Conv2d(8, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.project = nn.Conv2d(16, 8, 1, bias=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.project(F.relu6(self.bn(self.expand(x)))) + x
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _pointwise_net(batch=2, image=64):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image, image, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    return Example("pointwise_net", PointwiseNet().train(), (x, y), lambda m, x, y: F.cross_entropy(m(x), y))


@pytest.mark.skipif(not pw._has_mkldnn(), reason="needs oneDNN (mkldnn)")
def test_many_pixels_use_onednn_in_float32_and_match_eager():
    ex = _pointwise_net()
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "full", SGD, steps=3)
    gm = step.graph
    assert _count(gm, pw.MKLDNN_CONV) == 2           # expand and project: 2*64*64 = 8192 pixels
    # Backward: expand's is GEMMs; project's gradient comes from the average pool's backward in
    # NCHW layout (not a matrix view), so that one stays a convolution_backward.
    [left] = _pointwise_convs_left(gm)
    assert left.target is aten.convolution_backward.default and not left.args[0].meta["val"].is_contiguous(
        memory_format=torch.channels_last)
    assert _count(gm, aten.mm.default) >= 3          # expand's grad input and weight, the fc's
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, original, step.update_plan, rtol=1e-4, atol=1e-5)


def test_fewer_pixels_use_one_gemm(monkeypatch):
    monkeypatch.setattr(pw, "MKLDNN_MIN_ROWS", 10 ** 9)
    ex = _pointwise_net()
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "full", SGD, steps=3)
    gm = step.graph
    assert _count(gm, pw.MKLDNN_CONV) == 0 and len(_pointwise_convs_left(gm)) == 1   # project's backward
    assert _count(gm, aten.addmm.default) >= 2       # the project conv's bias folds into addmm; the fc
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, original, step.update_plan, rtol=1e-4, atol=1e-5)


def test_nchw_steps_are_left_alone():
    # 32x32: below channels_last's threshold, the step stays NCHW; no 1x1 conv is rewritten,
    # not even those over a 1x1 map (NCHW and channels-last at once, ambiguous).
    ex = zoo.mobilenet_v2()
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full")
    assert _count(step.graph, aten.mm.default) == 2  # the classifier's only
    assert _count(step.graph, pw.MKLDNN_CONV) == 0


def test_channel_sparse_pointwise_weight_matches_eager():
    # A channel slice of a 1x1 weight: its gradient GEMM is pushed to the selected rows by
    # prune_backward and then left as a convolution_backward (the gradient slice is not a
    # matrix view); the other 1x1 convolutions still become GEMMs.
    ex = _double(zoo.mobilenet_v2(batch=2, image=64, width=0.25))
    update = ["head", {"features.5.conv.0.0.weight": "channels:0.5", "features.6.*": "full"}]
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, update, SGD, steps=2)
    assert _count(step.graph, aten.mm.default) > 0
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), **F64)
    assert_match(m_c, m_e, original, step.update_plan, **F64)


def test_channels_last_refreshes_layouts_downstream():
    ex = zoo.mobilenet_v2(batch=2, image=64, width=0.25)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:1")
    convs = [n for n in step.graph.graph.nodes if n.target is aten.convolution.default]
    assert convs and all(n.meta["val"].is_contiguous(memory_format=torch.channels_last) for n in convs)
    getitems = [n for n in step.graph.graph.nodes if n.target is operator.getitem
                and n.args[0].target is aten.native_batch_norm.default and n.args[1] == 0]
    assert all(n.meta["val"].is_contiguous(memory_format=torch.channels_last) for n in getitems)
