"""prune_backward: structure (which gradients and backward ops exist) and numbers."""
import torch

import pockc
from pockc import zoo
from pockc.passes.schedule_updates import storage_roots
from oracle import assert_match, compiled_and_eager

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
