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
