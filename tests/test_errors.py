"""Errors a user can act on: one line, pockc's own exception types, never torch internals."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.inner(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x
        return -x


def ce(model, x, y):
    return F.cross_entropy(model(x), y)


def test_data_dependent_control_flow_names_module_and_line():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(pockc.CompileError) as e:
        pockc.compile(Branchy(), ce, (x, y))
    msg = str(e.value)
    assert "module 'gate' (Gate)" in msg and "test_errors.py" in msg and "if x.sum() > 0" in msg
    assert "data-dependent" in msg and "torch.where" in msg
    assert "\n" not in msg


def test_item_used_as_a_number_is_traced_and_computed_per_step():
    """A value read with .item() and used arithmetically stays in the graph, read at run time."""
    import copy

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) * x.max().item()

    m = M()
    ref = copy.deepcopy(m)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    step = pockc.compile(m, ce, (x, y), optimizer=pockc.SGD(lr=0.1))
    x2 = x * 3
    torch.testing.assert_close(step(x2, y), ce(ref, x2, y).detach())


def test_non_scalar_loss():
    ex = zoo.mlp()
    with pytest.raises(pockc.CompileError, match=r"scalar tensor, got shape \(8,\); reduce it"):
        pockc.compile(ex.model, lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"), ex.example_batch)


def test_bad_arguments():
    ex = zoo.mlp()
    with pytest.raises(pockc.CompileError, match="torch.nn.Module"):
        pockc.compile(lambda x: x, ex.loss_fn, ex.example_batch)
    with pytest.raises(pockc.CompileError, match="example_batch must be a tuple"):
        pockc.compile(ex.model, ex.loss_fn, example_batch=[1, 2])
    with pytest.raises(pockc.CompileError, match="pockc optimizer"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, optimizer=torch.optim.SGD(ex.model.parameters(), lr=1))
    with pytest.raises(pockc.CompileError, match="trains nothing"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="none")
    with pytest.raises(ValueError, match="invalid learning rate"):
        pockc.SGD(lr=-1)


def test_batch_of_wrong_rank_or_dtype():
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch)
    x, y = ex.example_batch
    with pytest.raises(pockc.BatchError, match="rank, dtype and device must match"):
        step(x[None], y)
    with pytest.raises(pockc.BatchError, match="float64"):
        step(x.double(), y)
    with pytest.raises(pockc.BatchError, match="batch has 1 elements, the step was compiled for 2"):
        step(x)


def test_new_batch_shape_compiles_and_caches_a_second_step():
    import copy
    ex = zoo.mlp()
    model = copy.deepcopy(ex.model)
    step = pockc.compile(model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(lr=0.1))
    x, y = torch.randn(5, 32), torch.randint(0, 10, (5,))
    with pytest.warns(UserWarning, match="compiling a step specialized"):
        step(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        step(x, y)
    assert len(step._graphs) == 2
    # Numbers: same as eager SGD for those two steps.
    ref = copy.deepcopy(ex.model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        ex.loss_fn(ref, x, y).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
