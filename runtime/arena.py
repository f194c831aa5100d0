"""Static arena layout: offsets for storages of known lifetimes (shared by the planner in
passes/plan_memory.py and the ExecuTorch export in runtime/executorch.py).

An item is ``(start, end, size)``: alive from node ``start`` to node ``end`` inclusive. Two items
may share bytes only when their lifetimes do not overlap. :func:`greedy_by_size` places items in
a given order (largest first is TFLite's greedy-by-size policy); :func:`pack` tries several
orders and keeps the one with the lowest top. This module imports numpy only.
"""
from __future__ import annotations

import numpy as np

PERTURBED_MAX_ITEMS = 600   # perturbed orders are tried for graphs up to this many items
PERTURBED_TRIES = 12


def greedy_by_size(items) -> list:
    """Offsets for ``(start, end, size)`` items in the given order (largest first is TFLite's
    greedy-by-size): each goes at the lowest offset where it overlaps, in time and space, no item
    placed before it."""
    n = len(items)
    starts = np.empty(n, dtype=np.int64)
    ends = np.empty(n, dtype=np.int64)
    offs = np.empty(n, dtype=np.int64)
    sizes = np.empty(n, dtype=np.int64)
    out = []
    for k, (a, b, size) in enumerate(items):
        if k:
            m = (starts[:k] <= b) & (ends[:k] >= a)
            o_, s_ = offs[:k][m], sizes[:k][m]
            order = np.argsort(o_, kind="stable")
            cand = 0
            for lo, sz in zip(o_[order].tolist(), s_[order].tolist()):
                if lo >= cand + size:
                    break
                cand = max(cand, lo + sz)
        else:
            cand = 0
        starts[k], ends[k], offs[k], sizes[k] = a, b, cand, size
        out.append(cand)
    return out


def pack(items) -> tuple[int, list, list]:
    """The best of several greedy orders for ``(start, end, size)`` items: largest first
    (TFLite's policy), largest size x lifetime first, by start time, plus perturbed size orders
    for up to ``PERTURBED_MAX_ITEMS`` items (fragmentation is order-sensitive). Returns
    ``(top, order, offsets)``: the bytes the layout spans, the item indices in placement order
    and their offsets in that order."""
    idx = list(range(len(items)))
    orders = (lambda i: (-items[i][2], items[i][0]),
              lambda i: (-items[i][2] * (items[i][1] - items[i][0] + 1), items[i][0]),
              lambda i: (items[i][0], -items[i][2]))
    tries = [sorted(idx, key=k) for k in orders]
    if 0 < len(items) <= PERTURBED_MAX_ITEMS:
        rng = np.random.default_rng(0)
        for _ in range(PERTURBED_TRIES):
            noise = rng.uniform(0.7, 1.3, len(items))
            tries.append([int(i) for i in np.argsort([-items[i][2] * f for i, f in zip(idx, noise)], kind="stable")])
    best = None
    for order in tries:
        offsets = greedy_by_size([items[i] for i in order])
        top = max((o + items[i][2] for i, o in zip(order, offsets)), default=0)
        if best is None or top < best[0]:
            best = (top, order, offsets)
    return best if best is not None else (0, [], [])
