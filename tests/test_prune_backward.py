"""prune_backward: structure (which gradients and backward ops exist) and numbers."""
import torch

import pockc
from pockc import zoo
from pockc.passes.schedule_updates import storage_roots
from oracle import assert_match, compiled_and_eager, eager_steps

aten = torch.ops.aten


def _nodes(step, role=None, target=None):
    return [n for n in step.graph.graph.nodes
            if (role is None or n.meta.get("pockc.role") == role) and (target is None or n.target is target)]


def _placeholder(step, prefix, name):
    want = prefix + "".join(c if c.isalnum() else "_" for c in name)
    return next(n for n in step.graph.graph.nodes if n.op == "placeholder" and n.name == want)


def _readers(step, node):
    roots = storage_roots(step.graph.graph)
    return [n for n in step.graph.graph.nodes if any(roots[a] is node for a in n.all_input_nodes)]


def test_no_gradient_for_frozen_parameters():
    ex = zoo.mlp()  # body.0, body.2, body.4, body.6, head: five Linear layers
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update={"body.0.*": "full", "head.*": "full"})
    mms = _nodes(step, "backward", aten.mm.default)
    # head: weight grad + input grad; body.6, body.4, body.2: input grad only; body.0: weight grad only.
    assert len(mms) == 6, [str(n.target) for n in mms]
    full = pockc.compile(zoo.mlp().model, ex.loss_fn, ex.example_batch, update="full")
    assert len(_nodes(full, "backward", aten.mm.default)) == 9
    # Only trained tensors have update ops.
    updated = {n.meta["pockc.param"] for n in _nodes(step, "update")}
    assert updated == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}


def test_no_backward_below_earliest_trained_layer():
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:2")
    assert step.update_plan.trainable_names() == ["body.6.bias", "body.6.weight", "head.bias", "head.weight"]
    # Propagating a gradient through a Linear needs its weight: no backward op may read a weight
    # of a layer at or below the earliest trained one.
    for layer in ("body.0", "body.2", "body.4"):
        w = _placeholder(step, "frozen_", f"{layer}.weight")
        assert all(r.meta["pockc.role"] == "forward" for r in _readers(step, w)), layer
    w6 = _placeholder(step, "p_", "body.6.weight")
    assert not any(r.meta["pockc.role"] == "backward" and r.target is aten.mm.default for r in _readers(step, w6))
    assert not _nodes(step, "backward", aten.threshold_backward.default) or \
        len(_nodes(step, "backward", aten.threshold_backward.default)) == 1  # only between body.6 and head


def test_cnn_backward_stops_at_first_trained_conv():
    ex = zoo.small_cnn()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update={"features.3.*": "full", "fc.*": "full"})
    cbs = _nodes(step, "backward", aten.convolution_backward.default)
    assert len(cbs) == 1
    assert list(cbs[0].args[10]) == [False, True, False]  # weight grad only: no grad input below it
    assert not _nodes(step, "backward", aten.max_pool2d_with_indices_backward.default)


def _weight_grad_producers(step, name):
    """mm / convolution_backward nodes whose output is (a transpose of) the gradient of ``name``."""
    w = dict(step.model.named_parameters())[name]
    out = []
    for n in step.graph.graph.nodes:
        if n.target is aten.mm.default:
            s = tuple(n.meta["val"].shape)
            if s in (tuple(w.shape), tuple(w.shape)[::-1]):
                out.append((n, s))
        if n.target is aten.convolution_backward.default and n.args[10][1]:
            out.append((n, tuple(n.args[2].meta["val"].shape)))
    return out


def test_channel_sparse_linear_weight_grad_computes_only_selected_rows():
    ex = zoo.mlp()  # body.2: Linear(64, 64)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update={"body.2.*": "channels:0.25"})
    mms = _nodes(step, "backward", aten.mm.default)
    shapes = sorted(tuple(n.meta["val"].shape) for n in mms)
    assert (64, 16) in shapes or (16, 64) in shapes, shapes  # the weight grad: 16 of 64 rows
    assert (64, 64) not in shapes, "the full 64x64 weight gradient is still computed"


def test_channel_sparse_conv_weight_grad_computes_only_selected_rows():
    ex = zoo.small_cnn()  # features.2.0: Conv2d(16, 32, 3)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update={"features.2.*": "channels:0.5"})
    cbs = [n for n in _nodes(step, "backward", aten.convolution_backward.default) if n.args[10][1]]
    assert len(cbs) == 1
    assert tuple(cbs[0].args[2].meta["val"].shape)[0] == 16  # 16 of 32 output channels
    assert tuple(cbs[0].meta["val"][1].shape) == (16, 16, 3, 3)


def test_channel_sparse_depthwise_conv():
    ex = zoo.mobilenet_v2()
    name = "features.15.conv.1.0.weight"  # depthwise 3x3, groups == channels
    channels = dict(ex.model.named_parameters())[name].shape[0]
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update={name: "channels:0.25"})
    cbs = [n for n in _nodes(step, "backward", aten.convolution_backward.default) if n.args[10][1]]
    assert len(cbs) == 1
    k = -(-channels // 4)
    assert cbs[0].args[9] == k and tuple(cbs[0].meta["val"][1].shape)[0] == k


def test_channel_sparse_numbers_match_eager_with_index_lists():
    ex = zoo.small_cnn()
    m_c, m_e, original, step, _, _ = compiled_and_eager(
        ex, {"features.2.*": "channels:[0, 5, 9, 30]", "fc.weight": "channels:0.3"}, pockc.SGD(lr=0.1, momentum=0.9))
    assert_match(m_c, m_e, original, step.update_plan)


def test_dead_code_removed():
    ex = zoo.small_cnn()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="last:1")
    from pockc.passes.fx_utils import is_impure
    for n in step.graph.graph.nodes:
        assert n.users or is_impure(n), f"dead node {n.name} = {n.target}"


