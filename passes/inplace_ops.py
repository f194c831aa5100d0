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

Batch norm (``native_batch_norm``, train or eval mode) writes its normalized output into a dying
input of the same layout (float32 on CPU, contiguous or channels-last): in a frozen stage nothing
saves a convolution's output for the backward, so the BN after it need not allocate a second
activation-sized buffer. Train mode becomes ``native_batch_norm.out(x, w, b, running_mean,
running_var, True, momentum, eps, out=x, save_mean=e1, save_invstd=e2)`` (the out= overload of the
same op: the same CPU kernel, updating the running statistics in place as the op does; registered
in ``HIDDEN_MUTATION``. ``_native_batch_norm_legit.out``, whose schema marks that write, is not
used: torch.export's functionalization mixes up its outputs, which breaks the ExecuTorch target);
eval mode ``_native_batch_norm_legit_no_training.out`` (running statistics only
read); train mode without running statistics ``_native_batch_norm_legit.no_stats_out``. ``e1``,
``e2`` are ``aten.empty`` nodes of the saved mean / inverse std's shapes ([C] in train mode, [0] in
eval mode, as the kernel makes them) placed right before the BN, so the planner counts them;
readers of the BN's outputs 1 and 2 read them directly. The CPU kernel computes the statistics
first and then normalizes element by element (each element read before it is written at the same
position): with ``out`` aliasing ``input`` it is bit-identical to the out-of-place op (checked in
tests/test_inplace_bn.py for NCHW / channels-last, train / eval). ``BATCH_NORM = False`` (or
``inplace_ops(..., batch_norm=False)``) turns this rewrite off.

Autograd is not involved (the graph is already differentiated): a tensor saved for the backward
pass is read later, so it never qualifies. This is the in-place reuse of MCU training engines
(Tiny Training's TinyEngine), decided once at compile time. The memory plan is made after it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import PassResult, is_view, same_layout as _same_layout
from .plan_memory import _nbytes, flat, storages_of

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


BATCH_NORM = True     # module switch: batch norm writes its output into a dying input

_BN = aten.native_batch_norm.default
# the out= forms batch norm is rewritten to (train mode, train mode without running stats, eval mode)
BN_OUT_OPS = (aten.native_batch_norm.out, aten._native_batch_norm_legit.no_stats_out,
              aten._native_batch_norm_legit_no_training.out)
_BN_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _bn_layout_ok(v) -> bool:
    """The layouts whose aliased BN the CPU kernel was checked for: dense float32 on CPU."""
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.device.type != "cpu":
        return False
    for fmt in _BN_FORMATS:
        if (fmt is torch.channels_last and v.dim() != 4) or (fmt is torch.channels_last_3d and v.dim() != 5):
            continue
        if v.is_contiguous(memory_format=fmt):
            return True
    return False


def _bn_into_input(graph, n, x):
    """Rewrite ``n = native_batch_norm(x, w, b, rm, rv, training, momentum, eps)`` to write its
    output into ``x`` (see the module docstring). Returns False where it does not apply."""
    args = list(n.args)
    if len(args) != 8 or not isinstance(args[5], bool):
        return False
    val = n.meta.get("val")
    if not isinstance(val, (tuple, list)) or len(val) != 3 or not _bn_layout_ok(x.meta.get("val")):
        return False
    if not _same_layout(x.meta.get("val"), val[0]):
        return False
    w, b, rm, rv, training, momentum, eps = args[1:]
    if training and rm is not None and rv is not None:
        target, outs = aten.native_batch_norm.out, ("out", "save_mean", "save_invstd")
        new_args = (x, w, b, rm, rv, True, momentum, eps)
    elif training and rm is None and rv is None:
        target, outs = aten._native_batch_norm_legit.no_stats_out, ("out", "save_mean", "save_invstd")
        new_args = (x, w, b, True, momentum, eps)
    elif not training and rm is not None and rv is not None:
        target, outs = aten._native_batch_norm_legit_no_training.out, ("out0", "out1", "out2")
        new_args = (x, w, b, rm, rv, momentum, eps)
    else:
        return False
    for v in val[1:]:
        if not isinstance(v, torch.Tensor):
            return False
    meta = {k: v for k, v in n.meta.items() if k.startswith("pockc.")}
    empties = []
    with graph.inserting_before(n):
        for k, v in ((1, val[1]), (2, val[2])):
            e = graph.call_function(aten.empty.memory_format, (list(v.shape),),
                                    {"dtype": v.dtype, "device": v.device})
            e.meta.update(meta)
            e.meta["val"] = v
            empties.append(e)
    n.target = target
    n.args = new_args
    n.kwargs = dict(zip(outs, (x, *empties)))
    n.meta["val"] = (x.meta["val"], val[1], val[2])
    for u in list(n.users):                 # outputs 1 and 2 are the empties: read them directly
        if u.op == "call_function" and u.target is operator.getitem and u.args[1] in (1, 2):
            u.replace_all_uses_with(empties[u.args[1] - 1])
            graph.erase_node(u)
    return True


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


def _bn_input_storage(x, root, made):
    """The fresh storage ``x`` covers entirely: its own (``_own_storage``), or that of a chain of
    views ending at such a storage when ``x`` spans all of it (a 1x1 convolution run as one GEMM:
    ``as_strided(mm(...))`` in channels-last order). Else None."""
    s = _own_storage(x, root, made)
    if s is not None:
        return s
    base = x
    while is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    if base is x:
        return None
    s = _own_storage(base, root, made)
    v = x.meta.get("val")
    if s is None or root.get(x) is not s or not isinstance(v, torch.Tensor):
        return None
    if v.storage_offset() != 0 or _nbytes(v) != s.nbytes or not _bn_layout_ok(v):
        return None
    return s


def inplace_ops(gm: fx.GraphModule, layout=None, batch_norm: bool | None = None) -> PassResult:
    """``batch_norm``: write batch norm into its dying input (None: ``BATCH_NORM``). A portable
    graph (pockc.api.build_graph ``portable=True``, exported to ExecuTorch) passes False: its
    torch.export decomposition leaves ``native_batch_norm.out`` as a non-core op, and its own
    memory planner has no use for the rewrite."""
    if batch_norm is None:
        batch_norm = BATCH_NORM
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
        if batch_norm and n.op == "call_function" and n.target is _BN and not n.kwargs and n.args \
                and isinstance(n.args[0], fx.Node):
            x = n.args[0]
            s = _bn_input_storage(x, root, made)
            if (s is None or last_read.get(id(s)) != pos[n]
                    or any(moved.get(id(o2), o2) is s for a in n.args[1:] if isinstance(a, fx.Node)
                           for o2 in flat(root.get(a)))):
                continue                            # x not fresh, read after n, or another argument
            if not _bn_into_input(graph, n, x):
                continue
            olds = root.get(n) if isinstance(root.get(n), list) else [None, None, None]
            root[n] = [s, None, None]               # output 0 is x's storage (1, 2: the empties)
            made[n] = [s]
            for u in n.users:                       # output 0's getitem: x's storage too
                if u.target is operator.getitem and u.args[1] == 0:
                    root[u] = s
            if olds[0] is not None:
                moved[id(olds[0])] = s
            last_read[id(s)] = max([last_read.get(id(o), -1) for o in olds[:1] if o is not None] + [pos[n]])
            changed = True
            continue
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
