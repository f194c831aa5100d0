"""allreduce: data parallelism inside the step -- the trained gradients cross the ranks in the graph.

With ``pockc.compile(..., distributed=...)`` (pockc/distributed.py), insert_optimizer calls
:func:`reduce_gradients` on the final gradients before it emits their updates. Each gradient is
exactly what the update reads: a whole tensor, the trained rows of a channel-sparse one, a LoRA
factor; so a channel-sparse plan sends only its rows over the network (torch's DDP reduces every
tensor that requires grad, whole).

Gradients are grouped into buckets as DDP groups them: in the order they become final in the
graph (the backward runs from the loss back, so the last layers' first), one dtype per bucket, at
most ``first_bucket_bytes`` in the first bucket and ``bucket_bytes`` in the others; a gradient
larger than that is a bucket of its own. A bucket of several gradients is copied into one flat
buffer (``cat``) that is reduced in place; a bucket of one gradient whose storage the step owns
(a fresh tensor, or a view covering all of one, that no other gradient shares) is reduced in place
without a copy; any other is reduced into a new tensor. Per bucket the graph has::

    flat = cat([view(g0, -1), view(g1, -1), ...])       # or g itself
    red  = _c10d_functional.all_reduce_(flat, "sum", group)   # issued: runs in the background
    w    = wait(red).div_(world_size)   # runtime/distributed.wait: wait_tensor, then until gloo lets go
    g0', g1', ... = views of split_with_sizes(w, sizes)       # what the updates read

All these nodes are an update group of their own (``meta['pockc.param'] = 'allreduce[k]'``,
``meta['pockc.comm'] = k``): passes.schedule_updates places a bucket right after its last
gradient is final and each update right after its bucket. The collectives are issued in bucket
order on every rank (passes.schedule_memory keeps issues in program order), and
:func:`overlap_collectives`, the last pass, moves each wait, with the updates that read it, after
the next bucket's issue, so a bucket's reduction runs while the backward computes the next
bucket's gradients. The memory plan sees the flat buffers as the tensors they are.

The reduction is the average over the ranks (each rank's loss is its micro-batch's mean, DDP's
semantics), or the sum with gradient accumulation, whose accumulated gradients are already
divided by the item count of the global batch (runtime/distributed.py sums it over the ranks).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from pockc.runtime.distributed import is_issue, is_wait, wait

from .fx_utils import PassResult, call, getitem, is_view, reorder

aten = torch.ops.aten


def _root(node):
    """(root node, chain of view nodes from the root down to ``node``) for a chain of single-input
    views; (node, []) otherwise."""
    chain = []
    while is_view(node) and node.args and isinstance(node.args[0], fx.Node) and node.target is not operator.getitem:
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _fresh(node, roots: dict) -> bool:
    """True when ``node``'s storage is a fresh tensor the step computes (not an input, a constant,
    or an in-place result over one), so the step may overwrite it."""
    return node.op == "call_function" and roots.get(node) is node and not is_issue(node)


def buckets_of(grads, vals, first_bucket_bytes: int, bucket_bytes: int) -> list:
    """Lists of gradient indices, DDP-style (see the module docstring); ``grads`` in ready order."""
    out, open_ = [], {}            # kind -> [indices, bytes, cap] of its open bucket
    for i in grads:
        v = vals[i]
        size = v.numel() * v.element_size()
        kind = (v.dtype, v.device)
        cur = open_.get(kind)
        if cur is not None and cur[0] and cur[1] + size > cur[2]:
            out.append(cur[0])
            cur = None
        if cur is None:
            cur = open_[kind] = [[], 0, first_bucket_bytes if not out and len(open_) <= 1 else bucket_bytes]
        cur[0].append(i)
        cur[1] += size
        if cur[1] >= cur[2]:
            out.append(cur[0])
            del open_[kind]
    out.extend(c[0] for c in open_.values() if c[0])
    return out


def reduce_gradients(gm: fx.GraphModule, graph: fx.Graph, layout, grads: list, where, comm, *,
                     op: str = "avg", owned: bool = False) -> list:
    """Insert, before ``where``, the bucketed all-reduces of ``grads`` (one per entry of
    ``layout.grads``) over ``comm``'s group; returns the reduced gradients, in the same order.
    ``owned``: every gradient's storage may be overwritten (gradient accumulation's buffers).
    Records the buckets, in issue order, in ``gm.meta['pockc.buckets']`` (runtime/distributed.Comm's
    ``buckets``)."""
    from .schedule_updates import storage_roots
    c = torch.ops._c10d_functional
    storage = storage_roots(graph)
    pos = {n: i for i, n in enumerate(graph.nodes)}
    order = sorted(range(len(grads)), key=lambda i: pos[grads[i]])        # the order they become final
    vals = [g.meta["val"] for g in grads]
    roots = [_root(g) for g in grads]
    counts = {}
    for r, _ in roots:
        counts[r] = counts.get(r, 0) + 1
    shared = {r for r, k in counts.items() if k > 1}
    out = list(grads)
    buckets = gm.meta["pockc.buckets"] = []

    def reduced(t, inplace):
        """all_reduce_ (``inplace``) / all_reduce of ``t`` (summed over the ranks), waited for;
        divided by the world size for "avg", in place by a 0-dim constant of its dtype (gloo's own
        "avg", and a Python scalar, allocate a few bytes inside the kernel that the memory plan
        would not see)."""
        issue = c.all_reduce_.default if inplace else c.all_reduce.default
        w = call(graph, wait, (call(graph, issue, (t, "sum", comm.group_name)),))
        if op == "avg":
            w = call(graph, aten.div_.Tensor, (w, _world_constant(gm, graph, w, comm.world_size)))
        return w

    for k, idx in enumerate(buckets_of(order, vals, comm.first_bucket_bytes, comm.bucket_bytes)):
        before = set(graph.nodes)
        names = [layout.grads[i][0] for i in idx]
        nbytes = sum(vals[i].numel() * vals[i].element_size() for i in idx)
        inplace = False
        with graph.inserting_before(where):
            if len(idx) == 1:
                i = idx[0]
                r, chain = roots[i]
                rv = r.meta.get("val")
                whole = isinstance(rv, torch.Tensor) and rv.numel() == vals[i].numel() and rv.is_contiguous()
                if (owned or _fresh(r, storage)) and whole and r not in shared:
                    w = reduced(r, True)
                    for v in chain:                                         # the same views of the result
                        w = call(graph, v.target, (w, *v.args[1:]), dict(v.kwargs))
                    out[i], inplace = w, True
                else:
                    out[i] = reduced(grads[i], False)
            else:
                parts = []
                for i in idx:
                    g = grads[i]
                    if not vals[i].is_contiguous():
                        g = call(graph, aten.clone.default, (g,), {"memory_format": torch.contiguous_format})
                    parts.append(call(graph, aten.view.default, (g, [-1])))
                flat = call(graph, aten.cat.default, (parts,))
                w = reduced(flat, True)
                pieces = call(graph, aten.split_with_sizes.default, (w, [vals[i].numel() for i in idx]))
                for j, i in enumerate(idx):
                    out[i] = call(graph, aten.view.default, (getitem(graph, pieces, j), list(vals[i].shape)))
        for n in graph.nodes:
            if n not in before:
                n.meta.update({"pockc.role": "update", "pockc.param": f"allreduce[{k}]", "pockc.comm": k,
                               "pockc.params": list(names)})
        buckets.append({"tensors": names, "bytes": nbytes, "inplace": inplace})
    return out


def _world_constant(gm, graph, like, world_size):
    """A get_attr node of a 0-dim tensor holding ``world_size`` in ``like``'s dtype and device."""
    val = like.meta["val"]
    name = f"_pockc_world_size_{str(val.dtype).replace('torch.', '')}_{val.device.type}"
    if not hasattr(gm, name):
        gm.register_buffer(name, torch.tensor(float(world_size), dtype=val.dtype, device=val.device))
    node = graph.get_attr(name)
    node.meta["val"] = val.fake_mode.from_tensor(getattr(gm, name)) if hasattr(val, "fake_mode") else getattr(gm, name)
    return node