# --------------------------------------------------------------------------- row selections not at row 0
# Every selection above starts at row 0 or is checked only structurally; these push selections that
# start elsewhere (a slice [2, 4), an index list [1, 4, 6], rows in the middle third of a fused qkv
# projection) through Linear, Conv2d (plain, grouped, depthwise) and split/chunk backward, and
# compare several steps with eager autograd + torch.optim (float64, a new batch every step).
import copy  # noqa: E402

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OPTIMIZERS = {
    "sgd": pockc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": pockc.AdamW(lr=0.01, weight_decay=0.05),
}


def _compare_with_eager(model, loss_fn, batches, update, opt, rtol=1e-9, atol=1e-12):
    m_c, m_e, original = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    step = pockc.compile(m_c, loss_fn, batches[0], update=update, optimizer=opt)
    plan = step.update_plan
    lc = [step(*b) for b in batches]
    le = eager_steps(m_e, loss_fn, batches, plan, opt)   # the independent reference (tests/reference.py)
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=rtol, atol=atol)
    pc, pe, po = dict(m_c.named_parameters()), dict(m_e.named_parameters()), dict(original.named_parameters())
    for name in pc:
        torch.testing.assert_close(pc[name], pe[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        if plan.rule(name).kind == "frozen":
            assert torch.equal(pc[name], po[name]), f"frozen {name} changed"
        sel = plan.selection(name)
        if sel is not None:
            rows = list(range(sel[1], sel[2])) if sel[0] == "slice" else list(sel[1])
            keep = torch.ones(pc[name].shape[0], dtype=torch.bool)
            keep[rows] = False
            assert torch.equal(pc[name][keep], po[name][keep]), f"unselected rows of {name} changed"
            assert not torch.equal(pc[name][rows], po[name][rows]), f"selected rows of {name} did not train"
    return step


def _ce(m, x, y):
    return F.cross_entropy(m(x), y)


def _batches(shape, classes, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(steps)]


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.pre(x)))))


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = torch.tanh(self.grouped(x))
        x = torch.tanh(self.dw(x))
        return self.fc(x.mean((2, 3)))


class _QKV(nn.Module):
    """One fused projection split into q, k, v (``split`` or ``chunk``): its rows [d, 2d) are k's."""

    def __init__(self, d=8, chunk=False):
        super().__init__()
        self.d, self.chunk = d, chunk
        self.pre = nn.Linear(d, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # x: [batch, tokens, d]
        h = torch.tanh(self.pre(x))
        qkv = self.qkv(h)
        q, k, v = qkv.chunk(3, dim=-1) if self.chunk else qkv.split(self.d, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / self.d ** 0.5, dim=-1)
        return self.head((att @ v).mean(1))


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).double()


SLICE, INDEX = "channels:[2,3]", "channels:[1,4,6]"


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("rows", [SLICE, INDEX])
def test_linear_rows_not_starting_at_zero_match_eager(rows, opt):
    step = _compare_with_eager(_model(_MLP), _ce, _batches((5, 6), 3),
                               {"lin.*": rows, "pre.*": rows, "head.*": "full"}, OPTIMIZERS[opt])
    want = ("slice", 2, 4) if rows == SLICE else ("index", (1, 4, 6))
    assert step.update_plan.selection("lin.weight") == want
    # the selection reached the weight-gradient GEMM: no 8x8 gradient of lin.weight is computed
    shapes = [tuple(n.meta["val"].shape) for n in _nodes(step, "backward", aten.mm.default)]
    assert (8, 8) not in shapes, shapes


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("rows", [SLICE, INDEX])
def test_conv_rows_not_starting_at_zero_match_eager(rows, opt):
    update = {"conv1.*": rows, "conv2.*": rows, "dw.*": rows, "fc.*": "full",
              "grouped.*": "channels:[4,5,6,7]" if rows == SLICE else rows}   # [4, 8): the second group
    step = _compare_with_eager(_model(_CNN), _ce, _batches((2, 3, 6, 6), 3), update, OPTIMIZERS[opt])
    cbs = [n for n in _nodes(step, "backward", aten.convolution_backward.default) if n.args[10][1]]
    rows_of = sorted(tuple(n.meta["val"][1].shape)[0] for n in cbs)
    # an index list on a grouped / depthwise convolution is not pushed: its full gradient is selected
    assert rows_of == ([2, 2, 2, 4] if rows == SLICE else [3, 3, 8, 8]), rows_of
    if rows == SLICE:  # the grouped and depthwise convolutions ran on the selected groups only
        assert sorted(n.args[9] for n in cbs) == [1, 1, 1, 2]


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("rows", ["channels:[10,11,12]", "channels:[9,12,14]"])
@pytest.mark.parametrize("chunk", [False, True], ids=["split", "chunk"])
def test_fused_qkv_rows_in_the_middle_third_match_eager(chunk, rows, opt):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g))
               for _ in range(3)]
    step = _compare_with_eager(_model(_QKV, 8, chunk), _ce, batches,
                               {"qkv.*": rows, "pre.*": "full", "head.*": "full"}, OPTIMIZERS[opt])
    shapes = [tuple(n.meta["val"].shape) for n in _nodes(step, "backward", aten.mm.default)]
    assert (24, 8) not in shapes and (8, 24) not in shapes, shapes  # no full qkv weight gradient
