"""plan_memory: liveness, peak and a static arena layout for a compiled training step.

Every tensor storage the step touches is one entry:

* **persistent** storages exist before the step and after it: the graph's inputs. Trained
  parameters (their trained rows are writable, the other rows read-only), optimizer state,
  the *accumulated gradient* buffers of a step with ``accumulate=K`` (one per trained tensor,
  its trained rows), buffers the step writes (batch-norm statistics), the batch and the optimizer scalars are
  *writable*; frozen parameters, buffers nobody writes and constants are *read-only* (flash on a
  microcontroller) and are reported apart from the budget.
* **transient** storages are allocated by an op of the step and freed after their last use
  (torch.fx's generated code drops each value right after the last node that reads it). Views and
  in-place ops share their base's storage and extend its lifetime; an element of a multi-output
  op (``native_batch_norm`` -> out, mean, invstd) lives until the last ``getitem`` of the tuple
  and the last use of the element, as in the generated code.

Kinds of transient storage: *saved activation* (made by the forward pass and still alive once
the backward pass starts), *gradient* (made by the backward pass and read by an optimizer
update), *temporary* (everything else, including the loss and activation gradients), and
*workspace*: the scratch a kernel allocates and frees inside itself (oneDNN's scratchpad and
reorders in convolutions, per-thread buffers of batch-norm backward, wrapped Python numbers),
alive only at its node. Its size is measured once per distinct call at compile time
(passes/workspace.py: the op run on real tensors of its shapes under an allocator-level
measurement) as ``max(0, peak of the call's new allocations - the bytes of its own outputs)``.

The peak is taken at each node with its inputs, outputs and workspace alive. Without the
workspaces it is what the exact CPU tracker of live tensor storage in runtime/memory.py
measures; with them, what the allocator hands out (``step.memory.measure(*batch,
allocator=True)``). Storage sizes come from the nodes' fake values (refreshed by
insert_optimizer), so the plan is exact for the aten graph as it will run. On CUDA sizes are
rounded to the caching allocator's 512-byte blocks and workspaces are measured with
``max_memory_allocated`` (untested so far: no GPU).

The arena puts every writable storage at an offset: persistent ones first, then the transient
ones by the greedy-by-size policy of TFLite's memory planner (largest first, lowest offset that
overlaps no placed storage alive at the same time), aligned to ``ALIGN`` bytes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from pockc.runtime.arena import greedy_by_size, pack
from pockc.runtime.optim import ACCUM_STATE

from .fx_utils import OUTPUT_MASK_ARG, alias_source, is_view, mutated_args, returns_input

ALIGN = 64
WRITABLE_KINDS = ("trainable weight", "optimizer state", "accumulated gradient", "buffer", "input",
                  "saved activation", "gradient", "temporary", "workspace")
READONLY_KINDS = ("frozen weight", "constant")
PAGED_KIND = "paged"   # optimizer state kept in the slow tier between steps (runtime/paging.py)


@dataclass
class Storage:
    name: str            # the node that allocated it ("p_fc_weight", "convolution_3", "getitem_2")
    kind: str
    nbytes: int
    start: int = -1      # index of the allocating node; -1 for persistent storage
    end: int = -1        # index of the last node it is alive at
    offset: int | None = None

    @property
    def persistent(self):
        return self.start < 0

    def to_dict(self):
        return {"name": self.name, "kind": self.kind, "bytes": self.nbytes, "start": self.start,
                "end": self.end, "offset": self.offset}


@dataclass
class MemoryPlan:
    """The memory of one step: ``peak_bytes`` (writable), ``readonly_bytes``, ``breakdown``
    (bytes per kind at the peak), ``arena_bytes`` and every storage with its lifetime and offset."""
    storages: list
    peak_bytes: int
    peak_node: str
    breakdown: dict
    readonly_bytes: int
    persistent_bytes: int         # writable storage that exists before and after the step
    arena_bytes: int
    timeline: list = field(repr=False, default_factory=list)   # live writable bytes per node
    paged_bytes: int = 0          # held in the slow tier, not in the budget: optimizer state
    #                               (kind "paged") and the page pools of paged activations

    @property
    def required_bytes(self) -> int:
        """What a static allocation needs: the peak, or the arena where fragmentation exceeds it."""
        return max(self.peak_bytes, self.arena_bytes)

    @property
    def transient_peak(self) -> int:
        return self.peak_bytes - self.persistent_bytes

    def by_kind(self, kind) -> list:
        return [s for s in self.storages if s.kind == kind]

    def table(self, budget: int | None = None) -> str:
        from tabulate import tabulate
        rows = [[k, f"{self.breakdown.get(k, 0):,}"] for k in WRITABLE_KINDS if self.breakdown.get(k)]
        rows.append(["peak (writable)", f"{self.peak_bytes:,}"])
        if budget is not None:
            rows.append(["budget", f"{budget:,}"])
            rows.append(["headroom", f"{budget - self.peak_bytes:,}"])
        rows.append(["arena", f"{self.arena_bytes:,}"])
        rows.append(["read-only (frozen weights)", f"{self.readonly_bytes:,}"])
        if self.paged_bytes:
            rows.append(["paged (slow tier, not in the budget)", f"{self.paged_bytes:,}"])
        return tabulate(rows, headers=["memory at peak", "bytes"], tablefmt="simple", colalign=("left", "right"))

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "peak_node": self.peak_node, "breakdown": self.breakdown,
                "readonly_bytes": self.readonly_bytes, "persistent_bytes": self.persistent_bytes,
                "arena_bytes": self.arena_bytes, "align": ALIGN, "paged_bytes": self.paged_bytes,
                "storages": [s.to_dict() for s in self.storages]}


def _nbytes(val) -> int:
    """Bytes of the storage a fresh tensor like ``val`` occupies (its strided span)."""
    if not isinstance(val, torch.Tensor):
        return 0
    if val.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * st for s, st in zip(val.shape, val.stride()) if s > 0)
    nbytes = span * val.element_size()
    if val.device.type == "cuda":   # the caching allocator hands out blocks in 512-byte multiples
        nbytes = (nbytes + 511) // 512 * 512
    return nbytes


def _placeholder_kinds(graph, layout):
    """placeholder node -> (kind, writable fraction)."""
    if layout is None:
        return {n: ("input", 1.0) for n in graph.nodes if n.op == "placeholder"}
    written = {a for n in graph.nodes for a in mutated_args(n)}
    groups = layout.placeholders(graph)
    sel = dict(layout.grads)
    out = {}
    for name, ph in zip(layout.params, groups["params"]):
        s, frac = sel.get(name), 1.0
        if s is not None:
            rows = ph.meta["val"].shape[0] if ph.meta["val"].dim() else 1
            frac = ((s[2] - s[1]) if s[0] == "slice" else len(s[1])) / max(rows, 1)
        out[ph] = ("trainable weight", frac)
    for ph in groups["frozen"]:
        out[ph] = ("frozen weight", 1.0)
    for ph in groups["buffers"]:   # a buffer the step only reads (eval-mode statistics) is read-only
        out[ph] = ("buffer" if ph in written else "frozen weight", 1.0)
    for ph, (_name, s) in zip(groups["state"], layout.state):   # accumulate=K: its gradient buffers
        out[ph] = ("accumulated gradient" if s == ACCUM_STATE else "optimizer state", 1.0)
        if ph.meta.get("pockc.tier") == PAGED_KIND:   # held in the slow tier, copied in for its update
            out[ph] = (PAGED_KIND, 1.0)
    for ph in groups["scalars"] + groups["batch"]:
        out[ph] = ("input", 1.0)
    return out


def storages_of(graph: fx.Graph, layout=None, workspaces: bool = True):
    """``(storages, root, made)``: every storage, node -> its Storage (a list for multi-output
    nodes, None for non-tensors), node -> the transient storages it allocates. With
    ``workspaces`` the storages include each node's kernel scratch (kind ``workspace``, alive at
    its node only; in neither ``root`` nor ``made``: no node reads it)."""
    nodes = list(graph.nodes)
    idx = {n: i for i, n in enumerate(nodes)}
    ph_kind = _placeholder_kinds(graph, layout)
    storages: list[Storage] = []
    root, made = {}, {}

    def persistent(n, kind, nbytes):
        s = Storage(n.name, kind, nbytes)
        storages.append(s)
        return s

    def fresh(n, name, v):
        s = Storage(name, "", _nbytes(v), idx[n], idx[n])
        storages.append(s)
        made.setdefault(n, []).append(s)
        return s

    for n in nodes:
        val = n.meta.get("val")
        if n.op == "placeholder":
            kind, frac = ph_kind.get(n, ("input", 1.0))
            nb = _nbytes(val)
            if kind == "trainable weight" and frac < 1.0:
                w = int(round(nb * frac))
                root[n] = persistent(n, kind, w)
                persistent(n, "frozen weight", nb - w).name = n.name + " (frozen rows)"
            else:
                root[n] = persistent(n, kind, nb)
        elif n.op == "get_attr":
            root[n] = persistent(n, "constant", _nbytes(val))
        elif n.op == "call_function" and n.target is operator.getitem:
            parent = root.get(n.args[0])
            root[n] = parent[n.args[1]] if isinstance(parent, list) else parent
        elif n.op == "call_function":
            src = n.args[0] if is_view(n) and n.args and isinstance(n.args[0], fx.Node) else returns_input(n)
            src = alias_source(n) if src is None else src
            if src is not None:
                r = root.get(src)
                root[n] = [r] * len(val) if isinstance(val, (tuple, list)) else r  # split: all views
            elif isinstance(val, (tuple, list)):
                mask = _output_mask(n, len(val))   # outputs a backward op was told not to compute
                root[n] = [fresh(n, f"{n.name}[{k}]", v) if isinstance(v, torch.Tensor) and mask[k] else None
                           for k, v in enumerate(val)]
            elif isinstance(val, torch.Tensor):
                root[n] = fresh(n, n.name, val)
    if workspaces:
        from .workspace import call_peaks, output_storage_bytes
        peaks = call_peaks(nodes)
        for n, real in output_storage_bytes(nodes).items():   # a storage larger than its tensor
            if len(made.get(n, ())) == 1 and isinstance(n.meta.get("val"), torch.Tensor):
                made[n][0].nbytes = max(made[n][0].nbytes, real)
        for n, peak in peaks.items():
            ws = peak - sum(s.nbytes for s in made.get(n, ()))
            if ws > 0:
                storages.append(Storage(f"{n.name} (workspace)", "workspace", ws, idx[n], idx[n]))
    return storages, root, made


def _output_mask(node, n):
    """Which outputs of a multi-output backward op are computed (its output_mask argument; the
    fake value may still hold all of them after prune_backward narrowed the mask)."""
    i = OUTPUT_MASK_ARG.get(node.target)
    if i is not None and i < len(node.args) and isinstance(node.args[i], (list, tuple)):
        return [bool(b) for b in node.args[i]] + [True] * (n - len(node.args[i]))
    return [True] * n


def flat(r):
    """The storages behind a root entry (one, several for a tuple, none)."""
    return [s for s in (r if isinstance(r, list) else [r]) if s is not None]


def _lifetimes(gm: fx.GraphModule, layout=None):
    """``(nodes, storages)`` of ``gm`` in its current order, each storage with its lifetime and kind."""
    graph = gm.graph
    nodes = list(graph.nodes)
    idx = {n: i for i, n in enumerate(nodes)}
    first_bwd = min((idx[n] for n in nodes if n.meta.get("pockc.role") == "backward"), default=len(nodes))
    storages, root, _ = storages_of(graph, layout)

    # Lifetimes: a storage is alive until the last node reading any alias of it; the elements of
    # a multi-output node until its last getitem (the tuple holds them).
    def touch(r, i):
        for s in flat(r):
            if not s.persistent and i > s.end:
                s.end = i

    readers = {}                      # Storage id -> roles of the nodes reading it
    for n in nodes:
        i = idx[n]
        for a in n.all_input_nodes:
            r = root.get(a)
            touch(r, i)
            for s in flat(r):
                readers.setdefault(id(s), set()).add(n.meta.get("pockc.role"))
        if n.op == "output":
            touch([root.get(a) for a in n.all_input_nodes], len(nodes) - 1)

    alloc_role = {}
    for n in nodes:
        for s in flat(root.get(n)):
            if not s.persistent and id(s) not in alloc_role:
                alloc_role[id(s)] = n.meta.get("pockc.role")
    for s in storages:
        if s.persistent or s.kind == "workspace":
            continue
        role = alloc_role.get(id(s))
        if role == "forward" and s.end >= first_bwd:
            s.kind = "saved activation"
        elif role == "backward" and "update" in readers.get(id(s), ()):
            s.kind = "gradient"
        else:
            s.kind = "temporary"
    return nodes, storages


def _page_pool_bytes(graph) -> int:
    """Bytes of the slow-tier pools that a graph's paged activations use (page_out's ``total``)."""
    from pockc.runtime import paging
    pools = {n.args[1]: n.args[4] for n in graph.nodes
             if n.op == "call_function" and n.target is paging.page_out}
    return int(sum(pools.values()))


def _summarize(storages, names, extra_paged: int = 0) -> MemoryPlan:
    """Peak, breakdown at the peak and arena of ``storages`` over a program of ``names`` nodes."""
    transient = [s for s in storages if not s.persistent]
    persist_w = sum(s.nbytes for s in storages if s.persistent and s.kind in WRITABLE_KINDS)
    readonly = sum(s.nbytes for s in storages if s.persistent and s.kind in READONLY_KINDS)
    delta = np.zeros(len(names) + 1, dtype=np.int64)
    for s in transient:
        delta[s.start] += s.nbytes
        delta[s.end + 1] -= s.nbytes
    live = np.cumsum(delta)[:len(names)] + persist_w
    peak_i = int(np.argmax(live)) if len(names) else 0
    peak = int(live[peak_i]) if len(names) else persist_w
    breakdown = {}
    for s in storages:
        alive = s.persistent or s.start <= peak_i <= s.end
        if alive and s.kind in WRITABLE_KINDS:
            breakdown[s.kind] = breakdown.get(s.kind, 0) + s.nbytes
    arena = _arena(storages)
    paged = extra_paged + sum(s.nbytes for s in storages if s.persistent and s.kind == PAGED_KIND)
    return MemoryPlan(storages, peak, names[peak_i] if names else "", breakdown, readonly,
                      persist_w, arena, [int(x) for x in live], paged)


def plan_memory(gm: fx.GraphModule, layout=None) -> MemoryPlan:
    """Liveness and arena of ``gm`` in its current node order (see the module docstring)."""
    nodes, storages = _lifetimes(gm, layout)
    return _summarize(storages, [n.name for n in nodes], _page_pool_bytes(gm.graph))


def plan_memory_then(gm: fx.GraphModule, then: fx.GraphModule, layout=None) -> MemoryPlan:
    """The memory of a call that runs ``gm`` and then ``then`` over the same inputs (the K-th
    call of an accumulating step: its micro-batch program, then the update): one timeline, the
    second program's nodes after the first's. Persistent storage is the first program's (the
    inputs are the same tensors); what the first returns (the loss) stays alive while the second
    runs; the second's transient storages are named ``"<node> (update)"``. The plan is the
    worst call's: a call that runs ``gm`` alone peaks no higher."""
    nodes, storages = _lifetimes(gm, layout)
    nodes2, second = _lifetimes(then, layout)
    n, total = len(nodes), len(nodes) + len(nodes2)
    for s in storages:
        if not s.persistent and s.kind != "workspace" and s.end == n - 1:
            s.end = total - 1          # returned by the first program: held by the caller
    for s in second:
        if not s.persistent:
            s.start, s.end, s.name = s.start + n, s.end + n, f"{s.name} (update)"
            storages.append(s)
    return _summarize(storages, [x.name for x in nodes] + [f"{x.name} (update)" for x in nodes2],
                      _page_pool_bytes(gm.graph) + _page_pool_bytes(then.graph))


