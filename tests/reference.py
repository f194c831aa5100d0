"""The oracle's independent reference: update policies resolved, and models trained, without pockc.

tests/oracle.py used to take the trainable set and rows from pockc's own UpdatePlan and train
them with pockc.bench.EagerStep, so a bug in pockc/plan.py (``ceil`` of the channel ratio turned
into ``round``, a preset resolving the wrong blocks) was copied into both sides of the comparison
and went unseen. Everything here is written from the documented semantics (pockc/plan.py's module
docstring, the README's "Update policies") and imports nothing from pockc:

* :func:`resolve` turns a policy into ``{canonical parameter name: None (whole tensor) or a sorted
  tuple of trained rows}``; frozen parameters are absent;
* :class:`Trainer` trains exactly that with autograd + torch.optim (single-tensor path).
"""
from __future__ import annotations

import copy
import fnmatch
import json
import math
import re
from collections import Counter
from fractions import Fraction

import torch

# ----------------------------------------------------------------------------- rules


def parse_rule(value):
    """A rule as ``("frozen",)``, ``("full",)``, ``("ratio", Fraction)`` or ``("rows", tuple)``.

    The ratio is kept as an exact Fraction of its decimal text: "the first ceil(R*C) rows" is then
    computed exactly (0.3 * 10 is 3, not float's 3.0000000000000004 whose ceil is 4)."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(i, int) for i in value):
        return ("rows", tuple(sorted(value)))
    v = str(value).strip().lower()
    if v in ("full", "frozen"):
        return (v,)
    m = re.fullmatch(r"channels:\s*(.+)", v)
    if not m:
        raise ValueError(f"reference: unknown rule {value!r}")
    arg = m.group(1).strip()
    if arg.startswith("["):
        return ("rows", tuple(sorted(json.loads(arg))))
    r = Fraction(arg)
    if not 0 < r <= 1:
        raise ValueError(f"reference: ratio {arg} outside (0, 1]")
    return ("full",) if r == 1 else ("ratio", r)


def rows_of(rule, shape):
    """None for the whole tensor, else the sorted tuple of trained rows of dim 0."""
    kind = rule[0]
    if kind == "full":
        return None
    c = shape[0]
    if kind == "ratio":
        k = max(1, math.ceil(rule[1] * c))     # Fraction * int is exact; math.ceil of it too
        rows = tuple(range(min(k, c)))
    else:
        rows = rule[1]
        assert rows and max(rows) < c and len(set(rows)) == len(rows), (rule, shape)
    return None if len(rows) == c else rows


# ----------------------------------------------------------------------------- model structure


def execution_order(model, loss_fn, batch):
    """Module names in the order one forward pass of ``loss_fn(model, *batch)`` first calls them.

    Recorded with forward pre-hooks on a deep copy under no_grad, inside a forked RNG: the model's
    batch-norm statistics and the global RNG stream (dropout masks) are left as they were."""
    twin = copy.deepcopy(model)
    order, handles = [], []
    for name, mod in twin.named_modules():
        handles.append(mod.register_forward_pre_hook(
            lambda _m, _a, name=name: order.append(name) if name not in order else None))
    devices = [t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            loss_fn(twin, *batch)
    finally:
        for h in handles:
            h.remove()
    return order


def _has_params(mod, recurse=True):
    return next(iter(mod.parameters(recurse=recurse)), None) is not None


def block_container(model):
    """Name of the repeated block container, or None: among nn.ModuleList / nn.Sequential whose
    children with parameters repeat one class at least twice, and whose repeated class is a
    composite module (a Sequential of plain layers is not a list of blocks), the one with the most
    parameters (the first found on a tie)."""
    best, most = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        kids = [c for c in mod.children() if _has_params(c)]
        if not kids:
            continue
        cls, count = Counter(type(c) for c in kids).most_common(1)[0]
        if count < 2 or not all(next(c.children(), None) is not None for c in kids if type(c) is cls):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > most:
            best, most = name, n
    return best


def blocks_and_head(model, order):
    """(blocks, head) as lists of module names.

    Blocks: the container's children that hold parameters, in order. Head: the modules with
    parameters of their own first executed after every module inside a block (final norm,
    classifier). Without a container the README's fallback applies: every module with parameters
    of its own is a "block", in execution order, and the head is the last of them."""
    weighted = [n for n in order if _has_params(model.get_submodule(n), recurse=False)]
    container = block_container(model)
    if container is None:
        return weighted, weighted[-1:]
    prefix = f"{container}." if container else ""
    blocks = [prefix + n for n, c in model.get_submodule(container).named_children() if _has_params(c)]

    def inside(n):
        return any(n == b or n.startswith(b + ".") for b in blocks)

    pos = {n: i for i, n in enumerate(order)}
    last = max((pos[n] for n in order if inside(n)), default=-1)
    return blocks, [n for n in weighted if pos[n] > last and not inside(n)]


def own_params(model, modules):
    """Names of the parameters held directly by ``modules`` (registered names, aliases included)."""
    out = []
    for m in modules:
        for n, _ in model.get_submodule(m).named_parameters(recurse=False, remove_duplicate=False):
            out.append(f"{m}.{n}" if m else n)
    return out


def all_params(model, modules):
    out = []
    for m in modules:
        out += [f"{m}.{n}" if m else n for n, _ in model.get_submodule(m).named_parameters(remove_duplicate=False)]
    return out


# ----------------------------------------------------------------------------- policies


def canonical(model):
    """Every name a parameter is reachable under -> its first name (``named_parameters()``'s)."""
    first, out = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out[n] = first.setdefault(id(p), n)
    return out


def _preset(model, preset, order):
    p = preset.strip().lower()
    if p == "full":
        return list(canonical(model))
    if p == "none":
        return []
    if p == "bias":
        names = []
        for mname, mod in model.named_modules(remove_duplicate=False):
            norm = "norm" in type(mod).__name__.lower()
            names += [f"{mname}.{n}" if mname else n for n, _ in mod.named_parameters(recurse=False)
                      if n == "bias" or norm]
        return names
    if order is None:
        raise ValueError(f"reference: preset {preset!r} needs the execution order (pass loss_fn and batch)")
    blocks, head = blocks_and_head(model, order)
    m = re.fullmatch(r"last:\s*(\d+)", p)
    if m:
        k = int(m.group(1))
        assert 1 <= k <= len(blocks), (preset, blocks)
        return all_params(model, blocks[-k:])
    if p == "head":
        return own_params(model, head)
    raise ValueError(f"reference: unknown preset {preset!r}")


def resolve(policy, model, loss_fn=None, batch=None, order=None):
    """``policy`` against ``model`` -> {canonical name: None | sorted tuple of rows}, trained only.

    Presets joined with "+", dicts of fnmatch globs over every parameter name (a tied tensor's
    aliases too) -> rules, or a list of these where later entries override earlier ones. An
    UpdatePlan (anything with ``to_dict()["rules"]``) counts as a dict of exact names -> rules, read
    from its serialized form; ``last:K`` and ``head`` need ``loss_fn`` and ``batch`` (or ``order``)."""
    canon = canonical(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if order is None and loss_fn is not None and _needs_order(policy):
        order = execution_order(model, loss_fn, batch)
    rules = {}
    for item in policy if isinstance(policy, list) else [policy]:
        if hasattr(item, "to_dict"):
            for name, rule in item.to_dict()["rules"].items():
                rules[canon[name]] = parse_rule(rule)
        elif isinstance(item, str):
            for part in item.split("+"):
                for name in _preset(model, part, order):
                    rules[canon[name]] = ("full",)
        elif isinstance(item, dict):
            for pattern, value in item.items():
                hits = [n for n in canon if fnmatch.fnmatchcase(n, pattern)]
                assert hits, f"reference: pattern {pattern!r} matches no parameter"
                for name in hits:
                    rules[canon[name]] = parse_rule(value)
        else:
            raise TypeError(f"reference: policy item {item!r}")
    return {n: rows_of(r, shapes[n]) for n, r in rules.items() if r[0] != "frozen"}


def _needs_order(policy):
    items = policy if isinstance(policy, list) else [policy]
    return any(isinstance(i, str) and re.search(r"last|head", i.lower()) for i in items)


def plan_rows(plan):
    """pockc's own answer in the reference's form, from ``plan.selection`` (what pockc trains)."""
    out = {}
    for name in plan.trainable_names():
        sel = plan.selection(name)
        out[name] = None if sel is None else tuple(range(sel[1], sel[2])) if sel[0] == "slice" else tuple(sel[1])
    return out


def assert_same_plan(plan, expected, what=""):
    """pockc's UpdatePlan trains exactly ``expected`` (the reference's resolution), same rows."""
    got = plan_rows(plan)

    def show(rows):
        return "whole tensor" if rows is None else f"{len(rows)} rows {list(rows[:8])}{'...' if len(rows) > 8 else ''}"

    problems = [f"  {n}: pockc trains it ({plan.rule(n)}), the reference freezes it"
                for n in sorted(set(got) - set(expected))]
    problems += [f"  {n}: the reference trains it ({show(expected[n])}), pockc freezes it"
                 for n in sorted(set(expected) - set(got))]
    problems += [f"  {n}: pockc rule {plan.rule(n)} trains {show(got[n])}, the reference {show(expected[n])}"
                 for n in sorted(set(got) & set(expected)) if got[n] != expected[n]]
    assert not problems, f"pockc's UpdatePlan disagrees with the reference resolver{what}:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- training


def torch_optim(opt, leaves):
    """torch.optim twin of a pockc optimizer, mapped field by field (foreach=False, pockc's path).

    Written here rather than reusing pockc.bench.torch_optimizer, which forwards ``opt.to_dict()``
    wholesale: a hyperparameter pockc renamed or dropped would reach both sides alike or fail
    there. An unknown field fails here instead of being silently ignored. pockc has no Adam:
    AdamW with weight_decay=0 is Adam."""
    d = opt.to_dict()
    kind = d.pop("type")
    fields = {"SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
              "AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")}[kind]
    assert set(d) == set(fields), f"reference: {kind} fields {sorted(d)} are not torch.optim's {fields}"
    if kind == "SGD":
        return torch.optim.SGD(leaves, lr=d["lr"], momentum=d["momentum"], dampening=d["dampening"],
                               weight_decay=d["weight_decay"], nesterov=d["nesterov"], maximize=d["maximize"],
                               foreach=False)
    return torch.optim.AdamW(leaves, lr=d["lr"], betas=tuple(d["betas"]), eps=d["eps"],
                             weight_decay=d["weight_decay"], amsgrad=d["amsgrad"], maximize=d["maximize"],
                             foreach=False)


class _Loss(torch.nn.Module):
    """loss_fn(model, *batch) as a module, so functional_call can swap the model's tensors."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.model, *batch)


class Trainer:
    """Autograd + torch.optim over exactly the trained tensors of ``rows`` (a :func:`resolve` result).

    A whole trained tensor is its own leaf. A row subset is a separate leaf holding those rows; the
    forward sees the weight rebuilt with ``index_put`` (functional_call), so autograd's gradient,
    weight decay and optimizer state exist for the selected rows only, and frozen rows cannot
    move. Every other parameter has requires_grad=False. Buffers (batch-norm statistics) are the
    model's own and update in place as in any eager step."""

    def __init__(self, model, loss_fn, rows, opt):
        self.model, self.wrapper = model, _Loss(model, loss_fn)
        params = dict(model.named_parameters())
        for p in params.values():
            p.requires_grad_(False)
        leaves, self.sparse = [], []    # (name, parameter, row index tensor, leaf)
        for name, sel in rows.items():
            p = params[name]
            if sel is None:
                leaves.append(p.requires_grad_(True))
            else:
                idx = torch.tensor(sel, dtype=torch.long, device=p.device)
                leaf = p.detach()[idx].clone().requires_grad_(True)
                leaves.append(leaf)
                self.sparse.append((name, p, idx, leaf))
        self.opt = torch_optim(opt, leaves)

    def __call__(self, *batch):
        self.opt.zero_grad(set_to_none=True)
        swapped = {f"model.{n}": p.detach().index_put((idx,), leaf) for n, p, idx, leaf in self.sparse}
        loss = torch.func.functional_call(self.wrapper, swapped, batch, strict=False, tie_weights=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for _, p, idx, leaf in self.sparse:
                p[idx] = leaf
        return loss.detach()

    def release(self):
        """Back to an ordinary model: every parameter requires grad again."""
        for p in self.model.parameters():
            p.requires_grad_(True)


def train(model, loss_fn, batches, rows, opt):
    """Train ``model`` in place, one step per batch; returns the losses."""
    t = Trainer(model, loss_fn, rows, opt)
    try:
        return [t(*b) for b in batches]
    finally:
        t.release()


# ----------------------------------------------------------------------------- batches


def varied_batches(batch, steps, seed=0):
    """``steps`` distinct batches shaped like ``batch`` (the first is ``batch`` itself).

    A step fed the same batch every time cannot tell a stale gradient, a batch input bound once at
    compile time or a state update applied to the wrong step from a correct one. Shapes, dtypes and
    non-tensor leaves are kept, so a compiled step does not recompile. Float tensors get seeded
    noise at their own scale; integer tensors (labels, token ids) new values in [0, max + 1), with
    negative entries (ignore_index) kept; 0/1 integer tensors (attention masks) and bools are kept."""
    from torch.utils._pytree import tree_map

    def vary(g):
        def one(t):
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                return t
            if t.is_floating_point():
                scale = t.double().std().item() if t.numel() > 1 else 0.0
                scale = scale if math.isfinite(scale) and scale > 0 else 1.0
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64) * (0.5 * scale)
                return t.clone().add_(noise.to(device=t.device, dtype=t.dtype))   # clone keeps t's strides
            if t.dtype == torch.bool or t.is_complex():
                return t
            hi = int(t.max())
            if hi < 2:
                return t
            new = torch.randint(0, hi + 1, t.shape, generator=g, dtype=t.dtype).to(t.device)
            out = t.clone()
            out[t >= 0] = new[t >= 0]
            return out
        return one

    return [batch] + [tree_map(vary(torch.Generator().manual_seed(1000 * seed + i)), batch) for i in range(1, steps)]

