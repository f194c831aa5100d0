"""fold_batchnorm: frozen eval-mode BatchNorm folded into the preceding convolution."""
import copy

import pytest
import torch

import pockc
from pockc import zoo
from pockc.passes.fold_batchnorm import count_batchnorms
from tests.oracle import assert_match, compiled_and_eager, eager_steps

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


# --------------------------------------------------------------------------- non-trivial statistics, vs eager
# The tests above fold freshly initialised batch norms (mean 0, var 1, gamma 1, beta 0), where the
# fold is the identity map up to eps: a wrong scale in the backward (``grad`` for ``grad * s``) or
# a wrong sign of the mean shift changes nothing there. These fold batch norms with random running
# statistics and affine, with trained convolutions before and after them, and compare several
# steps (a new batch each) with eager autograd + torch.optim in float64.
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OPTIMIZERS = {
    "sgd": pockc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": pockc.AdamW(lr=0.01, weight_decay=0.05),
}


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)                # trained, below everything
        self.conv1 = nn.Conv2d(6, 8, 3, padding=1)                # with a bias, folded into bn1
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)    # without one, folded into bn2
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 4, 1)                           # after both batch norms
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.tanh(self.conv0(x))
        x = torch.tanh(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.tanh(self.conv3(x)).mean((2, 3)))


def _random_bn_model():
    torch.manual_seed(0)
    model = _ConvBN().double()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.randn(8, dtype=torch.float64))
            bn.running_var.copy_(torch.empty(8, dtype=torch.float64).uniform_(0.5, 2.0))
            bn.weight.copy_(torch.randn(8, dtype=torch.float64))
            bn.bias.copy_(torch.randn(8, dtype=torch.float64))
    return model.eval()           # eval mode: running statistics, folding applies


def _ce(m, x, y):
    return F.cross_entropy(m(x), y)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("update", [
    {"conv*": "full", "fc.*": "full"},                 # trained convs upstream and downstream of both BNs
    {"conv0.*": "full", "conv3.*": "full"},            # frozen conv + BN pairs between trained layers:
                                                       # the gradient flows through both folded BNs
    {"conv1.weight": "channels:[2,3]", "conv2.weight": "channels:[1,4,6]", "fc.*": "full"},
])
def test_fold_with_random_statistics_and_affine_matches_eager(update, opt):
    model = _random_bn_model()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g))
               for _ in range(3)]
    m_c, m_e, original = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    step = pockc.compile(m_c, _ce, batches[0], update=update, optimizer=OPTIMIZERS[opt])
    assert count_batchnorms(step.graph) == 0, "the frozen eval-mode batch norms were not folded"
    assert _count(step.graph, aten.native_batch_norm_backward.default) == 0
    plan = step.update_plan
    lc = [step(*b) for b in batches]

    le = eager_steps(m_e, _ce, batches, plan, OPTIMIZERS[opt])   # the independent reference (tests/reference.py)
    params = dict(m_e.named_parameters())

    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-9, atol=1e-12)
    pc, po = dict(m_c.named_parameters()), dict(original.named_parameters())
    for name, p in params.items():
        torch.testing.assert_close(pc[name], p, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
        if plan.rule(name).kind == "frozen":
            assert torch.equal(pc[name], po[name]), f"frozen {name} changed"
    for name, b in m_c.named_buffers():     # eval mode: the running statistics are untouched
        assert torch.equal(b, dict(original.named_buffers())[name]), name
