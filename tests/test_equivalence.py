"""The correctness oracle over the model zoo: after several compiled steps, parameters equal what
eager autograd + torch.optim give with the same trainable set; frozen parameters (and frozen rows
of channel-sparse tensors) are bit-identical; batch-norm buffers match."""
import pytest
import torch

import pockc
from pockc import zoo
from oracle import assert_match, compiled_and_eager

MODELS = ["mlp", "small_cnn", "mobilenet_v2", "resnet", "bert", "llama"]
POLICIES = {
    "full": "full",
    "bias": "bias",
    "last2": "last:2",
    "channels0.25": {"*": "channels:0.25"},
    "channels0.5": {"*": "channels:0.5"},
    "mixed": None,  # per model below: a dict mixing full, frozen and channel-sparse rules
}
MIXED = {
    "mlp": {"body.2.*": "channels:0.5", "head.*": "full"},
    "small_cnn": {"features.2.*": "channels:0.5", "fc.*": "full", "features.0.1.*": "full"},
    "mobilenet_v2": {"features.15.*": "channels:0.25", "features.17.*": "full", "classifier.*": "full"},
    "resnet": {"layer3.*": "channels:0.5", "layer4.0.bn2.*": "full", "fc.weight": "channels:[1, 4, 7]"},
    "bert": {"layers.1.*": "channels:0.5", "classifier.*": "full", "*norm*": "full"},
    "llama": {"layers.1.*_proj.*": "channels:0.25", "layers.1.q_proj.*": "full", "norm.*": "full"},
}
OPTIMIZERS = {
    "sgd": lambda: pockc.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True),
    "adamw": lambda: pockc.AdamW(lr=1e-3),
}


def _policy(model, key):
    return MIXED[model] if key == "mixed" else POLICIES[key]


F64 = dict(rtol=1e-10, atol=1e-12)   # float64: rounding is 1e-16, a wrong update is off by far more
F32 = dict(rtol=1e-4, atol=1e-5)


def _double(ex):
    ex.model.double()
    ex.example_batch = tuple(b.double() if b.is_floating_point() else b for b in ex.example_batch)
    return ex


def _in_float64(model, opt):
    """Cases float32 cannot check tightly; they run in float64 instead of with loose tolerances.

    AdamW divides by sqrt(v) + eps, so an element whose true gradient is ~0 -- a BN bias followed
    by another train-mode BN, BERT's key bias -- turns float32 rounding noise (1e-9) into an
    lr-sized step: only a tolerance of about one step would pass, and that also passes a 40% error
    in a norm weight's update. MobileNetV2's loss is sharp (SGD moves weights by up to 4 per step)
    and it has such biases under SGD too: an ulp of difference in float32 (the fused cross-entropy
    backward's exp) ends steps 2 and 3 visibly apart."""
    return (opt == "adamw" and model in ("mobilenet_v2", "resnet", "bert")) or model == "mobilenet_v2"


# MobileNetV2 at its zoo default (batch 2, 32x32) ends in 1x1 maps whose batch norms see 2 values
# per channel: SGD(lr=0.05) diverges there (weights of 1e21 after 3 steps), which checks nothing.
# Batch 4 at 64x64 (2x2 final maps; the step runs channels-last) trains sanely.
MODEL_ARGS = {"mobilenet_v2": dict(batch=4, image=64)}
# Its BN biases that feed a linear conv and then a train-mode BN have a true gradient of exactly 0;
# AdamW normalizes float64 noise on them into steps of ~2e-9 (1e-6 of lr), a bound that still
# catches any wrong update (a 35% error in a norm weight's 1e-3 step is 3.5e-4).
F64_ZERO_GRADIENTS = dict(rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("model", MODELS)
def test_matches_eager(model, policy, opt):
    ex = zoo.ZOO[model](**MODEL_ARGS.get(model, {}))
    tol = F32
    if _in_float64(model, opt):
        ex, tol = _double(ex), F64_ZERO_GRADIENTS if model == "mobilenet_v2" else F64
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, _policy(model, policy), OPTIMIZERS[opt](), steps=3)
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, **tol)
    assert_match(m_c, m_e, original, step.update_plan, **tol)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_channel_ratios_round_up_exactly(opt):
    """channels:R trains the first ceil(R * C) rows: 0.3 of 64 rows is 20 (round would give 19),
    0.3 of 10 rows is exactly 3 (float's 0.3 * 10 = 3.0000000000000004 must not make it 4), 0.05
    of 10 rows is at least 1. The oracle's resolver computes the rows exactly on its own."""
    ex = zoo.mlp()
    update = {"body.0.*": "channels:0.3", "head.weight": "channels:0.3", "head.bias": "channels:0.05",
              "body.4.weight": "channels:0.55"}
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, update, OPTIMIZERS[opt](), steps=3)
    rows = {n: step.update_plan.selection(n) for n in ("body.0.weight", "head.weight", "head.bias", "body.4.weight")}
    assert rows == {"body.0.weight": ("slice", 0, 20), "head.weight": ("slice", 0, 3),
                    "head.bias": ("slice", 0, 1), "body.4.weight": ("slice", 0, 36)}, rows
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, original, step.update_plan)


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.3), dict(lr=0.1, momentum=0.5, maximize=True),
    dict(lr=0.1, weight_decay=0.01),
])
def test_sgd_variants(kwargs):
    ex = zoo.mlp()
    m_c, m_e, original, step, _, _ = compiled_and_eager(ex, "last:2", pockc.SGD(**kwargs), steps=3)
    assert_match(m_c, m_e, original, step.update_plan)


@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, amsgrad=True), dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.0), dict(lr=1e-2, maximize=True),
])
def test_adamw_variants(kwargs):
    ex = zoo.mlp()
    m_c, m_e, original, step, _, _ = compiled_and_eager(ex, {"body.*": "channels:0.5"}, pockc.AdamW(**kwargs))
    assert_match(m_c, m_e, original, step.update_plan)


def test_dropout_in_train_mode_matches_eager_under_same_seed():
    ex = zoo.bert()  # dropout 0.1 after the embeddings and inside every layer
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "full", pockc.SGD(lr=0.1), steps=2)
    assert any(n.target is torch.ops.aten.native_dropout.default or "bernoulli" in str(n.target)
               for n in step.graph.graph.nodes), "dropout is not in the graph"
    assert_match(m_c, m_e, original, step.update_plan)


def test_learning_rate_change_takes_effect_without_recompiling():
    ex = zoo.mlp()
    import copy
    m_a, m_b = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    a = pockc.compile(m_a, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(lr=0.1))
    b = pockc.compile(m_b, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(lr=0.1))
    a(*ex.example_batch)
    b.optimizer.lr = 0.0
    b(*ex.example_batch)
    for (n, pa), pb, po in zip(m_a.named_parameters(), m_b.parameters(), ex.model.parameters()):
        assert torch.equal(pb, po), n
        assert not torch.equal(pa, po), n