def overlap_collectives(gm: fx.GraphModule, layout=None) -> PassResult:
    """Move each bucket's wait, and the nodes that must follow it, right after the next bucket's
    issue (see the module docstring): the reduction of bucket k overlaps the backward that
    produces bucket k+1. Nodes move only later, only past nodes that do not depend on them, and a
    wait whose next issue depends on it (through an update) stays."""
    from .plan_memory import storages_of
    from .schedule_memory import _dependencies

    graph = gm.graph
    issues = [n for n in graph.nodes if is_issue(n)]
    if len(issues) < 2:
        return PassResult(gm, False)
    changed = False
    for nxt in issues[1:]:
        nodes = list(graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        prev = issues[issues.index(nxt) - 1]
        done = next((u for u in prev.users if is_wait(u)), None)
        if done is None or pos[done] > pos[nxt]:
            continue
        _, root, _ = storages_of(graph, layout)
        body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
        deps = _dependencies(body, root)
        window = nodes[pos[done]:pos[nxt] + 1]
        moved = {done}
        for n in window[1:]:
            if any(d in moved for d in deps.get(n, ())):
                moved.add(n)
        if nxt in moved:
            continue
        new = [n for n in window if n not in moved] + [n for n in window if n in moved]
        reorder(graph, nodes[:pos[done]] + new + nodes[pos[nxt] + 1:])
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
