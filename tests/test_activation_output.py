"""activation_output + inplace_ops: ReLU6's backward reads the activation's output, so its input
(batch norm's output) dies at the ReLU6, which then runs in place; the backward writes into the
gradient it consumes. Fewer activation-sized buffers, the same numbers as eager."""
import copy
import operator

import torch

import pockc
from pockc import zoo
from pockc.api import build_graph
from pockc.passes.activation_output import activation_output
from pockc.passes.fx_utils import PassResult
from pockc.passes.plan_memory import plan_memory
from pockc.trace import analyze_forward
from pockc.plan import resolve_update
from tests.oracle import assert_match, compiled_and_eager

aten = torch.ops.aten
SGD = pockc.SGD(lr=0.05, momentum=0.9)


def _nodes(gm, *targets):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def test_relu6_backward_reads_its_output_and_both_run_in_place():
    ex = zoo.mobilenet_v2()
    m_c, m_e, original, step, lc, le = compiled_and_eager(ex, "last:2", SGD, steps=3)
    gm = step.graph
    backs = _nodes(gm, aten.hardtanh_backward.default, aten.hardtanh_backward.grad_input)
    assert backs
    for b in backs:                      # the mask comes from the ReLU6's output
        assert b.args[1].target in (aten.hardtanh.default, aten.hardtanh_.default), b.format_node()
    # Every ReLU6 now overwrites batch norm's output (nobody reads that output afterwards) ...
    fwd = _nodes(gm, aten.hardtanh.default, aten.hardtanh_.default)
    assert fwd and all(n.target is aten.hardtanh_.default for n in fwd)
    assert any(n.args[0].target is operator.getitem for n in fwd)
    # ... and each backward whose incoming gradient dies there writes into it.
    for b in backs:
        if b.target is aten.hardtanh_backward.grad_input:
            assert b.kwargs["grad_input"] is b.args[0]
    assert any(b.target is aten.hardtanh_backward.grad_input for b in backs)
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=1e-5, atol=1e-6)
    assert_match(m_c, m_e, original, step.update_plan)


def test_bit_identical_gradients_and_a_lower_peak(monkeypatch):
    ex = zoo.mobilenet_v2(batch=2, image=64, width=0.25)
    order = analyze_forward(ex.model, ex.loss_fn, ex.example_batch)
    plan = resolve_update("bias", ex.model, order)
    gm, layout = build_graph(ex.model, ex.loss_fn, ex.example_batch, plan, SGD)
    with_pass = plan_memory(gm, layout).peak_bytes
    import pockc.api as api
    monkeypatch.setattr(api, "activation_output", lambda g, *a: PassResult(g, False))
    gm0, layout0 = build_graph(ex.model, ex.loss_fn, ex.example_batch, plan, SGD)
    without = plan_memory(gm0, layout0).peak_bytes
    # One batch-norm output per ReLU6 block is no longer kept for the backward pass.
    assert with_pass < 0.8 * without, (with_pass, without)
    # Same inputs, same program up to the rewrite: both steps give bit-identical parameters.
    models = [copy.deepcopy(ex.model) for _ in range(2)]
    for g, m in ((gm, models[0]), (gm0, models[1])):
        step = pockc.compile(m, ex.loss_fn, ex.example_batch, update="bias", optimizer=copy.deepcopy(SGD))
        step._graphs[step._key] = g
        torch.manual_seed(0)                        # the same dropout mask in both
        step(*ex.example_batch)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


def test_only_matching_bounds_are_rewritten():
    # A hardtanh_backward whose forward used other bounds (or none in the graph) is left alone.
    import torch.fx as fx
    g = fx.Graph()
    y, grad = g.placeholder("y"), g.placeholder("grad")
    z = g.call_function(aten.hardtanh.default, (y, 0.0, 6.0))
    b1 = g.call_function(aten.hardtanh_backward.default, (grad, y, 0.0, 6.0))
    b2 = g.call_function(aten.hardtanh_backward.default, (grad, y, -1.0, 1.0))
    g.output((z, b1, b2))
    gm = fx.GraphModule(torch.nn.Module(), g)
    assert activation_output(gm).modified
    assert b1.args[1] is z and b2.args[1] is y
    t, gr = torch.randn(64) * 8, torch.randn(64)
    ref = (t.clamp(0, 6), aten.hardtanh_backward(gr, t, 0.0, 6.0), aten.hardtanh_backward(gr, t, -1.0, 1.0))
    for a, b in zip(gm(t, gr), ref):
        assert torch.equal(a, b)
