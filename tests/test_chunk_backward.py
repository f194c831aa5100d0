"""chunk_backward (passes/chunk_backward.py): gelu_backward and train-mode batch-norm backward write
their result into a dying input, chunk by chunk along the batch. The graph has the rewritten nodes
and no functional op left, the numbers equal the kernels (gelu bit for bit, batch norm to float32
rounding: rtol 1e-5, atol 1e-6), compiled steps equal eager autograd + torch.optim over 3 steps
(also after rematerialize at its floor), the planned peak drops where it sat at such a node, and the
plan equals the allocator-measured peak."""
import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import pockc
import pockc.passes.chunk_backward as cb
from pockc import zoo
from pockc.api import plan_step_memory
from pockc.memory import StepMemory
from pockc.passes.chunk_backward import chunk_backward
from pockc.passes.plan_memory import plan_memory
from pockc.passes.rematerialize import rematerialize
from pockc.runtime.memory import measure_peak
from pockc.runtime.program import graph_from_json, graph_to_json
from pockc.runtime.train_step import TrainStep
from tests import reference
from tests.oracle import assert_match, eager_steps

aten = torch.ops.aten
OPT = dict(lr=0.01, momentum=0.9)
EPS = 1e-5


def _chunked(gm):
    return [n.meta["pockc.chunked"] for n in gm.graph.nodes if "pockc.chunked" in n.meta]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _bn_fn(keep_x=False):
    """x and g are made in the graph (fresh storages) and die at the backward unless returned."""
    def f(g0, x0, w, rm, rv):
        x = x0 * 1.5 + 0.5
        g = g0 * 2.0
        mean = x.mean([0, 2, 3])
        invstd = torch.rsqrt(x.var([0, 2, 3], unbiased=False) + EPS)
        gi, gw, gb = aten.native_batch_norm_backward(g, x, w, rm, rv, mean, invstd, True, EPS, [True, True, True])
        return (gi, gw, gb, x) if keep_x else (gi, gw, gb)
    return f


def _bn_inputs(channels_last, n=6, c=5, hw=7):
    gen = torch.Generator().manual_seed(0)
    g0, x0 = torch.randn(n, c, hw, hw, generator=gen), torch.randn(n, c, hw, hw, generator=gen) * 3 + 2
    if channels_last:
        g0, x0 = (t.contiguous(memory_format=torch.channels_last) for t in (g0, x0))
    return g0, x0, torch.randn(c, generator=gen), torch.zeros(c), torch.ones(c)


def test_gelu_backward_into_grad_is_exact():
    """The premise of the gelu rewrite: grad_input aliasing grad, whole, gives the functional op's
    bits. In chunks it is equal to float32 rounding only: the kernel's vectorized loop and its
    scalar tail round tanh differently, and a chunk boundary moves which elements take the tail."""
    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(4, 33, 65, generator=gen), torch.randn(4, 33, 65, generator=gen)
    for approximate in ("none", "tanh"):
        ref = aten.gelu_backward(g, x, approximate=approximate)
        whole = g.clone()
        aten.gelu_backward.grad_input(whole, x, approximate=approximate, grad_input=whole)
        assert torch.equal(whole, ref)
        into = g.clone()
        for i, j in ((0, 1), (1, 4)):
            aten.gelu_backward.grad_input(into[i:j], x[i:j], approximate=approximate, grad_input=into[i:j])
        torch.testing.assert_close(into, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("prefer,chunks", [(("input", "grad"), None), (("grad", "input"), None),
                                           (("grad", "input"), 4), (("input", "grad"), 3)])
def test_batch_norm_backward_unit(monkeypatch, channels_last, prefer, chunks):
    monkeypatch.setattr(cb, "BN_PREFER", prefer)
    inputs = _bn_inputs(channels_last)
    gm = make_fx(_bn_fn(), tracing_mode="fake")(*inputs)
    ref = gm(*inputs)
    before = plan_memory(gm)
    assert chunk_backward(gm, None, 0, chunks).modified
    info = _chunked(gm)
    want = chunks if chunks is not None else (cb.DEFAULT_BN_CHUNKS if prefer[0] == "grad" else 1)
    assert info == [{"op": "native_batch_norm_backward", "into": prefer[0], "chunks": want}]
    masks = [n.args[9] for n in gm.graph.nodes if n.target is aten.native_batch_norm_backward.default]
    assert masks == [[False, True, True]]          # only the reductions are left to the kernel
    got = gm(*inputs)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)   # float32 rounding, not bitwise
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])  # the kernel's own reductions
    assert got[0].stride() == ref[0].stride()

    # memory: the output lives in the dying input, so the peak drops by (most of) a map; the plan
    # bounds the allocator-measured peak (inputs are persistent in the plan, outside the measurement;
    # the graph called directly, not through a step's bindings, skips a few bytes of wrapped scalars
    # that the workspace measurement counts; the steps below assert equality)
    after = plan_memory(gm)
    nbytes = ref[0].numel() * 4
    extra = nbytes // want if prefer[0] == "grad" else 0     # the chunk of (x - mean) * k
    assert after.peak_bytes <= before.peak_bytes - nbytes + extra + 1024
    _, measured = measure_peak(gm, *inputs)
    assert 0 <= after.peak_bytes - after.persistent_bytes - measured <= 64

    # a saved program runs it without the compiler
    d, consts = graph_to_json(gm)
    again = graph_from_json(d, consts)(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(again, got))


