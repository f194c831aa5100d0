"""activation_output: differentiate ReLU6 / hardtanh from its output, so its input can die.

``hardtanh_backward(g, y, lo, hi)`` passes ``g`` where ``lo < y < hi`` and zeroes it elsewhere. For
``z = hardtanh(y, lo, hi)`` (``lo < hi``) the same mask is ``lo < z < hi``: ``y <= lo`` gives
``z == lo``, ``y >= hi`` gives ``z == hi``, and in between ``z == y`` (a NaN stays a NaN in both).
So the backward may read the activation's *output*, which the next layer keeps anyway, instead of
its input -- the batch-norm output of a conv-BN-ReLU6 block, which autograd saves for this one
use. With the rewrite the input is read by nobody after the ReLU6, and passes.inplace_ops turns
``hardtanh`` into ``hardtanh_`` over it: one activation-sized buffer less per block for the whole
backward pass, and one pass over memory less (no fresh output buffer to fill) in the forward.

Invariant: bit-identical gradients (the mask is the same, the kept values are ``g`` itself).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import PassResult

aten = torch.ops.aten


def _bounds(node):
    args = list(node.args) + [None] * 3
    lo = args[1] if args[1] is not None else node.kwargs.get("min_val", -1.0)
    hi = args[2] if args[2] is not None else node.kwargs.get("max_val", 1.0)
    return lo, hi


def activation_output(gm: fx.GraphModule, layout=None) -> PassResult:
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.hardtanh_backward.default:
            continue
        g, y, lo, hi = node.args[:4]
        if not (isinstance(y, fx.Node) and isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo < hi):
            continue
        outs = [u for u in y.users if u.op == "call_function" and u.target is aten.hardtanh.default
                and _bounds(u) == (lo, hi) and u.args[0] is y]
        if not outs:
            continue
        node.update_arg(1, outs[0])
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
