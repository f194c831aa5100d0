"""Foreach (multi-tensor) optimizer updates: many small trained tensors are updated by one
``torch._foreach_*`` op per arithmetic step; bit-identical to the per-tensor update, and the
step still matches torch.optim."""
import copy
import importlib

import pytest
import torch

import pockc
from pockc import zoo
from pockc.passes.fx_utils import mutated_args
from pockc.passes.schedule_updates import storage_roots
from pockc.runtime.optim import SGD, AdamW
from tests.oracle import assert_match, compiled_and_eager

io = importlib.import_module("pockc.passes.insert_optimizer")  # the module (the package exports the function)

OPTIMIZERS = [
    SGD(lr=0.1), SGD(lr=0.1, momentum=0.9), SGD(lr=0.1, momentum=0.9, dampening=0.3),
    SGD(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True), SGD(lr=0.1, momentum=0.5, maximize=True),
    AdamW(lr=1e-3), AdamW(lr=1e-3, amsgrad=True, weight_decay=0.0), AdamW(lr=1e-3, maximize=True),
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_foreach_form_is_bit_identical_to_per_tensor(opt):
    g = torch.Generator().manual_seed(0)
    shapes = [(5,), (3, 4), (7,), (2, 2, 3)]
    ps = [torch.randn(s, generator=g) for s in shapes]
    p1, p2 = [p.clone() for p in ps], [p.clone() for p in ps]
    st1 = [opt.init_state(p) for p in ps]
    st2 = {name: [s[name].clone() for s in st1] for name in opt.state_names}
    for step in range(3):
        scalars = {k: torch.tensor(v, dtype=torch.float64) for k, v in opt.scalars(step).items()}
        gs = [torch.randn(s, generator=g) for s in shapes]
        for p, gr, st in zip(p1, gs, st1):
            opt.update(p, gr, st, scalars)
        opt.update_foreach(p2, gs, st2, scalars)
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    for name in opt.state_names:
        for s, t in zip(st1, st2[name]):
            assert torch.equal(s[name], t)


def _update_groups(gm):
    out = {}
    for n in gm.graph.nodes:
        if n.meta.get("pockc.role") == "update":
            out.setdefault(n.meta["pockc.param"], []).append(n)
    return out


def test_bias_only_mobilenet_updates_its_small_tensors_in_one_group():
    ex = zoo.mobilenet_v2()
    opt = pockc.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4, nesterov=True)
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "bias", opt, steps=3)
    gm = step.graph
    groups = _update_groups(gm)
    fe = [k for k in groups if k.startswith("foreach[")]
    assert len(fe) == 1
    members = groups[fe[0]]
    names = members[0].meta["pockc.params"]
    assert sorted(names) == sorted(step.update_plan.trainable_names())   # every bias is small
    assert len(groups) == 1                                             # no per-tensor update left
    ops = {str(n.target) for n in members if n.op == "call_function"}
    assert all("_foreach_" in o or "getitem" in o for o in ops), ops
    # The group writes each parameter only after every node that reads it (batch norm's backward
    # reads its weight) -- schedule_updates sees the list arguments of the _foreach_*_ ops.
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    roots = storage_roots(gm.graph)
    inside = set(members)
    written = {roots[w] for m in members for w in mutated_args(m)}
    assert len(written) >= len(names)
    first = min(pos[m] for m in members)
    for n in nodes:
        if n not in inside and any(roots[a] in written for a in n.all_input_nodes):
            assert pos[n] < first, f"{n.name} reads a parameter after the foreach update"
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-4, atol=1e-5)
    assert_match(m_c, m_e, original, step.update_plan, rtol=1e-4, atol=1e-5)


def test_matrices_and_large_vectors_keep_their_own_update(monkeypatch):
    monkeypatch.setattr(io, "FOREACH_MAX_NUMEL", 32)   # zoo.bert: 22 vectors of <= 32, two of 64
    ex = zoo.bert()
    ex.model.double()   # float64: BERT's key bias has ~0 gradient, which AdamW turns float32 noise on into steps
    opt = pockc.AdamW(lr=1e-3)
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "full", opt, steps=2)
    groups = _update_groups(step.graph)
    params = dict(m_c.named_parameters())
    fe = [k for k in groups if k.startswith("foreach[")]
    assert len(fe) == 1
    grouped = set(groups[fe[0]][0].meta["pockc.params"])
    assert grouped and all(params[n].dim() == 1 and params[n].numel() <= 32 for n in grouped)
    singles = set(groups) - set(fe)                 # matrices, and vectors over the size limit
    assert singles and all(params[n].dim() > 1 or params[n].numel() > 32 for n in singles)
    assert any(params[n].dim() == 1 for n in singles) and any(params[n].dim() > 1 for n in singles)
    assert_match(m_c, m_e, original, step.update_plan, rtol=1e-10, atol=1e-12)


def test_few_small_tensors_and_custom_updates_stay_per_tensor():
    ex = zoo.mlp()   # 10 trained tensors: fewer than FOREACH_MIN_TENSORS
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full")
    assert not any(k.startswith("foreach[") for k in _update_groups(step.graph))

    class ClippedSGD(pockc.SGD):        # overrides update() only: its arithmetic must be kept
        def update(self, p, g, state, s):
            super().update(p, g.clamp(-1, 1), state, s)

    assert pockc.SGD().has_foreach and not ClippedSGD().has_foreach
    ex = zoo.mobilenet_v2()
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="bias",
                         optimizer=ClippedSGD(lr=0.1))
    groups = _update_groups(step.graph)
    assert not any(k.startswith("foreach[") for k in groups) and len(groups) == len(step.layout.grads)


def test_lr_change_takes_effect_in_the_foreach_group():
    ex = zoo.mobilenet_v2()
    model = copy.deepcopy(ex.model)
    step = pockc.compile(model, ex.loss_fn, ex.example_batch, update="bias", optimizer=pockc.SGD(lr=0.1))
    assert any(k.startswith("foreach[") for k in _update_groups(step.graph))
    step.optimizer.lr = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(*ex.example_batch)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
