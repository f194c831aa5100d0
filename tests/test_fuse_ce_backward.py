"""fuse_ce_backward: the cross-entropy backward pair becomes exp + row scale + scatter_add_;
outputs unchanged (mean / sum reduction, ignore_index rows), and the step's peak drops."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.passes.fuse_ce_backward import fuse_ce_backward
from pockc.plan import resolve_update
from pockc.runtime.memory import measure_peak
from pockc.trace import trace_joint

aten = torch.ops.aten


class Head(nn.Module):
    def __init__(self, d=16, vocab=50):
        super().__init__()
        self.body = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_structure_and_outputs_unchanged(reduction):
    torch.manual_seed(0)
    model = Head()
    x = torch.randn(12, 16)
    y = torch.randint(0, 50, (12,))
    y[[2, 7]] = -100                                     # ignored rows

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y, reduction=reduction, ignore_index=-100)

    plan = resolve_update({"body.*": "full"}, model)
    gm, layout = trace_joint(model, loss_fn, (x, y), plan)
    ref = copy.deepcopy(gm)
    assert fuse_ce_backward(gm).modified
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.nll_loss_backward.default not in targets
    assert aten._log_softmax_backward_data.default not in targets
    assert aten.scatter_add_.default in targets
    assert aten.exp_.default in targets            # in place over the log-probabilities
    names = [n for n in layout.params] + layout.frozen
    args = [dict(model.named_parameters())[n].detach() for n in names] + [x, y]
    for a, b in zip(gm(*args), ref(*args)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not fuse_ce_backward(gm).modified


def test_weighted_cross_entropy_is_left_alone():
    model = Head()
    x, y = torch.randn(6, 16), torch.randint(0, 50, (6,))
    w = torch.rand(50)
    plan = resolve_update({"body.*": "full"}, model)
    gm, _ = trace_joint(model, lambda m, x, y: F.cross_entropy(m(x), y, weight=w), (x, y), plan)
    assert not fuse_ce_backward(gm).modified


def test_llama_step_peak_drops_by_a_logits_buffer():
    ex = zoo.llama(layers=2, d=32, heads=4, seq=64, batch=2, vocab=2048)
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="last:1",
                         optimizer=pockc.AdamW(lr=1e-3))
    logits_bytes = 2 * 64 * 2048 * 4
    _, peak = measure_peak(step, *ex.example_batch)
    eager = copy.deepcopy(ex.model)
    for n, p in eager.named_parameters():
        p.requires_grad_(n.startswith("layers.1."))

    def eager_step():
        ex.loss_fn(eager, *ex.example_batch).backward()

    _, eager_peak = measure_peak(eager_step)
    # eager: 3 logits-sized buffers alive in the CE backward; pockc: 1 there, and its peak is now the
    # forward (logits + log-probabilities)
    assert peak <= eager_peak - 0.9 * logits_bytes, (peak, eager_peak)


# --------------------------------------------------------------------------- the fused path vs eager
# The test above compares the fused graph with pockc's own unfused trace. These compile whole steps
# (the pass applies from 1024 classes: pockc.compile's min_classes) and compare several steps, a new
# batch each, with eager autograd + torch.optim over the same trainable set, in float64: the
# gradient's 1/N normalisation, the ignore_index mask and the target column all reach the weights.
VOCAB = 1024
OPTIMIZERS = {
    "sgd": pockc.SGD(lr=0.5, momentum=0.9, weight_decay=0.01),
    "adamw": pockc.AdamW(lr=0.01, weight_decay=0.05),
}


class TinyLM(nn.Module):
    def __init__(self, d=8, vocab=VOCAB):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, t):
        return self.lm_head(torch.tanh(self.body(self.emb(t))))


def _torch_optimizer(opt, leaves):
    cfg = {k: v for k, v in opt.to_dict().items() if k != "type"}
    return {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}[type(opt).__name__](leaves, foreach=False, **cfg)


def _lm_batches(ignore_index, steps=3, batch=2, seq=7):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(steps):
        t = torch.randint(0, VOCAB, (batch, seq), generator=g)
        y = torch.randint(0, VOCAB, (batch, seq), generator=g)
        y[0, : 2 + i] = ignore_index            # a different number of ignored targets every step
        y[1, -1] = ignore_index
        out.append((t, y))
    return out


def _compare_with_eager(loss_fn, batches, update, opt, rtol=1e-9, atol=1e-12):
    torch.manual_seed(0)
    model = TinyLM().double()
    m_c, m_e, original = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    step = pockc.compile(m_c, loss_fn, batches[0], update=update, optimizer=opt)
    lc = [step(*b) for b in batches]
    plan = step.update_plan
    params = dict(m_e.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    optim = _torch_optimizer(opt, [params[n].requires_grad_(True) for n in plan.trainable_names()])
    le = []
    for b in batches:
        optim.zero_grad(set_to_none=True)
        loss = loss_fn(m_e, *b)
        loss.backward()
        optim.step()
        le.append(loss.detach())
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=rtol, atol=atol)
    pc, po = dict(m_c.named_parameters()), dict(original.named_parameters())
    for name, p in params.items():
        torch.testing.assert_close(pc[name], p, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        assert torch.equal(pc[name], po[name]) == (plan.rule(name).kind == "frozen"), name
    return step


def _fused(step):
    targets = {n.target for n in step.graph.graph.nodes if n.op == "call_function"}
    return aten.scatter_add_.default in targets and aten.nll_loss_backward.default not in targets \
        and aten._log_softmax_backward_data.default not in targets


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("reduction,ignore_index", [("mean", -100), ("sum", -100), ("mean", 5)])
@pytest.mark.parametrize("update", [{"lm_head.*": "full", "body.*": "full"}, {"body.*": "full"}],
                         ids=["trained_head", "frozen_head"])
def test_fused_cross_entropy_matches_eager(update, reduction, ignore_index, opt):
    def loss_fn(m, t, y):
        logits = m(t)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction=reduction,
                               ignore_index=ignore_index)

    step = _compare_with_eager(loss_fn, _lm_batches(ignore_index), update, OPTIMIZERS[opt])
    assert _fused(step), "the cross-entropy backward was not fused"


def test_label_smoothing_matches_eager():
    """Label smoothing adds a dense term to the gradient: the pattern (nll_loss_backward alone into
    _log_softmax_backward_data) does not match and the step must still equal eager."""
    def loss_fn(m, t, y):
        return F.cross_entropy(m(t).reshape(-1, VOCAB), y.reshape(-1), label_smoothing=0.1)

    step = _compare_with_eager(loss_fn, _lm_batches(-100), {"lm_head.*": "full", "body.*": "full"},
                               OPTIMIZERS["adamw"])
    assert not _fused(step)
