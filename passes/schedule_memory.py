"""schedule_memory: reorder independent ops so the step's peak live memory drops.

The traced order is the program order of forward, then backward, then (after schedule_updates)
each update right after its gradient. Within the dependencies there is freedom: an op that frees
more than it allocates (an optimizer update consuming its gradient, a reduction consuming a big
activation gradient, a weight gradient whose inputs die with it) can run as soon as it is ready;
an op that only allocates can wait until its value is needed.

Dependencies respected: data edges; for every storage (through views), the order between each op
that writes it in place (optimizer updates, batch-norm statistics, ``index_copy_``) and every op
that reads or writes it; the relative order of random ops (so dropout draws the same numbers) and
of other side-effecting ops. (passes/defer_writes.py runs after it and moves writes of step inputs
that the loss does not depend on after the loss.)

Candidate orders, each simulated with plan_memory's exact liveness, lowest peak kept (ties keep
the current order):

* ``current``: as it is;
* ``eager-free``: program order, but whenever a ready op does not increase live memory
  (frees at least what it allocates), run it first;
* ``min-delta``: list scheduling that always runs the ready op with the smallest
  (allocated - freed) bytes, program order breaking ties;
* ``lazy``: eager-free, and an op that only allocates and is needed only by ops that are not yet
  ready is deferred until one of them can otherwise run (forward values for the backward pass
  are computed where they are first needed, when the data allows it).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from pockc.runtime.distributed import is_issue

from .fx_utils import PassResult, is_aten, mutated_args, reorder
from .plan_memory import flat, plan_memory, storages_of


def _dependencies(nodes, root):
    """node -> set of nodes that must run before it."""
    deps = {n: set(n.all_input_nodes) for n in nodes}
    touches = defaultdict(list)          # storage id -> [(node, writes?)] in program order
    chained = []
    for n in nodes:
        writes = {id(s) for a in mutated_args(n) for s in flat(root.get(a))}
        reads = {id(s) for a in n.all_input_nodes for s in flat(root.get(a))}
        for sid in reads | writes:
            touches[sid].append((n, sid in writes))
        if is_aten(n) and (torch.Tag.nondeterministic_seeded in n.target.tags
                           or (n.target._schema.is_mutable and not mutated_args(n)) or is_issue(n)):
            chained.append(n)   # random ops, hidden state, and collectives: every rank issues them in one order
    for seq in touches.values():
        if not any(w for _, w in seq):
            continue
        last_writer, since = None, []
        for n, w in seq:
            if w:
                deps[n].update(m for m in since if m is not n)
                if last_writer is not None and last_writer is not n:
                    deps[n].add(last_writer)
                last_writer, since = n, []
            else:
                if last_writer is not None and last_writer is not n:
                    deps[n].add(last_writer)
                since.append(n)
    for a, b in zip(chained, chained[1:]):
        deps[b].add(a)
    return deps


def _orders(graph: fx.Graph, layout):
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    _, root, made = storages_of(graph, layout)
    body = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    head = [n for n in nodes if n.op in ("placeholder", "get_attr")]
    deps = _dependencies(body, root)
    inbody = set(body)
    users = defaultdict(list)
    for n in body:
        deps[n] = {d for d in deps[n] if d in inbody}
        for d in deps[n]:
            users[d].append(n)
    readers = defaultdict(set)           # storage id -> body nodes reading it
    for n in body:
        for a in n.all_input_nodes:
            for s in flat(root.get(a)):
                if not s.persistent:
                    readers[id(s)].add(n)
    out_node = nodes[-1]
    pinned = {id(s) for a in out_node.all_input_nodes for s in flat(root.get(a))}

    def run(policy):
        left = {n: len(deps[n]) for n in body}
        pending = {sid: set(r) for sid, r in readers.items()}
        ready = [n for n in body if not left[n]]
        order = []

        def delta(n):
            freed = 0
            for a in n.all_input_nodes:
                for s in flat(root.get(a)):
                    sid = id(s)
                    if not s.persistent and sid not in pinned and pending.get(sid) == {n}:
                        freed += s.nbytes
            # a value nobody reads is freed right away: it costs only while n runs
            mine = sum(s.nbytes for s in made.get(n, ()) if id(s) in readers or id(s) in pinned)
            return mine - freed

        while ready:
            if policy == "min-delta":
                pick = min(ready, key=lambda n: (delta(n), pos[n]))
            else:
                free_now = [n for n in ready if delta(n) <= 0]
                if free_now:
                    pick = min(free_now, key=pos.__getitem__)
                elif policy == "lazy":
                    # prefer an op some non-ready op is waiting on the least: the one whose
                    # consumer comes first in program order
                    def first_need(n):
                        return min((pos[u] for u in users[n]), default=len(nodes))
                    pick = min(ready, key=lambda n: (first_need(n), pos[n]))
                else:
                    pick = min(ready, key=pos.__getitem__)
            ready.remove(pick)
            order.append(pick)
            for a in pick.all_input_nodes:
                for s in flat(root.get(a)):
                    p = pending.get(id(s))
                    if p is not None:
                        p.discard(pick)
            for u in users[pick]:
                left[u] -= 1
                if not left[u]:
                    ready.append(u)
        if len(order) != len(body):  # a cycle would be a bug in the dependency edges
            return None
        return head + order + [out_node]

    return {p: run(p) for p in ("eager-free", "min-delta", "lazy")}


def _peak_of(gm, layout, order):
    graph = gm.graph
    old = list(graph.nodes)
    reorder(graph, order)
    try:
        return plan_memory(gm, layout).peak_bytes
    finally:
        reorder(graph, old)


def schedule_memory(gm: fx.GraphModule, layout=None) -> PassResult:
    """Reorder ``gm`` for the lowest simulated peak; records the choice in
    ``gm.meta['pockc.schedule'] = {"policy": ..., "peaks": {policy: bytes}}``."""
    graph = gm.graph
    current = list(graph.nodes)
    peaks = {"current": plan_memory(gm, layout).peak_bytes}
    best, best_order = "current", current
    for policy, order in _orders(graph, layout).items():
        if order is None:
            continue
        peaks[policy] = _peak_of(gm, layout, order)
        if peaks[policy] < peaks[best]:
            best, best_order = policy, order
    gm.meta["pockc.schedule"] = {"policy": best, "peaks": peaks}
    if best_order is current:
        return PassResult(gm, False)
    reorder(graph, best_order)
    graph.lint()
    gm.recompile()
    return PassResult(gm, True)