def test_batch_norm_backward_left_alone_when_no_input_dies():
    inputs = _bn_inputs(False)
    gm = make_fx(_bn_fn(keep_x=True), tracing_mode="fake")(*inputs)
    # g dies at the backward, x is returned: g takes the result
    assert chunk_backward(gm, None, 0).modified and _chunked(gm)[0]["into"] == "grad"
    # above min_bytes only
    gm = make_fx(_bn_fn(), tracing_mode="fake")(*inputs)
    assert not chunk_backward(gm, None, inputs[0].numel() * 4 + 1).modified

    def f(g, x0, w, rm, rv):           # g is a graph input (not the step's to overwrite), x returned
        x = x0 + 1
        mean, invstd = x.mean([0, 2, 3]), torch.rsqrt(x.var([0, 2, 3], unbiased=False) + EPS)
        return aten.native_batch_norm_backward(g, x, w, rm, rv, mean, invstd, True, EPS, [True, True, True])[0], x
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    assert not chunk_backward(gm, None, 0).modified
    assert aten.native_batch_norm_backward.default in _targets(gm)


def _step_on(graph, base, model, opt):
    """A TrainStep over ``graph`` (the compiled step's layout, plan and batch), planned afresh."""
    step = TrainStep(model, graph, base.layout, opt, base.update_plan, base._example)
    step.memory = StepMemory(step, plan_step_memory(graph, base.layout))
    return step


def _run_and_compare(ex, transform, steps=3):
    """Compile full fine-tuning, rewrite a copy of its graph with ``transform``, run ``steps``
    steps of that and of eager PyTorch from the same seed; the plan equals the measured peak."""
    opt = pockc.SGD(**OPT)
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    base = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full", optimizer=opt)
    gm = transform(copy.deepcopy(base.graph), base.layout)
    step = _step_on(gm, base, m_c, opt)
    batches = reference.varied_batches(ex.example_batch, steps, 0)
    torch.manual_seed(0)
    measured = step.memory.measure(*batches[0])
    assert measured == step.memory.peak_bytes
    lc = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    torch.manual_seed(0)
    le = eager_steps(m_e, ex.loss_fn, batches, reference.resolve("full", ex.model, ex.loss_fn, ex.example_batch), opt)
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, ex.model, step.update_plan, rtol=1e-5, atol=1e-6)
    return base, gm


@pytest.mark.parametrize("prefer,chunks", [(("input", "grad"), None), (("grad", "input"), 2)])
def test_resnet_step_matches_eager(monkeypatch, prefer, chunks):
    monkeypatch.setattr(cb, "BN_PREFER", prefer)
    base, gm = _run_and_compare(zoo.resnet(), lambda g, lay: chunk_backward(g, lay, 0, chunks).graph_module)
    info = _chunked(gm)
    n_bn = sum(t is aten.native_batch_norm_backward.default for t in _targets(base.graph))
    assert len(info) == n_bn    # every batch norm backward has a dying input (x always, g mostly)
    assert {i["into"] for i in info} == ({"input"} if prefer[0] == "input" else {"grad", "input"})
    if chunks == 2:
        assert all(i["chunks"] == 2 for i in info if i["into"] == "grad")
    assert all(n.args[9] == [False, True, True] for n in gm.graph.nodes
               if n.target is aten.native_batch_norm_backward.default)


def test_bert_step_matches_eager():
    """Dropout inside: both sides seeded alike. gelu_backward writes into its incoming gradient."""
    base, gm = _run_and_compare(zoo.bert(), lambda g, lay: chunk_backward(g, lay, 0).graph_module)
    assert [i["op"] for i in _chunked(gm)] == ["gelu_backward"] * 2
    assert aten.gelu_backward.default not in _targets(gm)
    assert aten.gelu_backward.grad_input in _targets(gm)


def test_resnet_after_rematerialize_floor_matches_eager():
    """chunk_backward first, then rematerialize at budget 1 (recomputes and pages through the
    rewritten nodes): still eager's numbers, and the plan still equals the measured peak."""
    def both(g, lay):
        g = chunk_backward(g, lay, 0).graph_module
        g = rematerialize(g, lay, 1).graph_module
        rep = g.meta["pockc.remat"]
        assert rep.recomputed or rep.paged
        return g
    _run_and_compare(zoo.resnet(), both)


def test_peak_at_gelu_backward_drops():
    """A BERT whose no-recompute peak sits at gelu_backward: the rewritten step plans a lower
    peak, and the allocator measures exactly that."""
    ex = zoo.bert(batch=4, seq=32, ffn=256)
    base = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full",
                         optimizer=pockc.SGD(**OPT))
    before = base.memory.plan
    nodes = {n.name: n for n in base.graph.graph.nodes}
    assert nodes[before.peak_node].target is aten.gelu_backward.default
    gm = chunk_backward(copy.deepcopy(base.graph), base.layout, 1 << 16).graph_module
    step = _step_on(gm, base, copy.deepcopy(ex.model), pockc.SGD(**OPT))
    after = step.memory.plan
    assert after.peak_bytes < before.peak_bytes
    torch.manual_seed(0)
    assert step.memory.measure(*ex.example_batch) == after.peak_bytes

    # the floor of recomputing / paging (budget 1) moves too: there it is also gelu_backward's map
    def floor(g):
        return rematerialize(copy.deepcopy(g), base.layout, 1, solver="greedy").graph_module.meta["pockc.remat"]
    f0, f1 = floor(base.graph), floor(gm)
    assert f1.required_after < f0.required_after, (f0.required_after, f1.required_after)
