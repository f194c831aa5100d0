"""Backends: backend= in pockc.compile; the Inductor lowering against the eager oracle."""
import copy

import pytest
import torch

import pockc
from pockc import zoo
from pockc.runtime import backends
from tests.oracle import assert_match, eager_steps


def test_unknown_backend_is_a_one_line_error():
    ex = zoo.mlp()
    with pytest.raises(pockc.CompileError, match=r"unknown backend 'tvm'; use one of: aten, inductor"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, backend="tvm")


def test_default_backend_is_aten_on_cpu_and_runs_the_fx_graph():
    ex = zoo.mlp()
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch)
    assert step.backend == backends.default_backend("cpu") == "aten"
    step(*ex.example_batch)
    assert step._lowered == {}  # aten runs the GraphModule itself


@pytest.mark.slow
def test_inductor_matches_the_oracle_and_updates_in_place():
    """Train-mode BN (running stats mutated in place), SGD momentum state, a channel-sparse conv."""
    torch.manual_seed(0)
    ex = zoo.small_cnn(batch=4, image=16)
    opt = pockc.SGD(lr=0.1, momentum=0.9)
    update = ["last:2", {"features.2.0.weight": "channels:0.5"}]
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    step = pockc.compile(m_c, ex.loss_fn, ex.example_batch, update=update, optimizer=opt, backend="inductor")
    w_before = m_c.fc.weight
    lc = [step(*ex.example_batch) for _ in range(3)]
    assert len(step._lowered) == 1 and m_c.fc.weight is w_before
    le = eager_steps(m_e, ex.loss_fn, [ex.example_batch] * 3, step.update_plan, opt)
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, ex.model, step.update_plan, rtol=1e-4, atol=1e-5)
    name = step.update_plan.trainable_names()[0]  # the compiled step wrote into the user's module
    assert not torch.equal(dict(m_c.named_parameters())[name], dict(ex.model.named_parameters())[name])


class _Recurrent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_a_recurrent_layer_is_refused_by_inductor_in_compile_and_finetune():
    import torch.nn.functional as F
    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 4), torch.tensor([0, 2])

    def loss_fn(model, x, y):
        return F.cross_entropy(model(x), y)

    for build in (pockc.compile, pockc.finetune):
        model = _Recurrent()
        kw = {"update": "full"} if build is pockc.compile else {"update": {"*": "full"}}
        with pytest.raises(pockc.CompileError, match="recurrent layer .* cannot run it: use backend='aten'"):
            build(model, loss_fn, (x, y), backend="inductor", **kw)
        assert build(model, loss_fn, (x, y), backend="aten", **kw).backend == "aten"