_SMALL_WORKSPACE = 1024


def _align(x):
    return (x + ALIGN - 1) // ALIGN * ALIGN


def _arena(storages) -> int:
    """Assign offsets: persistent writable storage first, then the transient storage by the
    best of several greedy orders (runtime/arena.py :func:`pack`: largest first, TFLite's policy;
    largest size x lifetime first; by start time; perturbed size orders), each placing an item at
    the lowest offset where it overlaps nothing alive at the same time. Workspaces under 1 KiB
    (wrapped Python numbers: a few bytes at many nodes) are placed after the search, largest
    first, into the best layout found, so that they cost the search nothing."""
    off = 0
    for s in storages:
        if s.persistent and s.kind in WRITABLE_KINDS:
            s.offset = off
            off += _align(s.nbytes)
    base = off
    small = [s for s in storages if not s.persistent and 0 < s.nbytes < _SMALL_WORKSPACE and s.kind == "workspace"]
    ids = {id(s) for s in small}
    trans = [s for s in storages if not s.persistent and s.nbytes > 0 and id(s) not in ids]
    late = sorted(small, key=lambda s: (-s.nbytes, s.start))
    top, order, offsets = pack([(s.start, s.end, _align(s.nbytes)) for s in trans])
    ordered = [trans[i] for i in order]
    if late:   # the same placement for the searched items (greedy is sequential), then the rest
        ordered = ordered + late
        offsets = greedy_by_size([(s.start, s.end, _align(s.nbytes)) for s in ordered])
        top = max((o + _align(s.nbytes) for s, o in zip(ordered, offsets)), default=0)
    for s, o in zip(ordered, offsets):
        s.offset = base + o
    return base + top


def check_arena(plan: MemoryPlan) -> None:
    """Assert no two writable storages alive at the same time overlap in the arena."""
    ws = [s for s in plan.storages if s.kind in WRITABLE_KINDS and s.nbytes]
    for i, a in enumerate(ws):
        for b in ws[i + 1:]:
            t = (a.persistent or b.persistent) or (a.start <= b.end and b.start <= a.end)
            if t and a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes:
                raise AssertionError(f"arena overlap: {a.name} and {b.name}")
