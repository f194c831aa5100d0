"""rematerialize: recompute forward values in the backward pass, or page them out and back.

A *saved activation* is a storage the forward pass allocates and the backward pass still reads
(plan_memory's kind), so it is alive across the forward/backward boundary, where the peak of a
full fine-tuning step usually is. For each such storage S the pass decides, as POET does:

* **keep** (as traced);
* **recompute**: the forward nodes that produce S's aliases are cloned, from values that are
  still available (persistent inputs nobody has written since, saved activations that are kept
  or paged back in), right before the first backward node reading S; every backward reader is
  rewired to the clones. S then dies after its last forward reader, and the clone lives only
  from its first to its last backward use;
* **page**: right after S's last forward reader the step starts copying it out to a slower tier
  (runtime/paging.py: a memory-mapped file on CPU, pinned host memory on CUDA), waits for the
  copy a few ops later (S is freed there), starts copying it back into a fresh storage a few ops
  before its first backward reader and waits right before that reader; the backward readers get
  ``as_strided`` views of the fresh storage with S's aliases' layouts. The windows are sized by the
  cost model so that the copies run beside compute. Paging needs the aten backend (the calls
  run in the FX program).

What may be cloned (``_clone_spec``): forward aten ops that are deterministic and write nothing, plus

* in-place ops on a fresh storage (``relu_``, ``add_`` from inplace_ops): cloned out of place;
* train-mode ``native_batch_norm``: cloned with ``running_mean``/``running_var`` = None, which
  normalizes with the same batch statistics and does not update the running statistics a second
  time;
* random fills of a fresh buffer (dropout's ``empty_like`` + ``bernoulli_``): the forward saves
  the generator state right before the fill (runtime/rng.py, 5 KB on CPU), the clone replays the
  fill from it and restores the generator, so the mask is the same bits and later draws are
  unchanged.

Never cloned: other random ops (attention with ``dropout_p > 0``), other ``empty*`` (uninitialized),
other mutating ops, backward or update nodes. A value is used directly by a clone only if no node
wrote its storage between the value's node and the clone (a parameter already updated, a storage
mutated in place later) -- otherwise it is cloned too, or the candidate is infeasible.

Decision (``solver``): a linear model of memory over the schedule -- recomputing S saves its bytes
between its last forward reader and its first backward reader, and costs keeping directly-used
inputs (and saved generator states) alive until the clone, and the largest kernel workspace of
the cloned ops (plan_memory's ``workspace`` storages) at the clone; paging S saves its bytes between the
two copies' waits -- and the cost model of pockc/remat_cost.py (estimated seconds of the cloned ops
and of the copies not hidden by compute, or joules with ``objective="energy"``; a device profile
describes another device). ``greedy`` covers the current maximum excess over the target with the
choice of most bytes per cost (re-costed given what is already chosen, since chains grow), then
drops choices that later ones made redundant; ``milp`` (scipy.optimize.milp / HiGHS, one binary
per choice, at most one choice per storage, one constraint per distinct set of choices alive over
the budget) minimizes the cost exactly for the linear model (static costs, a time limit; scipy has
no warm start, so the greedy plan is the fallback and the comparison); ``auto`` runs both (the MILP
up to ``MILP_MAX_CANDIDATES`` choices, when scipy is installed) and keeps the cheaper *verified*
plan. Every plan is checked with the planner's exact liveness after rewriting; if the linear model
was optimistic the target is lowered by the overshoot and the solve repeated. When nothing fits,
the graph is rewritten with the plan of the smallest peak reached (``RematReport.fits`` False;
pockc.compile then raises BudgetError naming that peak).

The boundary between forward and backward is per storage: schedule_memory may move backward
nodes (weight transposes) before forward ones, so a storage is *saved* when a backward or update
node reads it, and its gap runs from its last forward reader to its first backward reader.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import operator
import time
import uuid
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.fx as fx

from pockc.runtime import paging, rng

from .fx_utils import HIDDEN_MUTATION, PassResult, call, dce, is_aten, is_view, mutated_args
from .plan_memory import PAGED_KIND, WRITABLE_KINDS, flat, plan_memory, storages_of

aten = torch.ops.aten


MILP_MAX_CANDIDATES = 400     # solver="auto" runs the MILP next to greedy up to this many candidates
STATE_MIN_BYTES = 4096        # smaller optimizer state tensors stay in memory (not worth a copy's dispatch)


class _Infeasible(Exception):
    pass


@dataclass
class RematReport:
    """What rematerialize did: ``step.remat``."""
    solver: str                      # "greedy" / "milp" / "forced" / "none"
    solve_seconds: float
    budget: int | None
    peak_before: int
    peak_after: int
    required_after: int              # max(peak, arena) of the rewritten graph
    candidates: int                  # saved storages considered
    feasible: int                    # of which recomputable
    recomputed: list = field(default_factory=list)   # storage names recomputed
    nodes_added: int = 0
    added_seconds: float = 0.0       # estimated extra work per step (pockc/remat_cost.py)
    added_flops: float = 0.0
    fits: bool = True
    tries: dict = field(default_factory=dict)       # solver -> {"cost": s, "peak": B, "fits": bool, ...}
    paged: list = field(default_factory=list)        # storage names paged out and back
    paged_state: list = field(default_factory=list)  # optimizer state kept in the slow tier
    paged_state_bytes: int = 0
    pageable: int = 0                                # saved storages that could be paged
    objective: str = "time"                          # what the solver minimized
    added_cost: float = 0.0                          # in the objective's unit (s or J)
    cost_model: str = "default"                      # the cost model / device profile's name
    step_seconds: float = 0.0                        # estimated time of the step as traced (same model)

    @property
    def overhead(self) -> float:
        """Estimated added time over the step's own estimated time."""
        return self.added_seconds / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def bytes_saved(self) -> int:
        return self.peak_before - self.peak_after

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["bytes_saved"] = self.bytes_saved
        d["overhead"] = self.overhead
        return d

    def table(self) -> str:
        from tabulate import tabulate
        rows = [["solver", self.solver], ["planner time", f"{self.solve_seconds:.3f} s"],
                ["peak as traced", f"{self.peak_before:,} B"],
                ["peak after", f"{self.peak_after:,} B"],
                ["bytes saved", f"{self.bytes_saved:,} B"],
                ["tensors recomputed", f"{len(self.recomputed)} of {self.feasible} recomputable "
                                       f"({self.candidates} saved)"],
                ["tensors paged", f"{len(self.paged)} of {self.pageable} pageable"],
                ["optimizer state paged", f"{len(self.paged_state)} tensors, {self.paged_state_bytes:,} B "
                                          f"in the slow tier"],
                ["ops added", f"{self.nodes_added}"],
                ["added time (estimate)", f"{self.added_seconds * 1e3:.3f} ms, {self.added_flops / 1e6:.2f} MFLOP"
                                          f" recomputed"
                                          + (f", {self.overhead:.1%} of the step's {self.step_seconds * 1e3:.2f} ms"
                                             if self.step_seconds > 0 else "")],
                ["cost model", f"{self.cost_model}, minimizing {self.objective}"]]
        if self.objective == "energy":
            rows.append(["added energy (estimate)", f"{self.added_cost * 1e3:.4f} mJ"])
        if self.budget is not None:
            rows.insert(2, ["budget", f"{self.budget:,} B"])
        for name, t in self.tries.items():
            rows.append([f"  {name}", ", ".join(f"{k} {v}" for k, v in t.items())])
        return tabulate(rows, headers=["rematerialization", ""], tablefmt="simple")


