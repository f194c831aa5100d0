"""defer_writes: no parameter or optimizer state is written before the loss exists.

A step that raises in its forward pass (a label out of range, a shape the kernel rejects) must
leave the model and the optimizer where they were, as a failing eager step leaves them. The
traced update of a trained tensor starts with writes that need no gradient (SGD's
``momentum_buffer.mul_(momentum)``, AdamW's ``p.mul_(1 - lr * wd)``); a scheduler free to run
them early (they allocate nothing) would apply them before the forward pass.

Rule: every node that writes the storage of a step input (a trained parameter, optimizer state, a
buffer) and on which the loss does not depend runs after the loss node. ``deferred_writers``
names those nodes; this pass, the last of the pipeline (after schedule_memory and inplace_ops),
moves them (and what depends on them) after the loss with the least movement. Writes the loss does depend on
stay where eager makes them, in the forward pass: batch norm's running statistics (the kernel that
normalizes also updates them) and a model that updates a buffer and reads it again.

Invariant: the loss node's ancestors (data and storage-order edges) run before any write of a
step input that is not among them.
"""
from __future__ import annotations

import heapq

import torch.fx as fx

from .fx_utils import PassResult, mutated_args, reorder
from .plan_memory import flat, storages_of


def loss_node(graph: fx.Graph):
    """The node the step returns as its loss (the first value of the graph's output)."""
    out = next(n for n in graph.nodes if n.op == "output")
    return next(iter(out.all_input_nodes), None)


def deferred_writers(body, deps, root, loss) -> set:
    """Nodes of ``body`` that write a persistent storage (a step input) and that ``loss`` does not
    depend on through ``deps`` (node -> nodes that must run before it)."""
    if loss is None or loss not in deps:
        return set()
    ancestors, todo = set(), [loss]
    while todo:
        n = todo.pop()
        for d in deps.get(n, ()):
            if d not in ancestors:
                ancestors.add(d)
                todo.append(d)
    out = set()
    for n in body:
        if n is loss or n in ancestors:
            continue
        if any(s is not None and s.persistent for a in mutated_args(n) for s in flat(root.get(a))):
            out.add(n)
    return out


def defer_writes(gm: fx.GraphModule, layout=None) -> PassResult:
    from .schedule_memory import _dependencies   # the scheduler's dependency edges, one definition

    graph = gm.graph
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    _, root, _ = storages_of(graph, layout)
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    deps = _dependencies(body, root)
    inbody = set(body)
    deps = {n: {d for d in ds if d in inbody} for n, ds in deps.items()}
    loss = loss_node(graph)
    late = deferred_writers(body, deps, root, loss)
    if not late or all(pos[w] > pos[loss] for w in late):
        return PassResult(gm, False)
    for w in late:
        deps[w].add(loss)
    # Kahn's algorithm, always taking the ready node that comes first in the current order -- the
    # loss first of all, as soon as it can run: the order changes only where the new edges force
    # it, and the writers (with the update groups after them) move no later than the loss.
    pos = {**pos, loss: -1}
    users = {n: [] for n in body}
    left = {n: len(deps[n]) for n in body}
    for n in body:
        for d in deps[n]:
            users[d].append(n)
    ready = [(pos[n], n.name, n) for n in body if not left[n]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, n = heapq.heappop(ready)
        order.append(n)
        for u in users[n]:
            left[u] -= 1
            if not left[u]:
                heapq.heappush(ready, (pos[u], u.name, u))
    assert len(order) == len(body), "defer_writes: cycle in the step's dependencies"
    head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    reorder(graph, head + order + [nodes[-1]])
    graph.lint()
    gm.recompile()
    return PassResult(gm, True)
