"""inplace_ops: run an elementwise op in place when its input dies with it.

In a conv -> batch-norm -> ReLU chain the ReLU's input is read by nobody after the ReLU, yet
``relu`` allocates a third activation-sized buffer next to the two already alive. When the
schedule is final, an op ``y = f(x, ...)`` becomes ``f_(x, ...)`` (``relu_``, ``add_``,
``hardtanh_``, ...) if

* ``x`` is a storage the step allocated (not a parameter, buffer, batch tensor or a view of
  one), and ``x`` is that storage's own node (not a view of it) -- the result of a single-output
  op, or one output of a multi-output op such as batch norm's normalized output;
* no node after ``y`` reads any alias of that storage, and no other argument of ``f`` aliases it;
* ``y`` has exactly ``x``'s shape, strides and dtype (no broadcasting into ``x``, no type
  promotion).

Elementwise backward ops that have no in-place form (``hardtanh_backward``,
``threshold_backward``) write into a dying input through their out= overload (``INTO_INPUT``).

Autograd is not involved (the graph is already differentiated): a tensor saved for the backward
pass is read later, so it never qualifies. This is the in-place reuse of MCU training engines
(Tiny Training's TinyEngine), decided once at compile time. The memory plan is made after it.
"""
from __future__ import annotations

import operator

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

# Elementwise backward ops without an in-place form: their out= overload may take a dying input as
# the output (every element is read before it is written at the same position). Measured for
# ReLU6's backward over 8x96x64x64 channels-last (1 thread): 2.99 ms out of place, 2.46 ms into
# the incoming gradient. (Batch norm's backward.out is slower than the functional op: not used.)
# out-of-place op -> (out= op, its output keyword, argument positions that may take the output)
INTO_INPUT = {
    aten.hardtanh_backward.default: (aten.hardtanh_backward.grad_input, "grad_input", (0, 1)),
    aten.threshold_backward.default: (aten.threshold_backward.grad_input, "grad_input", (0, 1)),
}


def _same_layout(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.stride() == b.stride() and a.device == b.device)


def _own_storage(x, root, made):
    """The fresh storage ``x`` is the tensor of (not a view into), else None: a single-output op's
    result, or one output of a multi-output op taken with ``getitem`` (batch norm's output)."""
    sx = made.get(x)
    if sx and len(sx) == 1 and root.get(x) is sx[0]:
        return sx[0]
    if x.op == "call_function" and x.target is operator.getitem and isinstance(x.args[0], fx.Node):
        s = root.get(x)
        if not isinstance(s, list) and s is not None and any(s is m for m in made.get(x.args[0], ())):
            return s
    return None


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
    moved = {}                                      # id(storage no longer made) -> the one used
    changed = False
    for n in nodes:
        spec = INPLACE.get(n.target) or INTO_INPUT.get(n.target) if n.op == "call_function" else None
        if spec is None or n.kwargs:
            continue
        target, slots, out_kw = (spec[0], spec[1], None) if len(spec) == 2 else (spec[0], spec[2], spec[1])
        for k in slots:
            if k >= len(n.args) or not isinstance(n.args[k], fx.Node):
                continue
            x = n.args[k]
            s = _own_storage(x, root, made)
            if s is None:
                continue                            # x must own a fresh storage (not a view)
            if last_read.get(id(s)) != pos[n]:
                continue                            # someone reads x after n
            others = [a for i, a in enumerate(n.args) if i != k and isinstance(a, fx.Node)]
            if any(moved.get(id(o2), o2) is s for a in others for o2 in flat(root.get(a))):
                continue                            # another argument is x or a view of it
            if not _same_layout(x.meta.get("val"), n.meta.get("val")):
                continue
            args = list(n.args)
            if out_kw is not None:                  # write into x through the out= overload
                n.target = target
                n.kwargs = {out_kw: x}
            elif k != 0:                            # commutative: put x first
                args[0], args[k] = args[k], args[0]
                if not _same_layout(x.meta.get("val"), n.meta.get("val")):
                    continue
            if out_kw is None:
                n.target = target
                n.args = tuple(args)
            old = made.get(n, [])
            root[n], made[n] = s, [s]               # n now writes and returns x's storage
            for o in old:                           # and so do the views of n (root[] of a view
                moved[id(o)] = s                    # still names n's old storage)
            last_read[id(s)] = max([last_read.get(id(o), -1) for o in old] + [pos[n]])
            changed = True
            break
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
