"""schedule_updates: apply each parameter's update as soon as its gradient is final.

An update group (the nodes insert_optimizer added for one parameter) may run once (a) all its
inputs exist and (b) every other node that reads the parameter's storage -- through any view, in
the forward pass or in the backward pass (e.g. ``grad_input = grad_out @ W``) -- has run, since
the update writes that storage in place. Placing each group right after the last of those nodes
frees its gradient (and temporaries) early instead of holding every gradient until the end.

A group that depends on another group's nodes runs at the end, in order: with gradient clipping
every update reads the clip factor (group ``clip_grad_norm``, which itself runs right after the
last gradient), so all updates follow the whole backward pass and the gradients stay alive until
the norm is known. A group that reads a gradient bucket's all-reduce (data parallel,
passes/allreduce.py) runs right after that bucket, which runs right after its last gradient. With
gradient accumulation the groups are ``acc += n_i * g``, placed right after
each gradient like updates.

Invariant: every node that read a parameter before scheduling still reads the old value.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch.fx as fx

from .fx_utils import PassResult, alias_source, is_view, mutated_args, reorder, returns_input


def storage_roots(graph: fx.Graph) -> dict:
    """node -> the node whose storage it aliases (itself for non-views): views, the outputs of a
    splitting view (``split(x)[i]``), and the result of an in-place or out= op (``mm.out``
    returns its ``out``) alias their source."""
    root = {}
    for n in graph.nodes:
        src = n.args[0] if is_view(n) and n.args else (returns_input(n) or alias_source(n))
        if (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
                and is_view(n.args[0])):
            src = n.args[0]
        root[n] = root.get(src, src) if isinstance(src, fx.Node) else n
    return root


def schedule_updates(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    root = storage_roots(graph)
    groups = defaultdict(list)
    for n in nodes:
        if n.meta.get("pockc.role") == "update":
            groups[n.meta["pockc.param"]].append(n)
    if not groups:
        return PassResult(gm, False)

    readers = defaultdict(list)  # storage root -> nodes that use an alias of it
    writers = defaultdict(list)  # storage root -> nodes that write an alias of it in place
    for n in nodes:
        for a in n.all_input_nodes:
            readers[root[a]].append(n)
        for w in mutated_args(n):
            writers[root[w]].append(n)

    ready_after = defaultdict(list)  # non-update node -> groups that may run right after it
    anchor_of = {}                   # comm group (passes/allreduce.py) -> the node it runs after
    for name, members in sorted(groups.items(), key=lambda kv: pos[kv[1][0]]):
        inside = set(members)
        deps = [a for m in members for a in m.all_input_nodes if a not in inside]
        # a gradient finished by an in-place write into an alias of it (``copy_`` into a view of
        # the zeros the backward of as_strided_scatter fills) is final only after that write
        deps += [w for d in list(deps) for w in writers[root[d]] if w not in inside]
        for m in members:
            for w in mutated_args(m):
                deps += [r for r in readers[root[w]] if r not in inside]
        # A group that reads another group's results runs after it: right after a bucket's
        # all-reduce (a comm group, placed first); after every other group, at the end, in order.
        after = [anchor_of.get(d.meta.get("pockc.param"), d) if d.meta.get("pockc.role") == "update" else d
                 for d in deps]
        if any(a.meta.get("pockc.role") == "update" for a in after):
            anchor = nodes[-2]
        else:
            anchor = max(after, key=pos.__getitem__)
        if members[0].meta.get("pockc.comm") is not None:
            anchor_of[name] = anchor
        ready_after[anchor].append(members)

    order = []
    for n in nodes:
        if n.op == "output":
            break
        if n.meta.get("pockc.role") != "update":
            order.append(n)
        for members in sorted(ready_after.get(n, ()), key=lambda m: pos[m[0]]):
            order.extend(members)
    order.append(nodes[-1])
    changed = order != nodes
    reorder(graph, order)
    graph.lint()
    gm.recompile()
    return PassResult(gm, changed)