@dataclass
class _Cand:
    sid: int
    name: str
    nbytes: int
    p: int              # position of the first backward reader: the clones go right before it
    lo: int             # bytes saved on positions lo..hi
    hi: int
    targets: list       # alias nodes of the storage read at or after p
    cost: float = 0.0   # cost of its clones when every other candidate is kept
    pen: list = field(default_factory=list)   # (lo, hi, bytes): kept inputs alive longer
    mode: str = "recompute"                   # or "page", or "state" (optimizer state in the slow tier)
    src: fx.Node | None = None  # page: the alias node whose storage is copied out
    o: int = -1         # page: the copy out starts right before node o (after the last forward reader)
    w: int = -1         # page: the copy out is waited for right before node w (alive until w - 1)
    q: int = -1         # page: the copy in starts right before node q
    seconds: float = 0.0  # estimated added time (the cost is in the objective's unit)

    def covers(self, t) -> bool:
        """Whether choosing it lowers the live bytes at position ``t``."""
        if self.mode == "state":      # the state's copy is alive from its copy in to its copy out
            return self.lo <= t <= self.hi and not self.q <= t <= self.w
        return self.lo <= t <= self.hi


def _out_of_place(target):
    """``aten.relu_.default`` -> ``aten.relu.default`` when only ``self`` is written."""
    name = target.overloadpacket.__name__
    if not name.endswith("_") or name.endswith("__"):
        return None
    args = target._schema.arguments
    writes = [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
    if writes != [0]:
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


_RANDOM_FILL = ("bernoulli_", "uniform_", "normal_", "exponential_", "geometric_", "log_normal_",
                "cauchy_", "random_")
_EMPTY = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
_STATE = "<rng state>"      # stands for the generator state saved before the original op


def _random_fill(m) -> bool:
    """``m`` fills a fresh, otherwise unused ``empty*`` buffer with random numbers (dropout's
    ``bernoulli_``): it can be replayed from the generator state saved before it."""
    if not (is_aten(m) and m.target.overloadpacket.__name__ in _RANDOM_FILL and m.args):
        return False
    if m.kwargs.get("generator") is not None:
        return False
    buf = m.args[0]
    return (isinstance(buf, fx.Node) and is_aten(buf) and buf.target.overloadpacket.__name__ in _EMPTY
            and list(buf.users) == [m])


def _clone_spec(m):
    """(target, args, kwargs) of the clone of forward node ``m``, or None if it may not be cloned."""
    if m.op != "call_function":
        return None
    if is_aten(m) and m.meta.get("pockc.role") == "forward":
        if m.target.overloadpacket.__name__ in _EMPTY and len(m.users) == 1 and _random_fill(next(iter(m.users))):
            v = m.meta["val"]           # the buffer a random fill overwrites: same layout, no input
            return (aten.empty_strided.default, (list(v.shape), list(v.stride())),
                    {"dtype": v.dtype, "device": v.device})
        if _random_fill(m):
            op = f"{m.target.overloadpacket.__name__}.{m.target._overloadname}"
            return rng.replay, (m.args[0], _STATE, op, *m.args[1:]), {}
    if m.target is operator.getitem:
        return m.target, m.args, m.kwargs
    if not is_aten(m):
        return None
    if is_view(m) and not m.target._schema.is_mutable:
        return m.target, m.args, m.kwargs        # a view of any role (the backward's detach)
    if m.meta.get("pockc.role") != "forward":
        return None
    t = m.target
    if torch.Tag.nondeterministic_seeded in t.tags:
        return None
    name = t.overloadpacket.__name__
    if name.startswith(("empty", "new_empty", "bernoulli", "rand", "normal", "uniform", "dropout")):
        return None
    schema = t._schema
    for i, a in enumerate(schema.arguments):
        if a.name == "dropout_p":
            v = m.args[i] if i < len(m.args) else m.kwargs.get(a.name, a.default_value)
            if v not in (0, 0.0, None):
                return None
    args = list(m.args)
    if t in HIDDEN_MUTATION:
        if t is not aten.native_batch_norm.default or len(args) < 6 or args[5] is not True:
            return None
        args[3] = args[4] = None          # batch statistics; do not update the running ones again
        return t, tuple(args), m.kwargs
    if schema.is_mutable:
        oop = _out_of_place(t)
        return (oop, m.args, m.kwargs) if oop is not None else None
    return t, m.args, m.kwargs


def _arg_nodes(args, kwargs):
    out = []
    fx.node.map_arg((args, kwargs), out.append)
    return out


class _Graph:
    """Liveness facts about the graph as scheduled (positions, storages, writers, saved set)."""

    def __init__(self, graph: fx.Graph, layout, cost):
        self.graph, self.layout, self.cost = graph, layout, cost
        nodes = self.nodes = list(graph.nodes)
        self.sec = [cost.seconds(n) for n in nodes]     # estimated seconds per node (paging windows)
        pos = self.pos = {n: i for i, n in enumerate(nodes)}
        self.first_bwd = min((pos[n] for n in nodes if n.meta.get("pockc.role") == "backward"), default=len(nodes))
        self.storages, self.root, _ = storages_of(graph, layout)   # kernel workspaces included
        self.timeline, self.persist = _liveness(nodes, self.storages, self.root)
        self.workspace = {s.start: s.nbytes for s in self.storages if s.kind == "workspace"}   # pos -> bytes
        self.writes = {}
        for n in nodes:
            for a in mutated_args(n):
                for s in flat(self.root.get(a)):
                    self.writes.setdefault(id(s), []).append(pos[n])
        alloc_role = {}
        for n in nodes:
            for s in flat(self.root.get(n)):
                if not s.persistent and id(s) not in alloc_role:
                    alloc_role[id(s)] = n.meta.get("pockc.role")
        # A storage's *real* readers: nodes reading one of its aliases that are not themselves
        # aliases of it (views, getitem). Saved: a forward storage read by a backward or update
        # node -- the scheduler may have moved some backward nodes (weight transposes) before
        # forward ones, so the boundary is per storage, not one position.
        aliases, readers = {}, {}
        for n in nodes:
            for s in flat(self.root.get(n)):
                if not s.persistent:
                    aliases.setdefault(id(s), []).append(n)
        for n in nodes:
            mine = {id(s) for s in flat(self.root.get(n))}
            for a in n.all_input_nodes:
                for s in flat(self.root.get(a)):
                    if s.persistent or (id(s) in mine and (is_view(n) or n.target is operator.getitem)):
                        continue
                    readers.setdefault(id(s), {})[n] = None
        self.saved, self.aliases, self.readers = {}, aliases, readers
        for s in self.storages:
            if s.persistent or alloc_role.get(id(s)) != "forward":
                continue
            if any(r.meta.get("pockc.role") not in ("forward", None) for r in readers.get(id(s), ())):
                self.saved[id(s)] = s
        out = nodes[-1]
        self.pinned = {id(s) for a in out.all_input_nodes for s in flat(self.root.get(a))}
        self._spec = {}

    def spec(self, m):
        if m not in self._spec:
            self._spec[m] = _clone_spec(m)
        return self._spec[m]

    def written_between(self, s, a, b) -> bool:
        return any(a < w < b for w in self.writes.get(id(s), ()))

    def usable(self, m, p, chosen, paged=()) -> bool:
        """May a clone placed at ``p`` read the original ``m`` (or, for a paged storage, its
        copy paged back in)?"""
        sts = flat(self.root.get(m))
        for s in sts:
            # Written in place after m (paged or not): the storage, and a copy paged out after
            # its last forward reader, hold the new values, not m's.
            if self.written_between(s, self.pos[m], p):
                return False
            if not s.persistent and id(s) in paged:
                continue
            if not s.persistent and (id(s) in chosen or id(s) not in self.saved):
                return False
        return True

    def chain(self, targets, p, chosen, paged=()):
        """Forward nodes to clone (in graph order) so that ``targets`` exist at ``p``, and the
        original nodes the clones read directly (``paged``: storages whose copies paged back in
        may be read). Raises _Infeasible."""
        clone, direct = set(), set()
        stack = list(targets)
        forced = set(targets)
        while stack:
            m = stack.pop()
            if m in clone or m in direct:
                continue
            if m not in forced and self.usable(m, p, chosen, paged):
                direct.add(m)
                continue
            spec = self.spec(m)
            if spec is None:
                raise _Infeasible(m.name)
            clone.add(m)
            stack.extend(_arg_nodes(spec[1], spec[2]))
        return sorted(clone, key=self.pos.__getitem__), direct

    def candidates(self, page=False):
        """Recompute candidates (and, with ``page``, page candidates) of every saved storage;
        also the number of storages considered."""
        cands, considered = [], 0
        for sid, s in self.saved.items():
            if sid in self.pinned or s.nbytes == 0:
                continue
            rs = list(self.readers.get(sid, ()))
            p = min(self.pos[r] for r in rs if r.meta.get("pockc.role") not in ("forward", None))
            last_fwd = max([s.start] + [self.pos[r] for r in rs if self.pos[r] < p])
            if last_fwd + 1 > p - 1:
                continue                     # read by the backward right away: nothing to save
            considered += 1
            als = set(self.aliases[sid])
            targets = list(dict.fromkeys(a for r in rs if self.pos[r] >= p
                                         for a in r.all_input_nodes if a in als))
            c = _Cand(sid, s.name, s.nbytes, p, last_fwd + 1, p - 1, targets)
            try:
                order, direct = self.chain(targets, p, {sid})
                c.cost = sum(self.cost(m) for m in order)
                c.seconds = sum(self.cost.seconds(m) for m in order)
                c.pen = self._penalties(direct, p)
                c.pen += [(self.pos[m], p - 1, _state_bytes(m.meta["val"].device))   # saved generator states
                          for m in order if self.spec(m)[0] is rng.replay]
                ws = max((self.workspace.get(self.pos[m], 0) for m in order), default=0)
                if ws:          # the clones' kernel scratch (one at a time), right before p
                    c.pen.append((p, p, ws))
                cands.append(c)
            except _Infeasible:
                pass
            if page:
                pc = self._page_cand(s, c)
                if pc is not None:
                    cands.append(pc)
        return cands, considered

    def state_candidates(self, min_bytes: int = STATE_MIN_BYTES):
        """Page candidates for optimizer state tensors read only by their update: the state stays in
        the slow tier between steps and is copied into a fresh storage for its update (waited for
        right before the update's first op, started early enough to hide the copy, estimated) and
        back right after (waited for once the estimated copy time has passed). It saves its bytes
        everywhere but while that copy lives."""
        if self.layout is None:
            return []
        from pockc.runtime.optim import ACCUM_STATE
        touch = {}                              # persistent storage id -> positions of its readers/aliases
        for n in self.nodes:
            if n.op == "placeholder":
                continue
            for a in list(n.all_input_nodes) + [n]:
                for st in flat(self.root.get(a)):
                    if st.persistent:
                        touch.setdefault(id(st), set()).add(self.pos[n])
        cm, N, out = self.cost, len(self.nodes), []
        phs = self.layout.placeholders(self.graph)["state"]
        for ph, (_name, kind) in zip(phs, self.layout.state):
            st = self.root.get(ph)
            if kind == ACCUM_STATE or st is None or isinstance(st, list) or st.nbytes < min_bytes:
                continue
            ps = touch.get(id(st))
            if not ps or max(ps) >= N - 1 or any(self.nodes[i].meta.get("pockc.role") != "update" for i in ps):
                continue
            u, last = min(ps), max(ps)
            t_in, t_out = st.nbytes / cm.page_read_rate, st.nbytes / cm.page_write_rate
            q, win_in = u, 0.0
            while q > 0 and win_in < t_in:
                q -= 1
                win_in += self.sec[q]
            w, win_out = last + 1, 0.0
            while w < N - 1 and win_out < t_out:
                win_out += self.sec[w]
                w += 1
            c = _Cand(id(st), ph.name, st.nbytes, u, 0, N - 1, [ph], mode="state", src=ph, o=last + 1, w=w, q=q)
            c.pen = [(q, w, st.nbytes)]
            c.cost = cm.page_cost(st.nbytes, win_out, win_in)
            c.seconds = cm.page_seconds(st.nbytes, win_out, win_in)
            out.append(c)
        return out

    def _page_cand(self, s, c):
        """Page storage ``s`` out after its last forward reader and back before ``c.p``: the
        copies get windows of compute long enough to hide them (estimated), up to half the gap
        each; None when nothing would be saved or the storage cannot be paged."""
        sid = c.sid
        if self.written_between(s, c.lo - 1, c.p):
            return None
        vals = [m.meta.get("val") for m in self.aliases[sid]]
        if any(not isinstance(v, torch.Tensor) for m, v in zip(self.aliases[sid], vals) if m in c.targets):
            return None
        if len({v.dtype for v in vals if isinstance(v, torch.Tensor)}) != 1 or not self.extent(c):
            return None
        src = next((m for m, v in zip(self.aliases[sid], vals)
                    if isinstance(v, torch.Tensor) and self.pos[m] < c.lo), None)
        if src is None:
            return None
        cm = self.cost
        t_out, t_in = c.nbytes / cm.page_write_rate, c.nbytes / cm.page_read_rate
        mid = (c.lo + c.p) // 2
        w, win_out = c.lo, 0.0
        while w < mid and win_out < t_out:
            win_out += self.sec[w]
            w += 1
        q, win_in = c.p, 0.0
        while q > max(w, mid) and win_in < t_in:
            q -= 1
            win_in += self.sec[q]
        if q <= w:
            return None
        pc = _Cand(sid, s.name, s.nbytes, c.p, w, q - 1, c.targets, mode="page", src=src, o=c.lo, w=w, q=q)
        pc.cost = cm.page_cost(c.nbytes, win_out, win_in)
        pc.seconds = cm.page_seconds(c.nbytes, win_out, win_in)
        return pc

    def _penalties(self, direct, p):
        out = []
        for m in direct:
            for s in flat(self.root.get(m)):
                if not s.persistent and s.end < p - 1:
                    out.append((s.end + 1, p - 1, s.nbytes))
        return out

    def build(self, chosen_cands):
        """A new graph with the chosen candidates recomputed or paged: a namespace with ``graph``,
        ``cost`` (objective), ``seconds``, ``flops``, ``added`` (nodes), ``recomputed`` and
        ``paged`` (storage names), ``pool`` (the page pool's key and bytes, or None)."""
        from pockc.remat_cost import flops as _flops
        rec = [c for c in chosen_cands if c.mode == "recompute"]
        pag = {c.sid: c for c in chosen_cands if c.mode == "page"}
        sta = [c for c in chosen_cands if c.mode == "state"]
        chosen = {c.sid for c in rec} | set(pag)
        chains, need = {}, {}
        for c in rec:           # clones may read a paged storage: page it in by then
            order, direct = self.chain(c.targets, c.p, chosen, pag)
            chains[id(c)] = order
            for m in direct:
                for s in flat(self.root.get(m)):
                    if id(s) in pag:
                        need.setdefault(id(s), set()).add((c.p, m))
        events = {}             # position -> [(rank, kind, cand)]
        plan = {}
        for sid, c in list(pag.items()):
            reads = need.get(sid, set())
            u = min([c.p] + [p for p, _ in reads])
            if u <= c.o:        # a clone needs it before it could be paged out: keep it instead
                del pag[sid]
                continue
            w = min(c.w, u)
            q = max(min(c.q, u), w)
            plan[sid] = (w, q, u, list(dict.fromkeys(list(c.targets) + [m for _, m in reads])))
            for pos, rank, kind in ((c.o, 0, "out"), (w, 1, "out_wait"), (q, 2, "in"), (u, 3, "in_wait")):
                events.setdefault(pos, []).append((rank, kind, c))
        state_key = f"pockc-state-{uuid.uuid4().hex[:12]}" if sta else None
        slot = {}
        for k, c in enumerate(sta):
            slot[c.sid] = k
            for pos, rank, kind in ((c.o, 0, "s_out"), (c.w, 1, "s_out_wait"), (c.q, 2, "s_in"), (c.p, 3, "s_in_wait")):
                events.setdefault(pos, []).append((rank, kind, c))
        tier = {c.src for c in sta}
        groups = {}
        for c in rec:
            groups.setdefault(c.p, []).append(c)
        replays = {m for order in chains.values() for m in order if self.spec(m)[0] is rng.replay}
        states = {}
        pool_key, offsets, total = None, {}, 0
        for sid, c in pag.items():
            offsets[sid] = total
            total += (self.extent(c) + 63) // 64 * 64
        if pag:
            pool_key = f"pockc-page-{uuid.uuid4().hex[:12]}"

        g = fx.Graph()
        env, remap = {}, {}
        cost = secs = fl = 0.0
        added = 0
        handles = {}

        def look(a):
            return remap[a] if a in remap else env[a]

        def page_node(fn, args, c, role, val=None):
            node = g.call_function(fn, args)
            node.meta = {"pockc.role": role, "pockc.page": c.name, "val": val}
            return node
        for n in self.nodes:
            i = self.pos[n]
            for _, kind, c in sorted(events.get(i, ()), key=lambda e: e[0]):
                if kind.startswith("s_"):     # optimizer state in the slow tier
                    ph, k = c.src, slot[c.sid]
                    if kind == "s_in":
                        handles[c.sid] = page_node(paging.state_in, (env[ph], state_key, k,
                                                                     str(ph.meta["val"].device)), c, "update",
                                                   ph.meta["val"])
                    elif kind == "s_in_wait":
                        remap[ph] = page_node(paging.state_in_wait, (handles[c.sid], state_key, k), c, "update",
                                              ph.meta["val"])
                        cost += c.cost
                        secs += c.seconds
                    elif kind == "s_out":
                        handles[c.sid] = page_node(paging.state_out, (remap[ph], env[ph], state_key, k), c,
                                                   "update")
                    else:
                        page_node(paging.state_out_wait, (handles[c.sid], remap.pop(ph), state_key), c, "update")
                    added += 1
                    continue
                off, nb = offsets[c.sid], self.extent(c)
                src = c.src
                if kind == "out":
                    handles[c.sid] = page_node(paging.page_out, (env[src], pool_key, off, nb, total), c, "forward")
                elif kind == "out_wait":
                    page_node(paging.page_out_wait, (handles[c.sid], env[src], pool_key), c, "forward")
                elif kind == "in":
                    val = _fake_bytes(src.meta["val"], nb)
                    handles[c.sid] = page_node(paging.page_in, (handles[c.sid], pool_key, off, nb, total,
                                                                str(src.meta["val"].device)), c, "backward", val)
                else:
                    buf = page_node(paging.page_in_wait, (handles[c.sid], pool_key, off), c, "backward",
                                    handles[c.sid].meta["val"])
                    for m in plan[c.sid][3]:
                        v = m.meta["val"]
                        typed = call(g, aten.view.dtype, (buf, v.dtype))
                        remap[m] = call(g, aten.as_strided.default,
                                        (typed, list(v.shape), list(v.stride()), v.storage_offset()))
                        for x in (typed, remap[m]):
                            x.meta.update({"pockc.role": "backward", "pockc.page": c.name})
                    added += 2 * len(plan[c.sid][3])
                    cost += c.cost
                    secs += c.seconds
                added += 1
            if i in groups:
                memo = {}
                for c in groups[i]:
                    for m in chains[id(c)]:
                        if m in memo:
                            continue
                        target, args, kwargs = self.spec(m)

                        def sub(a):
                            return memo[a] if a in memo else look(a)
                        args, kwargs = torch.fx.node.map_arg((args, kwargs), sub)
                        if target is rng.replay:
                            args = (args[0], states[m], *args[2:])
                        new = g.create_node("call_function", target, args, kwargs, name=f"{m.name}_remat")
                        new.meta = copy.copy(m.meta)
                        new.meta["pockc.role"] = "backward"
                        new.meta["pockc.remat"] = m.name
                        memo[m] = new
                        cost += self.cost(m)
                        secs += self.cost.seconds(m)
                        fl += _flops(m)
                        added += 1
                    for m in c.targets:
                        remap[m] = memo[m]
            if n in replays:          # save the generator's state right before the random op
                dev = n.meta["val"].device
                st = states[n] = g.call_function(rng.rng_state, (str(dev),))
                st.meta = {"pockc.role": "forward", "pockc.rng_state": n.name,
                           "val": _fake_bytes(n.meta["val"], _state_bytes(dev))}
                added += 1
            env[n] = g.node_copy(n, look)
            if n in tier:
                env[n].meta = dict(n.meta, **{"pockc.tier": PAGED_KIND})
        dce(SimpleNamespace(graph=g))   # views of the originals left without readers
        return SimpleNamespace(graph=g, cost=cost, seconds=secs, flops=fl, added=added,
                               recomputed=[c.name for c in rec], paged=[pag[s].name for s in pag],
                               pool=(pool_key, total) if pag else None, paged_state=[c.name for c in sta],
                               paged_state_bytes=sum(c.nbytes for c in sta), state_pool=state_key)

    def extent(self, c) -> int:
        """Bytes of ``c``'s storage that its aliases use (what is paged)."""
        ext = 0
        for m in self.aliases[c.sid]:
            v = m.meta.get("val")
            if isinstance(v, torch.Tensor) and v.numel():
                span = 1 + sum((d - 1) * st for d, st in zip(v.shape, v.stride()) if d > 0)
                ext = max(ext, (v.storage_offset() + span) * v.element_size())
        return ext


_STATE_BYTES = {}


def _sink_state_only_updates(graph: fx.Graph, layout) -> None:
    """Move update ops that read only an optimizer state tensor (and inputs), such as SGD's
    ``momentum.mul_(0.9)``, which the memory scheduler is free to run early, to right before
    their first user: the state is then needed in memory only around its update. Such an op
    allocates nothing, so the memory plan is unchanged."""
    phs = layout.placeholders(graph)["state"]
    for ph in phs:
        if len(ph.users) != 1:
            continue
        m = next(iter(ph.users))
        if (m.meta.get("pockc.role") != "update" or not m.users
                or any(a.op != "placeholder" for a in m.all_input_nodes)):
            continue
        pos = {n: i for i, n in enumerate(graph.nodes)}
        first = min(m.users, key=pos.__getitem__)
        if pos[first] > pos[m] + 1:
            first.prepend(m)


def _state_bytes(device) -> int:
    key = str(device)
    if key not in _STATE_BYTES:
        _STATE_BYTES[key] = rng.state_numel(device)
    return _STATE_BYTES[key]


def _fake_bytes(like, nbytes):
    """A fake uint8 tensor of ``nbytes`` on ``like``'s device, in ``like``'s fake mode."""
    from torch._guards import detect_fake_mode
    mode = getattr(like, "fake_mode", None) or detect_fake_mode([like])
    if mode is None:
        return torch.empty(nbytes, dtype=torch.uint8, device="meta")
    with mode:
        return torch.empty(nbytes, dtype=torch.uint8, device=like.device)


def _liveness(nodes, storages, root):
    """Live writable bytes per position, as plan_memory computes them (without the arena): kernel
    workspaces (storages_of's ``workspace`` storages, alive at their node) included."""
    idx = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        i = idx[n]
        for a in n.all_input_nodes:
            for s in flat(root.get(a)):
                if not s.persistent and i > s.end:
                    s.end = i
        if n.op == "output":
            for a in n.all_input_nodes:
                for s in flat(root.get(a)):
                    if not s.persistent:
                        s.end = len(nodes) - 1
    persist = sum(s.nbytes for s in storages if s.persistent and s.kind in WRITABLE_KINDS)
    delta = np.zeros(len(nodes) + 1, dtype=np.int64)
    for s in storages:
        if not s.persistent:
            delta[s.start] += s.nbytes
            delta[s.end + 1] -= s.nbytes
    return np.cumsum(delta)[:len(nodes)] + persist, persist


def _peak(graph, layout) -> int:
    nodes = list(graph.nodes)
    storages, root, _ = storages_of(graph, layout)
    live, persist = _liveness(nodes, storages, root)
    return int(live.max()) if len(live) else persist


def _greedy(G, cands, target, rerank=8):
    """Cover the largest excess over ``target`` with the candidate of most bytes per second;
    returns the chosen candidates (the most it can cover when the target is unreachable) and
    whether the model says the target is met."""
    excess = G.timeline.astype(np.float64) - target
    chosen, ids = [], set()

    def shift(c, sign):
        excess[c.lo:c.hi + 1] -= sign * c.nbytes
        for lo, hi, b in c.pen:
            excess[lo:hi + 1] += sign * b
    while True:
        t = int(np.argmax(excess))
        if excess[t] <= 0:
            # drop what later choices made redundant, most expensive first
            for c in sorted(chosen, key=lambda c: -c.cost):
                shift(c, -1)
                if excess.max() <= 0:
                    chosen.remove(c)
                    ids.discard(c.sid)
                else:
                    shift(c, 1)
            return chosen, True
        cover = [c for c in cands if c.sid not in ids and c.covers(t)]
        if not cover:
            return chosen, False
        cover.sort(key=lambda c: -c.nbytes / (c.cost + 1e-9))
        best, best_r = None, -1.0
        paged = {x.sid for x in chosen if x.mode == "page"}
        for c in cover[:rerank]:     # cost given what is already recomputed (chains get longer)
            if c.mode != "recompute":
                r = c.nbytes / (c.cost + 1e-9)
            else:
                try:
                    order, _ = G.chain(c.targets, c.p, ids | {c.sid}, paged)
                except _Infeasible:
                    continue
                r = c.nbytes / (sum(G.cost(m) for m in order) + 1e-9)
            if r > best_r:
                best, best_r = c, r
        if best is None:
            return chosen, False
        chosen.append(best)
        ids.add(best.sid)
        shift(best, 1)


def _modeled_peak(G, chosen) -> float:
    live = G.timeline.astype(np.float64)
    for c in chosen:
        live[c.lo:c.hi + 1] -= c.nbytes
        for lo, hi, b in c.pen:
            live[lo:hi + 1] += b
    return float(live.max())


def _milp(G, cands, target, time_limit):
    """Minimum-cost cover under the linear memory model (scipy.optimize.milp / HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    excess = G.timeline.astype(np.float64) - target
    rows_t = np.nonzero(excess > 0)[0]
    if not len(rows_t):
        return [], True
    n = len(cands)
    A = np.zeros((len(rows_t), n))

    def rows(lo, hi):       # the constrained positions within lo..hi
        return slice(int(np.searchsorted(rows_t, lo, "left")), int(np.searchsorted(rows_t, hi, "right")))
    for j, c in enumerate(cands):
        A[rows(c.lo, c.hi), j] += c.nbytes
        for lo, hi, b in c.pen:
            A[rows(lo, hi), j] -= b
    # one constraint per distinct row, with the largest excess it must cover
    uniq = {}
    for k in range(len(rows_t)):
        key = A[k].tobytes()
        e = excess[rows_t[k]]
        if key not in uniq or uniq[key][1] < e:
            uniq[key] = (k, e)
    ks = [k for k, _ in uniq.values()]
    lb = np.array([e for _, e in uniq.values()])
    if np.any(A[ks].clip(min=0).sum(axis=1) < lb):
        return None, False                  # some point cannot be covered at all
    scale = max(1e-12, max((c.cost for c in cands), default=1.0))
    cons = [LinearConstraint(A[ks] / 1024.0, lb=lb / 1024.0, ub=np.inf)]
    by_sid = {}
    for j, c in enumerate(cands):
        by_sid.setdefault(c.sid, []).append(j)
    pairs = [js for js in by_sid.values() if len(js) > 1]
    if pairs:                                   # keep, recompute or page: one choice per storage
        E = np.zeros((len(pairs), n))
        for r, js in enumerate(pairs):
            E[r, js] = 1.0
        cons.append(LinearConstraint(E, lb=0, ub=1))
    res = milp(c=np.array([c.cost / scale + 1e-6 for c in cands]), constraints=cons,
               integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return None, False
    return [c for c, x in zip(cands, res.x) if x > 0.5], True


def _fits(G, chosen, budget, layout):
    """Rewrite and plan; the arena (slow to place) only once the liveness peak fits. The build's
    namespace with ``mp`` (the plan), or None when the choices conflict."""
    try:
        b = G.build(chosen)
    except _Infeasible:
        return None
    peak = _peak(b.graph, layout)
    if budget is not None and peak > budget:
        b.mp = SimpleNamespace(peak_bytes=peak, required_bytes=peak)
    else:
        b.mp = plan_memory(SimpleNamespace(graph=b.graph), layout)
    return b


def rematerialize(gm: fx.GraphModule, layout=None, budget_bytes: int | None = None, cost=None,
                  solver: str = "auto", time_limit: float = 1.0, recompute=None, page=None,
                  allow_paging: bool = True, page_state: bool = False, state=None) -> PassResult:
    """Recompute or page out saved activations so the step's planned memory (``max(peak,
    arena)``) fits ``budget_bytes`` at the least estimated added cost (``cost``: a
    pockc.remat_cost.CostModel; paging only where ``allow_paging`` and the model has a tier).
    ``page_state`` (with ``layout``; a step whose updates are in this graph, not an accumulation's
    apply program): optimizer state tensors may also be kept in the slow tier between steps and
    copied in for their update only (:meth:`_Graph.state_candidates`), chosen by the same solver.
    ``recompute`` / ``page`` / ``state``: storage names to recompute / page / keep in the tier
    instead of solving (replays an earlier decision on a graph traced for another batch shape).
    Records ``gm.meta['pockc.remat']`` (a RematReport; ``fits`` False when no plan found fits: the graph is then rewritten with the
    plan of the smallest peak reached)."""
    from pockc.remat_cost import default_cost_model
    if solver not in ("auto", "greedy", "milp"):
        raise ValueError(f"rematerialize: solver must be auto, greedy or milp, not {solver!r}")
    t0 = time.perf_counter()
    if cost is None:
        dev = next((n.meta["val"].device.type for n in gm.graph.nodes
                    if isinstance(n.meta.get("val"), torch.Tensor)), "cpu")
        cost = default_cost_model(dev)
    if (page_state or state) and layout is not None and budget_bytes is not None or state:
        _sink_state_only_updates(gm.graph, layout)
    G = _Graph(gm.graph, layout, cost)
    peak0 = int(G.timeline.max()) if len(G.timeline) else G.persist
    before = SimpleNamespace(peak_bytes=peak0, required_bytes=peak0)
    if budget_bytes is None or peak0 <= budget_bytes:
        before = plan_memory(gm, layout)                # the arena may still be over
    cands, n_saved = G.candidates(page=allow_paging and cost.can_page)
    if (page_state and allow_paging and cost.can_page) or state:
        cands += G.state_candidates()
    n_rec = sum(c.mode == "recompute" for c in cands)

    def finish(name, b, fits, tries):
        rep = RematReport(name, time.perf_counter() - t0, budget_bytes, before.peak_bytes, b.mp.peak_bytes,
                          b.mp.required_bytes, n_saved, n_rec, b.recomputed, b.added, b.seconds, b.flops, fits,
                          tries, paged=b.paged, pageable=len(cands) - n_rec, objective=cost.objective,
                          added_cost=b.cost, cost_model=cost.name, paged_state=getattr(b, "paged_state", []),
                          paged_state_bytes=getattr(b, "paged_state_bytes", 0), step_seconds=float(sum(G.sec)))
        if b.recomputed or b.paged or rep.paged_state:
            b.graph.lint()
            gm.graph = b.graph             # (the setter recompiles)
            if hasattr(b.mp, "storages"):
                gm.meta["pockc.remat_plan"] = b.mp    # plan_memory of this very graph, for the caller
        if b.pool is not None:              # the pool's file mapping goes with the graph
            weakref.finalize(gm, paging.release, b.pool[0])
        if getattr(b, "state_pool", None) is not None:   # its copy thread too
            weakref.finalize(gm, paging.release, b.state_pool)
        gm.meta["pockc.remat"] = rep
        return PassResult(gm, bool(b.recomputed or b.paged or rep.paged_state))

    if recompute is not None or page is not None or state is not None:
        rnames, pnames, snames = set(recompute or ()), set(page or ()), set(state or ())
        chosen = [c for c in cands if (c.mode == "recompute" and c.name in rnames)
                  or (c.mode == "page" and c.name in pnames) or (c.mode == "state" and c.name in snames)]
        b = _fits(G, chosen, budget_bytes, layout)
        if b is None:
            raise RuntimeError("rematerialize: the recorded recompute/page decisions conflict on this graph")
        return finish("forced", b, budget_bytes is None or b.mp.required_bytes <= budget_bytes, {})
    if budget_bytes is None or before.required_bytes <= budget_bytes:
        none = SimpleNamespace(graph=gm.graph, mp=before, cost=0.0, seconds=0.0, flops=0.0, added=0,
                               recomputed=[], paged=[], pool=None)
        return finish("none", none, True, {})

    solvers = ["greedy"]
    if solver in ("auto", "milp"):
        if importlib.util.find_spec("scipy") is not None and (solver == "milp" or len(cands) <= MILP_MAX_CANDIDATES):
            solvers = ["greedy", "milp"] if solver == "auto" else ["milp"]
        elif solver == "milp":
            raise ImportError("rematerialize: solver='milp' needs scipy (pip install pockc[remat])")
    results, tries = [], {}
    smallest = None                                   # (required, solver, build) of the lowest peak
    rec_only = [c for c in cands if c.mode == "recompute"]
    runs = [(name, cands, name) for name in solvers]
    if len(rec_only) < len(cands):   # if nothing fits with paging, recomputation alone may still
        runs += [(name, rec_only, f"{name} (recompute only)") for name in solvers]  # reach lower
    for name, pool, label in runs:
        if results and pool is rec_only:
            break
        ts = time.perf_counter()
        if name == "milp" and "scipy import" not in tries:   # about a second, once per process
            importlib.import_module("scipy.optimize")
            tries["scipy import"] = {"seconds": round(time.perf_counter() - ts, 3)}
            ts = time.perf_counter()
        target = float(budget_bytes)
        found = None
        for _ in range(8):
            if name == "greedy":
                chosen, ok = _greedy(G, pool, target)
            else:
                chosen, ok = _milp(G, pool, target, time_limit)
                if chosen is None:
                    chosen, ok = _greedy(G, pool, target)     # best effort for the error message
            b = _fits(G, chosen, budget_bytes, layout)
            if b is None:
                break
            req = b.mp.required_bytes
            if smallest is None or req < smallest[0]:
                smallest = (req, label, b)
            if req <= budget_bytes:
                found = b
                break
            if not ok:
                break
            # the model was optimistic by (req - budget): aim that much below what it predicted
            target = min(target, _modeled_peak(G, chosen)) - (req - budget_bytes) - 1024
        secs = time.perf_counter() - ts
        if found is not None:
            tries[label] = {"cost": f"{found.cost:.4g}", "recomputed": len(found.recomputed),
                            "paged": len(found.paged), "peak": found.mp.required_bytes, "seconds": round(secs, 3)}
            results.append((found.cost, label, found))
        else:
            tries[label] = {"fits": False, "smallest": req if b is not None else None, "seconds": round(secs, 3)}
    if results:
        _, name, b = min(results, key=lambda r: (r[0], r[1]))
        return finish(name, b, True, tries)
    if smallest is None:
        raise RuntimeError("rematerialize: no plan could be built")
    _, name, b = smallest
    return finish(name, b, False, tries)
