"""inplace_ops: run an elementwise op in place when its input dies with it.

In a conv -> batch-norm -> ReLU chain the ReLU's input is read by nobody after the ReLU, yet
``relu`` allocates a third activation-sized buffer next to the two already alive. When the
schedule is final, an op ``y = f(x, ...)`` becomes ``f_(x, ...)`` (``relu_``, ``add_``,
``hardtanh_``, ...) if

* ``x`` is a storage the step allocated (not a parameter, buffer, batch tensor or a view of
  one), and ``x`` is that storage's own node (not a view of it);
* no node after ``y`` reads any alias of that storage, and no other argument of ``f`` aliases it;
* ``y`` has exactly ``x``'s shape, strides and dtype (no broadcasting into ``x``, no type
  promotion).

Autograd is not involved (the graph is already differentiated): a tensor saved for the backward
pass is read later, so it never qualifies. This is the in-place reuse of MCU training engines
(Tiny Training's TinyEngine), decided once at compile time. The memory plan is made after it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import PassResult
from .plan_memory import flat, storages_of

aten = torch.ops.aten

# out-of-place op -> (in-place op, argument positions that may take the output, commutative)
INPLACE = {
    aten.relu.default: (aten.relu_.default, (0,)),
    aten.hardtanh.default: (aten.hardtanh_.default, (0,)),
    aten.sigmoid.default: (aten.sigmoid_.default, (0,)),
    aten.tanh.default: (aten.tanh_.default, (0,)),
    aten.silu.default: (aten.silu_.default, (0,)),
    aten.neg.default: (aten.neg_.default, (0,)),
    aten.add.Tensor: (aten.add_.Tensor, (0, 1)),
    aten.mul.Tensor: (aten.mul_.Tensor, (0, 1)),
    aten.sub.Tensor: (aten.sub_.Tensor, (0,)),
    aten.div.Tensor: (aten.div_.Tensor, (0,)),
    aten.add.Scalar: (aten.add_.Scalar, (0,)),
    aten.mul.Scalar: (aten.mul_.Scalar, (0,)),
}
if hasattr(aten, "gelu_"):
    INPLACE[aten.gelu.default] = (aten.gelu_.default, (0,))


def _same_layout(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.stride() == b.stride() and a.device == b.device)


def inplace_ops(gm: fx.GraphModule, layout=None) -> PassResult:
    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    _, root, made = storages_of(graph, layout)
    last_read = {}                                  # storage id -> position of its last reader
    for n in nodes:
        for a in n.all_input_nodes:
            for s in flat(root.get(a)):
                last_read[id(s)] = max(last_read.get(id(s), -1), pos[n])
    changed = False
    for n in nodes:
        spec = INPLACE.get(n.target) if n.op == "call_function" else None
        if spec is None or n.kwargs:
            continue
        target, slots = spec
        for k in slots:
            if k >= len(n.args) or not isinstance(n.args[k], fx.Node):
                continue
            x = n.args[k]
            sx = made.get(x)
            if not sx or len(sx) != 1 or root.get(x) is not sx[0]:
                continue                            # x must own a fresh storage (not a view)
            s = sx[0]
            if last_read.get(id(s)) != pos[n]:
                continue                            # someone reads x after n
            others = [a for i, a in enumerate(n.args) if i != k and isinstance(a, fx.Node)]
            if any(o2 is s for a in others for o2 in flat(root.get(a))):
                continue
            if not _same_layout(x.meta.get("val"), n.meta.get("val")):
                continue
            args = list(n.args)
            if k != 0:                              # commutative: put x first
                args[0], args[k] = args[k], args[0]
                if not _same_layout(x.meta.get("val"), n.meta.get("val")):
                    continue
            n.target = target
            n.args = tuple(args)
            old = made.get(n, [])
            root[n], made[n] = s, [s]               # n now writes and returns x's storage
            last_read[id(s)] = max([last_read.get(id(o), -1) for o in old] + [pos[n]])
            changed = True
            break
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
