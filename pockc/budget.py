"""Choose what to fine-tune under a memory budget, with the memory planner's real figures.

Candidates: the last ``max_layers`` layers with parameters, in forward execution order (a layer
is a module that owns parameters directly: conv, linear, norm, embedding). Options per layer:

* ``bias``            its bias (for a norm layer: the shift),
* ``channels:R``      its bias and R of its weight's output channels (R in ``CHANNEL_RATIOS``,
                      weights with at least 8 output channels),
* ``full``            all its parameters.

Benefit: the contribution scores of a layer-sensitivity analysis when given (``scores``:
``{(layer, option): score}``), otherwise the documented prior of Tiny Training / PockEngine --
later layers matter more and biases are cheapest: ``benefit = depth**2 * OPTION_PRIOR[option]``
with ``depth = (k + 1) / K`` for the k-th of K candidate layers.

Cost: the ``bias`` and ``full`` options of every candidate layer are compiled and planned alone
(pockc's own pipeline, exact peak, the kernels' measured workspaces included: plan_memory). A
``channels:R`` option differs from ``full`` only in the
trained rows of the weight, its gradient and its optimizer state, so its peak is estimated as
``peak(full) - (1 - R) * weight_bytes * (2 + optimizer state tensors)`` (never below ``bias``),
marked ``~`` in the table. A plan's peak is modelled as ``base + sum(peak(option) - base)`` with
``base`` the smallest single-layer peak. Over that additive model the multiple-choice knapsack is solved exactly by dynamic
programming. The model is usually pessimistic (the backward through later layers is shared), so the
chosen plan is then compiled and planned for real: if it exceeds the budget the capacity shrinks by
the excess and the knapsack is solved again; if it leaves room the capacity grows by the slack.
Only a plan whose *real* planned peak fits is ever returned.

With ``fit_with_remat`` (compile's default: ``max_overhead=0.15``), plans that do not fit as they
are may still fit by recomputing or paging saved activations (and paging optimizer state):
once the search above has settled, the capacity of the additive model grows step by step beyond
the budget, each new plan is compiled and handed to the rematerialization solver, and a plan
counts as fitting when the solver fits it under the budget at an estimated added time of at most
``max_overhead`` of the step's own estimated time (pockc/remat_cost.py). Growth stops at the
first plan the solver cannot fit that cheaply (then bisects once between it and the last that
fitted) or when the knapsack takes every candidate; the plan of most benefit wins.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pockc.errors import BudgetError, CompileError
from pockc.memory import format_bytes
from pockc.plan import Rule, UpdatePlan, _is_norm, canonical_names, tied_parameters

CHANNEL_RATIOS = (0.125, 0.25, 0.5)
OPTION_PRIOR = {"bias": 0.3, "channels:0.125": 0.45, "channels:0.25": 0.55, "channels:0.5": 0.75, "full": 1.0}
MAX_REFINE = 6
REMAT_TRIES = 6           # plans handed to the rematerialization solver, at most
REMAT_GROWTH = 1.5        # capacity factor per step beyond the plans that fit as they are
DP_UNITS = 4000


@dataclass
class Candidate:
    layer: str
    option: str
    rules: dict                  # param name -> Rule
    peak: int = 0                # planned peak of the single-layer plan
    estimated: bool = False      # peak derived from the full option's (channels:R)
    weight_bytes: int = 0
    benefit: float = 0.0
    cost: int = 0                # peak - base


@dataclass
class Selection:
    plan: UpdatePlan
    peak: int                    # real planned peak of the chosen plan
    budget: int
    candidates: list = field(default_factory=list)
    chosen: dict = field(default_factory=dict)   # layer -> option
    base: int = 0
    tries: list = field(default_factory=list)    # (capacity, planned peak, fits)
    remat_tries: list = field(default_factory=list)  # (capacity, peak as traced, fits, overhead, how)
    remat: object = None          # the chosen plan's RematReport when it fits only through remat
    max_overhead: float | None = None
    benefit: float = 0.0          # the chosen plan's expected benefit (the source's units)
    seconds: float = 0.0
    source: str = "prior"
    required: dict = field(default_factory=dict)  # param name -> Rule, trained by every plan

    def table(self) -> str:
        from tabulate import tabulate
        rows = []
        if self.required:
            rows.append([_layers_of(self.required), "base", "", f"{self.base:,}", "0", "always"])
        for c in self.candidates:
            rows.append([c.layer, c.option, f"{c.benefit:.3f}", ("~" if c.estimated else "") + f"{c.peak:,}",
                         ("~" if c.estimated else "") + f"{c.cost:,}",
                         "yes" if self.chosen.get(c.layer) == c.option else ""])
        alone = "peak with base (B)" if self.required else "peak alone (B)"
        out = tabulate(rows, headers=["layer", "option", f"benefit ({self.source})", alone,
                                      "cost over base (B)", "chosen"], tablefmt="simple")
        if self.remat_tries:
            rt = [[f"{c:,}", f"{p:,}", "yes" if f else "no", why] for c, p, f, _, why in self.remat_tries]
            out += "\n\n" + tabulate(rt, headers=["capacity (B)", "peak as traced (B)",
                                                   f"fits with remat (overhead <= {self.max_overhead:.0%})",
                                                   "how"], tablefmt="simple")
        if self.remat is not None:
            r = self.remat
            out += (f"\nchosen plan fits through rematerialization: {len(r.recomputed)} tensors recomputed, "
                    f"{len(r.paged)} paged, {len(r.paged_state)} optimizer state tensors paged; estimated "
                    f"added time {r.added_seconds * 1e3:.2f} ms ({r.overhead:.1%} of the step)")
        return out

    def to_dict(self) -> dict:
        return {"budget": self.budget, "peak": self.peak, "base": self.base, "chosen": self.chosen,
                "benefit": self.benefit,
                "source": self.source, "seconds": round(self.seconds, 3),
                "required": {n: str(r) for n, r in self.required.items()},
                "tries": [{"capacity": c, "peak": p, "fits": f} for c, p, f in self.tries],
                "max_overhead": self.max_overhead,
                "remat_tries": [{"capacity": c, "peak": p, "fits": f, "overhead": o, "how": w}
                                for c, p, f, o, w in self.remat_tries],
                "remat": None if self.remat is None else self.remat.to_dict(),
                "candidates": [{"layer": c.layer, "option": c.option, "benefit": c.benefit, "peak": c.peak,
                                "estimated": c.estimated, "cost": c.cost} for c in self.candidates]}


def layer_options(model, exec_order, max_layers=12, exclude=()):
    """[(layer, option, rules)] for the last ``max_layers`` layers with direct parameters, leaving
    out layers whose parameters are all in ``exclude`` (e.g. a base update that is always trained)."""
    mods = dict(model.named_modules())
    layers = []
    for m in exec_order:
        mod = mods.get(m)
        if mod is None:
            continue
        own = [f"{m}.{n}" if m else n for n, p in mod.named_parameters(recurse=False) if p.is_floating_point()]
        if own and m not in layers and not set(own) <= set(exclude):
            layers.append(m)
    layers = layers[-max_layers:]
    out = []
    for m in layers:
        mod = mods[m]
        own = dict(mod.named_parameters(recurse=False))
        full = {f"{m}.{n}" if m else n: Rule("full") for n in own}
        bias_name = "bias" if "bias" in own else None
        opts = []
        if bias_name is not None and len(own) > 1:
            opts.append(("bias", {f"{m}.bias" if m else "bias": Rule("full")}))
        w = own.get("weight")
        if w is not None and w.dim() >= 2 and w.shape[0] >= 8 and not _is_norm(mod):
            for r in CHANNEL_RATIOS:
                rules = {f"{m}.weight" if m else "weight": Rule.parse(f"channels:{r}")}
                if bias_name is not None:
                    rules[f"{m}.bias" if m else "bias"] = Rule("full")
                opts.append((f"channels:{r:g}", rules))
        opts.append(("full", full))
        out += [(m, o, r) for o, r in opts]
    return out


def _layers_of(param_names) -> str:
    """The modules owning ``param_names``, e.g. "classifier, head"."""
    return ", ".join(sorted({n.rsplit(".", 1)[0] if "." in n else "" for n in param_names}))


def _plan_of(model, rules) -> UpdatePlan:
    canonical = canonical_names(model)      # a rule on a tied alias (lm_head.weight) trains the tensor
    rules = {canonical.get(n, n): r for n, r in rules.items()}
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return UpdatePlan({n: rules.get(n, Rule("frozen")) for n in names}, shapes, tied_parameters(canonical))


def knapsack(groups, capacity: int, units: int = DP_UNITS):
    """Multiple-choice knapsack: ``groups`` is a list of lists of (cost, benefit) options (at most
    one option per group). Returns the chosen option index per group (None = none) maximizing
    total benefit with total cost <= capacity. Costs are rounded up to ``capacity / units``, so
    every returned choice fits exactly."""
    if capacity < 0:
        return None
    unit = max(1, -(-capacity // units))
    cap = capacity // unit
    neg = -1e18
    best = np.full(cap + 1, 0.0)
    choice = []
    for opts in groups:
        new = best.copy()
        pick = np.full(cap + 1, -1, dtype=np.int64)
        for j, (c, b) in enumerate(opts):
            cu = -(-int(c) // unit)
            if cu > cap:
                continue
            cand = np.full(cap + 1, neg)
            cand[cu:] = best[:cap + 1 - cu] + b
            better = cand > new
            new[better] = cand[better]
            pick[better] = j
        choice.append(pick)
        best = new
    # walk back
    out, c = [None] * len(groups), int(np.argmax(best))
    for g in range(len(groups) - 1, -1, -1):
        j = int(choice[g][c])
        if j >= 0:
            out[g] = j
            c -= -(-int(groups[g][j][0]) // unit)
    return out


def select_under_budget(model, budget: int, exec_order, plan_peak, *, scores=None, max_layers=12,
                        batch_size=None, progress=None, state_tensors=1, required=None,
                        fit_with_remat=None, max_overhead=None) -> Selection:
    """Choose an UpdatePlan whose real planned peak fits ``budget`` bytes.

    ``required`` (param name -> Rule): a base update every plan trains (e.g. a new classifier);
    the candidates are the other layers and their costs are measured on top of it.

    ``plan_peak(UpdatePlan, final=bool) -> int`` compiles a plan and returns the bytes it needs
    (its planned peak, or its static arena where fragmentation makes that larger)
    (``final=False`` for the single-layer probes, which may skip the memory scheduling).
    ``fit_with_remat(UpdatePlan) -> (bytes or None, report)``: the bytes the plan needs once
    rematerialized under ``budget`` within the time bound, None when it cannot (see the module
    docstring); called only for plans ``plan_peak`` found over the budget.
    Raises BudgetError with the smallest reachable peak when nothing fits.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    required = {n: r for n, r in (required or {}).items() if Rule.parse(r).kind != "frozen"}
    opts = layer_options(model, exec_order, max_layers, exclude=required)
    if not opts and not required:
        raise BudgetError("the model has no floating-point parameters to fine-tune")
    layers = list(dict.fromkeys(m for m, _, _ in opts))
    depth = {m: (k + 1) / len(layers) for k, m in enumerate(layers)}
    params = dict(model.named_parameters(remove_duplicate=False))   # tied aliases too (lm_head.weight)
    cands = [Candidate(m, o, rules) for m, o, rules in opts]
    probed = [c for c in cands if not c.option.startswith("channels:")]
    failed = {}
    for c in tqdm(probed, desc="pockc: planning candidate updates", unit="plan",
                  disable=None if progress is None else not progress, leave=False):
        try:
            c.peak = plan_peak(_plan_of(model, {**required, **c.rules}), final=False)
        except CompileError as e:   # e.g. a layer with no path to the loss: not a candidate
            failed[c.layer] = e
    if failed:
        if len(failed) == len({c.layer for c in probed}) and not required:
            raise next(iter(failed.values()))
        cands = [c for c in cands if c.layer not in failed]
        probed = [c for c in probed if c.layer not in failed]
        layers = [m for m in layers if m not in failed]
    by = {(c.layer, c.option): c for c in cands}
    for c in cands:
        if c.option.startswith("channels:"):
            r = float(c.option.split(":")[1])
            w = params[f"{c.layer}.weight" if c.layer else "weight"]
            wb = w.numel() * w.element_size()
            floor = by.get((c.layer, "bias"))
            c.peak = max(by[(c.layer, "full")].peak - int((1 - r) * wb * (2 + state_tensors)),
                         floor.peak if floor is not None else 0)
            c.estimated = True
        if scores is not None:
            c.benefit = float(scores.get((c.layer, c.option), 0.0))
        else:
            c.benefit = depth[c.layer] ** 2 * OPTION_PRIOR.get(c.option, 0.5)
    if required:   # the base plan is the floor every candidate's cost is measured from
        floor = Candidate(_layers_of(required), "base (always)", dict(required))
        floor.peak = plan_peak(_plan_of(model, required), final=False)
        if floor.peak > budget:
            raise BudgetError(_no_fit_message(budget, floor, batch_size))
        base = floor.peak
    else:
        base = min(c.peak for c in probed)
        smallest = min(probed, key=lambda c: c.peak)
        if smallest.peak > budget:
            raise BudgetError(_no_fit_message(budget, smallest, batch_size))
    for c in cands:
        c.cost = max(0, c.peak - base)

    groups = {m: [c for c in cands if c.layer == m] for m in layers}
    order = list(groups)
    sel = Selection(None, 0, budget, cands, base=base, source="scores" if scores is not None else "prior",
                    required=dict(required))
    capacity = budget - base
    best = None                                   # (benefit, plan, peak, chosen, remat report)
    seen = {}
    sel.max_overhead = max_overhead

    def solve(capacity):
        """The knapsack's plan at ``capacity``: (key, chosen, plan, benefit), None if empty."""
        pick = knapsack([[(c.cost, c.benefit) for c in groups[m]] for m in order], capacity)
        if pick is None:
            return None
        chosen = {m: groups[m][j].option for m, j in zip(order, pick) if j is not None}
        if not chosen and not required:
            return None
        rules = dict(required)
        for m, j in zip(order, pick):
            if j is not None:
                rules.update(groups[m][j].rules)
        benefit = sum(groups[m][j].benefit for m, j in zip(order, pick) if j is not None)
        return tuple(sorted(chosen.items())), chosen, rules, benefit

    for _ in range(MAX_REFINE):
        got = solve(capacity)
        if got is None:
            break
        key, chosen, rules, benefit = got
        if key in seen:
            peak = seen[key]
        else:
            plan = _plan_of(model, rules)
            peak = plan_peak(plan)
            seen[key] = peak
            fits = peak <= budget
            sel.tries.append((capacity, peak, fits))
            if fits and (best is None or benefit > best[0]):
                best = (benefit, plan, peak, chosen, None)
        if peak > budget:
            capacity -= peak - budget
        elif budget - peak > max(64, budget // 200) and capacity < budget:
            capacity += budget - peak
        else:
            break
    if best is None:  # the additive model kept overshooting: the best probed option that fits
        fit = [c for c in probed if c.peak <= budget]
        if fit:
            c = max(fit, key=lambda c: c.benefit)
            best = (c.benefit, _plan_of(model, {**required, **c.rules}), c.peak, {c.layer: c.option}, None)
        else:     # only the base plan fits
            best = (0.0, _plan_of(model, required), base, {}, None)
    if fit_with_remat is not None:
        best = _grow_with_remat(sel, solve, best, seen, budget, base, plan_peak, fit_with_remat, model,
                                sum(max(c.cost for c in g) for g in groups.values()))
    sel.benefit, sel.plan, sel.peak, sel.chosen, sel.remat = best
    sel.seconds = time.perf_counter() - t0
    return sel


def _grow_with_remat(sel, solve, best, seen, budget, base, plan_peak, fit_with_remat, model, everything):
    """Plans beyond what fits as it is, rematerialized (module docstring). Returns the new best."""
    ok_cap = max(budget - base, 1)      # the capacity at which the best plan so far was found
    bad_cap = None
    capacity = ok_cap
    tried = 0
    while tried < REMAT_TRIES:
        if bad_cap is None:
            if capacity >= everything:
                break                       # the knapsack already takes every candidate
            capacity = min(int(capacity * REMAT_GROWTH) + 1, everything)
        else:
            capacity = (ok_cap + bad_cap) // 2
            if bad_cap - ok_cap <= max(1024, ok_cap // 20):
                break
        got = solve(capacity)
        if got is None:
            break
        key, chosen, rules, benefit = got
        if key in seen and seen[key] is None:   # known not to fit, even rematerialized
            bad_cap = capacity
            continue
        if benefit <= best[0]:              # the same plan or one of no more benefit
            if bad_cap is not None:
                ok_cap = capacity
            continue
        plan = _plan_of(model, rules)
        peak = seen[key] if key in seen else plan_peak(plan)
        tried += 1
        if peak <= budget:                  # fits as it is (the additive model was pessimistic)
            fits, need, report, how = True, peak, None, "fits as it is"
        else:
            need, report = fit_with_remat(plan)
            fits = need is not None
            how = (f"estimated overhead {report.overhead:.1%}" if fits or report.fits and report.overhead > sel.max_overhead
                   else f"smallest peak {report.required_after:,} B")
            if not fits and report.fits and report.overhead > sel.max_overhead:
                how += ", over the bound"
        seen[key] = peak if fits else None
        sel.remat_tries.append((capacity, peak, fits, None if report is None else report.overhead, how))
        if fits:
            best = (benefit, plan, need, chosen, report)
            ok_cap = capacity
        else:
            bad_cap = capacity
    return best


def _no_fit_message(budget, smallest, batch_size):
    knobs = []
    if batch_size and batch_size > 1:
        knobs.append(f"a smaller batch (now {batch_size})")
    knobs += ["a smaller input", f"a budget of at least {format_bytes(smallest.peak)}"]
    return (f"no update plan fits the budget of {format_bytes(budget)}: the smallest planned peak is "
            f"{format_bytes(smallest.peak)} ({smallest.option} of {smallest.layer or 'the model'}); "
            f"try {', '.join(knobs[:-1])} or {knobs[-1]}")


def batch_size_of(batch):
    for b in batch:
        if isinstance(b, torch.Tensor) and b.dim() >= 1:
            return int(b.shape[0])
    return None
