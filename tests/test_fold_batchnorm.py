"""fold_batchnorm: frozen eval-mode BatchNorm folded into the preceding convolution."""
import copy

import pytest
import torch

import pockc
from pockc import zoo
from pockc.passes.fold_batchnorm import count_batchnorms
from tests.oracle import assert_match, compiled_and_eager

aten = torch.ops.aten
OPT = pockc.SGD(lr=0.1, momentum=0.9)


def _cnn(eval_bn=True):
    ex = zoo.small_cnn(batch=4, image=16)
    if eval_bn:
        ex.model.eval()
    return ex


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.mark.parametrize("update", [
    "head",                                                   # no gradient reaches any batch norm
    {"features.2.0.*": "full", "fc.*": "full"},               # trained conv + frozen BN; gradient flows
                                                              # through the frozen features.3 conv + BN
    ["head", {"features.3.0.weight": "channels:0.5"}],        # channel-sparse conv before a frozen BN
])
def test_frozen_eval_bn_is_folded_and_matches_eager(update):
    ex = _cnn()
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, update, OPT, steps=3)
    trained_bn = [n for n in step.update_plan.trainable_names() if n.startswith("features.") and ".1." in n]
    assert count_batchnorms(step.graph) == 0 and not trained_bn
    assert _count(step.graph, aten.native_batch_norm_backward.default) == 0
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, original, step.update_plan)


def test_trained_affine_and_train_mode_bn_are_left_alone():
    ex = _cnn()
    m_c, m_e, original, step, _, _ = compiled_and_eager(ex, "last:2", OPT, steps=2)
    # batch norms whose affine is trained keep their op; the frozen one (features.0) folds
    trained_bn = {n.rsplit(".", 1)[0] for n in step.update_plan.trainable_names() if n.endswith("1.weight")}
    assert trained_bn and count_batchnorms(step.graph) == len(trained_bn) == 2
    assert_match(m_c, m_e, original, step.update_plan)
    ex = _cnn(eval_bn=False)  # train mode: batch statistics, running stats updated -> never folded
    m_c, m_e, original, step, _, _ = compiled_and_eager(ex, "head", OPT, steps=2)
    assert count_batchnorms(step.graph, eval_only=False) == 3
    assert_match(m_c, m_e, original, step.update_plan)


def test_folded_weights_follow_the_module():
    """The fold is computed in the graph each step: changing a frozen statistic takes effect."""
    ex = _cnn()
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    step = pockc.compile(m_c, ex.loss_fn, ex.example_batch, update="head", optimizer=OPT)
    assert count_batchnorms(step.graph) == 0
    for m in (m_c, m_e):
        m.features[3][1].running_var.mul_(4.0)
        m.features[0][1].weight.data.mul_(-0.5)
    lc = step(*ex.example_batch)
    with torch.no_grad():
        le = ex.loss_fn(m_e, *ex.example_batch)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
