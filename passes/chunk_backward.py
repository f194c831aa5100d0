"""chunk_backward: run large backward temporaries in place, chunk by chunk along the batch.

Under a tight budget (rematerialize at its floor) what remains alive at the peak is often a
backward op's own output next to its inputs: ``native_batch_norm_backward``'s grad_input and
``gelu_backward``'s result are activation-sized and freshly allocated although one of their
inputs (the incoming gradient, or the saved forward tensor) dies right there. This pass rewrites,
for nodes whose output storage is at least ``min_bytes``, the op so its result is written INTO
such a dying input, as plain aten nodes (slices + in-place / out= ops, unrolled over the chunks),
so that the saved program needs no compiler and the memory planner sees every storage:

* ``gelu_backward(grad, x, approximate=a)`` -> ``gelu_backward.grad_input(grad, x, approximate=a,
  grad_input=grad)``: one call by default (the kernel is elementwise and allocates no scratch,
  measured with runtime/memory.py's allocator tracker, and writing into ``grad`` whole is bit for
  bit the functional op); into ``x`` where ``grad`` lives on and ``x`` dies. With ``chunks`` > 1,
  one such call per slice ``[i:j]`` of dim 0: equal to float32 rounding only (the kernel's vector
  loop and scalar tail round tanh differently, and a chunk boundary moves which elements take
  the tail).

* train-mode ``native_batch_norm_backward(g, x, w, rm, rv, save_mean, save_invstd, True, eps,
  mask)``: first the two per-channel reductions, by one call of the same kernel with
  ``output_mask=[False, True, True]`` (grad_weight = sum((x - mean) * g) * invstd, grad_bias =
  sum(g); for that mask the kernel allocates no activation-sized scratch, measured: 256 B), then
  the elementwise part of the kernel's ``(g - grad_bias / N - (x - mean) * k) * a`` (``a = invstd
  * w``, ``k = grad_weight * invstd / N``, ``N`` the elements per channel), rearranged into three
  passes per chunk of dim 0: ``t = x - mean``, ``t = d + t * b``, ``out = t + g * a`` (``b = -a *
  k``, ``d = -a * grad_bias / N``, per channel). Into ``x`` (preferred: x, the saved forward
  input, nearly always dies here): ``t`` is x's own storage and no temporary exists, one chunk by
  default. Into ``g`` (where x lives on): ``t`` is a chunk-sized temporary, ``chunks`` (default 4)
  of them one after another. grad_weight and grad_bias are the kernel's own bits; grad_input
  agrees with the kernel to float32 rounding, not bit for bit (measured against float64: the
  same error as the kernel's, ~1e-6 of the result's scale). Half precision is left alone (each
  op of the chain would round).

An input qualifies as the destination when it is a storage the step allocated (not a parameter,
buffer, batch tensor or state), no node after the op reads any alias of it, no other argument of
the op aliases it, it has the output's shape, strides and dtype, and its storage is no larger than
the output's. The results are views / in-place results of that storage, so plan_memory's alias
tracking (``is_view`` / ``returns_input``) puts them on it; the last chunk is followed by an
``aten.alias`` of the whole destination that the op's users read (the scheduler orders it after
the writes: it reads the storage they write). Nodes with neither input dying are left alone
(writing into a fresh buffer saves nothing: the kernel's scratch for these ops is below 1 KiB).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import PassResult, call, getitem, same_layout as _same_layout
from .plan_memory import _nbytes, flat, storages_of

aten = torch.ops.aten

GELU_BWD = aten.gelu_backward.default
BN_BWD = aten.native_batch_norm_backward.default
DEFAULT_BN_CHUNKS = 4
BN_PREFER = ("input", "grad")     # destination order where both die (measured: x first floors lower)
GELU_PREFER = ("grad", "input")   # the gradient first: a saved activation stays unwritten


def _out_val(n):
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("val")
    return v[0] if isinstance(v, (tuple, list)) else v


def _bounds(n0: int, chunks: int):
    chunks = max(1, min(chunks, n0))
    step, extra = divmod(n0, chunks)
    b, i = [], 0
    for c in range(chunks):
        j = i + step + (1 if c < extra else 0)
        b.append((i, j))
        i = j
    return b


class _Liveness:
    """Storages, aliases and last readers of the graph as it is now (recomputed after each rewrite:
    the rewritten results alias their destination's storage)."""

    def __init__(self, graph, layout):
        nodes = list(graph.nodes)
        self.pos = {n: i for i, n in enumerate(nodes)}
        _, self.root, _ = storages_of(graph, layout, workspaces=False)
        self.last_read = {}
        for n in nodes:
            for a in n.all_input_nodes:
                for s in flat(self.root.get(a)):
                    self.last_read[id(s)] = max(self.last_read.get(id(s), -1), self.pos[n])

    def dying(self, n, a, others, out_val):
        """Is ``a`` (an argument of ``n``) a fresh storage that dies at ``n`` and may take ``out_val``?"""
        if not isinstance(a, fx.Node):
            return False
        s = self.root.get(a)
        if s is None or isinstance(s, list) or s.persistent:
            return False
        if self.last_read.get(id(s)) != self.pos[n]:
            return False                        # read after n
        if any(s is t for o in others if isinstance(o, fx.Node) for t in flat(self.root.get(o))):
            return False                        # another argument aliases it
        if not _same_layout(a.meta.get("val"), out_val):
            return False
        return s.nbytes <= _nbytes(out_val)


def _slice(graph, x, i, j, n0, meta_from):
    if (i, j) == (0, n0):
        return x
    return call(graph, aten.slice.Tensor, (x, 0, i, j), meta_from=meta_from)


def _finish(graph, n, dst, meta_from):
    """An alias of the whole destination, read by ``n``'s users in its place."""
    return call(graph, aten.alias.default, (dst,), meta_from=meta_from)


def _rewrite_gelu(gm, n, live, chunks):
    graph = gm.graph
    grad, x = n.args[0], n.args[1]
    approximate = n.kwargs.get("approximate", n.args[2] if len(n.args) > 2 else "none")
    out = _out_val(n)
    ok = {"grad": live.dying(n, grad, [x], out), "input": live.dying(n, x, [grad], out)}
    into = next((d for d in GELU_PREFER if ok[d]), None)
    if into is None:
        return False
    dst = grad if into == "grad" else x
    n0 = out.shape[0] if out.dim() else 1
    with graph.inserting_before(n):
        if out.dim() == 0 or chunks <= 1:
            res = call(graph, aten.gelu_backward.grad_input, (grad, x),
                       {"approximate": approximate, "grad_input": dst}, meta_from=n)
        else:
            for i, j in _bounds(n0, chunks):
                gc, xc = _slice(graph, grad, i, j, n0, n), _slice(graph, x, i, j, n0, n)
                dc = gc if dst is grad else xc
                call(graph, aten.gelu_backward.grad_input, (gc, xc),
                     {"approximate": approximate, "grad_input": dc}, meta_from=n)
            res = _finish(graph, n, dst, n)
    res.meta["pockc.chunked"] = {"op": "gelu_backward", "into": "grad" if dst is grad else "input",
                                 "chunks": 1 if res.target is aten.gelu_backward.grad_input else chunks}
    n.replace_all_uses_with(res)
    graph.erase_node(n)
    return True


def _rewrite_bn(gm, n, live, chunks):
    graph = gm.graph
    args = list(n.args)
    g, x, w, rm, rv, save_mean, save_invstd, train, eps, mask = args[:10]
    if not train or not mask or not mask[0] or not isinstance(save_mean, fx.Node) \
            or not isinstance(save_invstd, fx.Node):
        return False
    out = _out_val(n)
    if out is None or out.dim() < 2 or out.dtype not in (torch.float32, torch.float64) \
            or any(_out_val(t) is None or _out_val(t).dtype != out.dtype for t in (g, x, save_mean, save_invstd)):
        return False                            # the chain below rounds at each op: no half precision
    getitems = {}
    for u in n.users:
        if u.op != "call_function" or u.target is not operator.getitem:
            return False                        # the tuple itself is used: leave it
        getitems.setdefault(u.args[1], []).append(u)
    ok = {"grad": live.dying(n, g, [x, w, rm, rv, save_mean, save_invstd], out),
          "input": live.dying(n, x, [g, w, rm, rv, save_mean, save_invstd], out)}
    dst = next((d for d in BN_PREFER if ok[d]), None)
    if dst is None:
        return False
    if chunks is None:
        chunks = DEFAULT_BN_CHUNKS if dst == "grad" else 1
    C = out.shape[1]
    count = out.numel() // C
    n0 = out.shape[0]
    bshape = [1, C] + [1] * (out.dim() - 2)
    with graph.inserting_before(n):
        red = call(graph, BN_BWD, (g, x, w, rm, rv, save_mean, save_invstd, True, eps, [False, True, True]),
                   meta_from=n)
        gw, gb = getitem(graph, red, 1, meta_from=n), getitem(graph, red, 2, meta_from=n)
        # grad_input = g * a + ((x - mean) * b + d), b = -a * k, d = -a * c: three passes per chunk
        a = save_invstd if w is None else call(graph, aten.mul.Tensor, (save_invstd, w), meta_from=n)
        k = call(graph, aten.mul.Tensor, (gw, save_invstd), meta_from=n)
        b = call(graph, aten.mul.Scalar, (call(graph, aten.mul.Tensor, (a, k), meta_from=n), -1.0 / count),
                 meta_from=n)
        d = call(graph, aten.mul.Scalar, (call(graph, aten.mul.Tensor, (a, gb), meta_from=n), -1.0 / count),
                 meta_from=n)
        mean_b, a_b, b_b, d_b = (call(graph, aten.view.default, (t, bshape), meta_from=n)
                                 for t in (save_mean, a, b, d))
        for i, j in _bounds(n0, chunks):
            gc, xc = _slice(graph, g, i, j, n0, n), _slice(graph, x, i, j, n0, n)
            if dst == "grad":                   # x - mean: a chunk-sized temporary
                t = call(graph, aten.sub.Tensor, (xc, mean_b), meta_from=n)
            else:                               # x's storage takes x - mean, then the result
                t = call(graph, aten.sub_.Tensor, (xc, mean_b), meta_from=n)
            t = call(graph, aten.addcmul.out, (d_b, t, b_b), {"out": t}, meta_from=n)
            if dst == "grad":
                call(graph, aten.addcmul.out, (t, gc, a_b), {"out": gc}, meta_from=n)
            else:
                call(graph, aten.addcmul_.default, (t, gc, a_b), meta_from=n)
        res = _finish(graph, n, g if dst == "grad" else x, n)
    res.meta["pockc.chunked"] = {"op": "native_batch_norm_backward", "into": dst, "chunks": len(_bounds(n0, chunks))}
    for idx, us in getitems.items():
        new = {0: res, 1: gw, 2: gb}[idx]
        for u in us:
            u.replace_all_uses_with(new)
            graph.erase_node(u)
    graph.erase_node(n)
    return True


def chunk_backward(gm: fx.GraphModule, layout=None, min_bytes: int = 1 << 20, chunks: int | None = None) -> PassResult:
    """Rewrite ``gelu_backward`` and train-mode ``native_batch_norm_backward`` nodes whose output
    storage is at least ``min_bytes`` to write their result into a dying input, chunk by chunk
    along dim 0 (see the module docstring). ``chunks``: chunks per node (capped by dim 0); None:
    1 where no temporary is needed (gelu, batch norm into x), else DEFAULT_BN_CHUNKS. Run it on the
    final schedule (after schedule_memory / inplace_ops; before plan_memory and rematerialize, which
    then recomputes and pages through the rewritten nodes). The node replacing each rewritten op's
    result carries ``meta['pockc.chunked']`` = {op, into: "grad" | "input", chunks}."""
    graph = gm.graph
    todo = [n for n in graph.nodes if n.op == "call_function" and n.target in (GELU_BWD, BN_BWD)
            and _nbytes(_out_val(n)) >= min_bytes]
    changed = False
    for n in todo:
        live = _Liveness(graph, layout)
        if n.target is GELU_BWD:
            done = _rewrite_gelu(gm, n, live, 1 if chunks is None else chunks)
        else:
            done = _rewrite_bn(gm, n, live, chunks)
        changed |= done
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
