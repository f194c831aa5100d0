"""UpdatePlan: which parameters a step trains, and which of their rows.

A policy is resolved against the model into an UpdatePlan, one Rule per parameter:

* ``"full"`` -- the whole tensor is trained;
* ``"frozen"`` -- the tensor is read-only: no gradient, no optimizer state;
* ``"channels:R"`` -- the first ceil(R * C) rows of dim 0 (output channels) are trained, the
  rest stay frozen; ``"channels:[0,5,7]"`` or a list of ints trains exactly those rows.

Policies: a preset string (``full``, ``bias``, ``last:K``, ``head``, ``none``; join with ``+``,
e.g. ``"last:2+head"``), a dict of glob patterns over parameter names to rule strings, an
UpdatePlan, or a list of these applied in order (later entries override earlier ones).
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch
from tabulate import tabulate

from pockc.errors import PlanError

PRESETS = ("full", "bias", "last:K", "head", "none")


@dataclass(frozen=True)
class Rule:
    kind: str  # "frozen" | "full" | "channels"
    ratio: float | None = None
    indices: tuple | None = None

    @staticmethod
    def parse(value) -> "Rule":
        if isinstance(value, Rule):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value):
            return Rule._indices(value)
        if not isinstance(value, str):
            raise PlanError(f"update rule {value!r} is not a string; use 'full', 'frozen' or 'channels:R'")
        v = value.strip().lower()
        if v in ("full", "frozen"):
            return Rule(v)
        m = re.fullmatch(r"channels:\s*(.+)", v)
        if m:
            arg = m.group(1).strip()
            if arg.startswith("["):
                try:
                    idx = json.loads(arg)
                except json.JSONDecodeError:
                    idx = None
                if not isinstance(idx, list) or not all(isinstance(i, int) for i in idx):
                    raise PlanError(f"update rule {value!r}: channel list must look like 'channels:[0,3,5]'")
                return Rule._indices(idx)
            try:
                r = float(arg)
            except ValueError:
                raise PlanError(f"update rule {value!r}: ratio must be a number in (0, 1], e.g. 'channels:0.25'") from None
            if not 0 < r <= 1:
                raise PlanError(f"update rule {value!r}: ratio must be in (0, 1]")
            return Rule("full") if r == 1 else Rule("channels", ratio=r)
        raise PlanError(f"unknown update rule {value!r}; use 'full', 'frozen', 'channels:R' or 'channels:[i,j,...]'")

    @staticmethod
    def _indices(idx) -> "Rule":
        if not idx:
            raise PlanError("update rule: empty channel list")
        if len(set(idx)) != len(idx) or min(idx) < 0:
            raise PlanError(f"update rule: channel list {list(idx)} must hold distinct non-negative rows")
        return Rule("channels", indices=tuple(sorted(idx)))

    def selection(self, shape):
        """None (whole tensor or nothing), ('slice', start, stop) or ('index', rows)."""
        if self.kind != "channels":
            return None
        if len(shape) == 0:
            raise PlanError("channels rule on a 0-d parameter; use 'full' or 'frozen'")
        c = shape[0]
        if self.indices is not None:
            if max(self.indices) >= c:
                raise PlanError(f"channel index {max(self.indices)} out of range for {c} rows")
            rows = self.indices
            if rows == tuple(range(rows[0], rows[-1] + 1)):
                return None if len(rows) == c else ("slice", rows[0], rows[-1] + 1)
            return ("index", rows)
        k = math.ceil(self.ratio * c - 1e-9)
        return None if k >= c else ("slice", 0, max(k, 1))

    def __str__(self):
        if self.kind != "channels":
            return self.kind
        if self.indices is not None:
            return f"channels:{list(self.indices)}"
        return f"channels:{self.ratio:g}"


def sel_rows(sel, shape) -> int:
    if sel is None:
        return shape[0] if len(shape) else 1
    return sel[2] - sel[1] if sel[0] == "slice" else len(sel[1])


class UpdatePlan:
    """Per-parameter rules for one model; printable as a table, serializable to JSON.

    >>> plan = UpdatePlan({"fc.weight": "full", "fc.bias": "full"})
    >>> plan.trainable_names()
    ['fc.bias', 'fc.weight']
    """

    def __init__(self, rules: dict, shapes: dict | None = None, ties: dict | None = None):
        self.rules = {k: Rule.parse(v) for k, v in rules.items()}
        self.shapes = {k: tuple(v) for k, v in (shapes or {}).items()}
        # parameter -> the other names of the same tensor (tied weights: its gradient sums every use)
        self.ties = {k: list(v) for k, v in (ties or {}).items() if v}

    # -- queries -------------------------------------------------------------------------
    def rule(self, name) -> Rule:
        return self.rules.get(name, Rule("frozen"))

    def trainable_names(self):
        return sorted(n for n, r in self.rules.items() if r.kind != "frozen")

    def selection(self, name):
        return self.rule(name).selection(self.shapes[name])

    def trained_numel(self, name) -> int:
        r = self.rule(name)
        if r.kind == "frozen":
            return 0
        shape = self.shapes[name]
        numel = math.prod(shape)
        sel = r.selection(shape)
        return numel if sel is None else numel // shape[0] * sel_rows(sel, shape)

    def counts(self):
        total = sum(math.prod(s) for s in self.shapes.values())
        trained = sum(self.trained_numel(n) for n in self.shapes)
        return trained, total

    def summary(self) -> str:
        trained, total = self.counts()
        pct = 100.0 * trained / total if total else 0.0
        return f"trainable params: {trained:,} || all params: {total:,} || trainable%: {pct:.4f}"

    def table(self, fmt="simple") -> str:
        rows = []
        for name, shape in self.shapes.items():
            r = self.rule(name)
            if r.kind == "frozen":
                continue
            shown = name + "".join(f" = {a}" for a in self.ties.get(name, ()))
            rows.append([shown, "x".join(map(str, shape)) or "scalar", str(r), f"{self.trained_numel(name):,}"])
        frozen = sum(1 for n in self.shapes if self.rule(n).kind == "frozen")
        tied = [n for n in self.ties if self.rule(n).kind != "frozen"]
        note = (f"\n{len(tied)} tied tensor(s) ('a = b': one tensor under several names; its gradient is "
                f"the sum over every use)") if tied else ""
        body = tabulate(rows, headers=["parameter", "shape", "rule", "trained"], tablefmt=fmt) if rows else "(nothing trained)"
        return f"{body}{note}\n{frozen} parameter tensors frozen\n{self.summary()}"

    def __str__(self):
        return self.table()

    def __repr__(self):
        return f"UpdatePlan({len(self.trainable_names())} trained of {len(self.shapes)} tensors)"

    def __eq__(self, other):
        return isinstance(other, UpdatePlan) and self.to_dict() == other.to_dict()

    # -- serialization -------------------------------------------------------------------
    def to_dict(self):
        d = {
            "rules": {n: str(self.rule(n)) for n in self.shapes or self.rules},
            "shapes": {n: list(s) for n, s in self.shapes.items()},
        }
        if self.ties:
            d["ties"] = self.ties
        return d

    def to_json(self, path=None):
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            from pockc.runtime.fileio import atomic_write
            atomic_write(path, text + "\n")     # an interrupted save leaves the previous file
        return text

    @classmethod
    def from_dict(cls, d):
        return cls(d["rules"], d.get("shapes"), d.get("ties"))

    @classmethod
    def from_json(cls, path_or_text):
        text = path_or_text
        if not str(text).lstrip().startswith("{"):
            with open(path_or_text) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------
# Resolving a policy against a model
# ---------------------------------------------------------------------------------------

def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def find_block_container(model):
    """The model's repeated block container: the nn.ModuleList / nn.Sequential whose children
    repeat one module class at least twice, largest by parameter count; None if there is none."""
    best, best_params = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        kids = [c for c in mod.children() if any(True for _ in c.parameters())]
        if len(kids) < 2:
            continue
        cls, count = Counter(type(c) for c in kids).most_common(1)[0]
        # The repeated block is composite (has children): a Sequential of plain layers, even with
        # one composite child among them, is not a block list.
        if count < 2 or not all(any(True for _ in c.children()) for c in kids if type(c) is cls):
            continue
        n = sum(p.numel() for p in mod.parameters())
        if n > best_params:
            best, best_params = name, n
    return best


def _blocks(model, exec_order):
    """(block module names, head module names). Blocks are the container's children; the head is
    every weighted module executed after the last block."""
    container = find_block_container(model)
    weighted = [m for m in exec_order if any(True for _ in model.get_submodule(m).parameters(recurse=False))]
    if container is not None:
        cont = model.get_submodule(container)
        blocks = [f"{container}.{n}" if container else n for n, c in cont.named_children()
                  if any(True for _ in c.parameters())]
        inside = lambda m: any(m == b or m.startswith(b + ".") for b in blocks)  # noqa: E731
        last_block = max((i for i, m in enumerate(weighted) if inside(m)), default=-1)
        head = [m for m in weighted[last_block + 1:] if not inside(m)]
        return blocks, head
    return weighted, weighted[-1:]


def _module_params(model, modules):
    names = []
    for m in modules:
        prefix = f"{m}." if m else ""
        names += [prefix + n for n, _ in model.get_submodule(m).named_parameters()]
    return names


def _preset(model, names, preset, exec_order):
    p = preset.strip().lower()
    if p == "full":
        return {n: Rule("full") for n in names}
    if p in ("none", "frozen"):
        return {}
    if p == "bias":
        out = {}
        for mname, mod in model.named_modules():
            for pname, _ in mod.named_parameters(recurse=False):
                if pname == "bias" or _is_norm(mod):
                    out[f"{mname}.{pname}" if mname else pname] = Rule("full")
        return out
    m = re.fullmatch(r"last:\s*(\d+)", p)
    if m:
        k = int(m.group(1))
        blocks, _ = _blocks(model, exec_order)
        if k < 1:
            raise PlanError(f"preset {preset!r}: K must be at least 1")
        if k > len(blocks):
            raise PlanError(f"preset {preset!r}: the model has only {len(blocks)} blocks")
        return {n: Rule("full") for n in _module_params(model, blocks[-k:])}
    if p == "head":
        _, head = _blocks(model, exec_order)
        if not head:
            where = find_block_container(model)
            where = "the model itself" if where == "" else repr(where)
            raise PlanError(f"preset {preset!r}: no weighted layer runs after the last block of the block "
                            f"container ({where}); name the head's layers with a pattern, e.g. {{'fc.*': 'full'}}")
        return {n: Rule("full") for n in _module_params(model, head)}
    raise PlanError(f"unknown update preset {preset!r}; presets are {', '.join(PRESETS)} "
                    "(join with '+'), or pass a dict of glob patterns to rules")


def _closest(pattern, names):
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3)
    return ", ".join(close) if close else ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def match_pattern(pattern, names) -> list:
    """Parameter names matching the glob ``pattern``; a pattern matching nothing is a PlanError
    naming the closest parameters."""
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise PlanError(f"update pattern {pattern!r} matches no parameter; closest names: "
                        f"{_closest(pattern, names)}")
    return hits


def canonical_names(model) -> dict:
    """Every name a parameter is reachable under -> the name ``model.named_parameters()`` gives that
    tensor (its first). A tied weight (``head.weight = emb.weight``) has several names."""
    first, canonical = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canonical[n] = first.setdefault(id(p), n)
    return canonical


def tied_parameters(canonical: dict) -> dict:
    """Canonical parameter name -> its other names, from a :func:`canonical_names` map."""
    ties = {}
    for n, c in canonical.items():
        if n != c:
            ties.setdefault(c, []).append(n)
    return ties


def resolve_update(update, model, exec_order=None) -> UpdatePlan:
    """Turn a policy into an UpdatePlan for ``model``. ``exec_order`` lists module names in the
    order a forward pass first calls them (used by ``last:K`` and ``head``). A tied parameter is one
    tensor: a rule naming any of its names applies to it."""
    params = dict(model.named_parameters())
    names = list(params)
    canonical = canonical_names(model)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    exec_order = exec_order if exec_order is not None else [n for n, _ in model.named_modules()]
    rules: dict = {}
    items = update if isinstance(update, list) else [update]
    if not items:
        raise PlanError("empty update policy")
    for item in items:
        if isinstance(item, UpdatePlan):
            unknown = [n for n in item.rules if n not in canonical]
            if unknown:
                raise PlanError(f"UpdatePlan names parameters the model does not have: {unknown[:5]}; "
                                f"closest: {_closest(unknown[0], names)}")
            rules.update({canonical[n]: r for n, r in item.rules.items()})
        elif isinstance(item, str):
            if not item.strip():
                raise PlanError("empty update policy string")
            for part in item.split("+"):
                rules.update({canonical[n]: r for n, r in _preset(model, names, part, exec_order).items()})
        elif isinstance(item, dict):
            for pattern, value in item.items():
                rule = Rule.parse(value)
                for n in dict.fromkeys(canonical[a] for a in match_pattern(pattern, list(canonical))):
                    rule.selection(shapes[n])  # validates indices against this tensor
                    rules[n] = rule
        else:
            raise PlanError(f"update must be a preset string, a dict, an UpdatePlan or a list of them, "
                            f"not {type(item).__name__}")
    plan = UpdatePlan({n: rules.get(n, Rule("frozen")) for n in names}, shapes, tied_parameters(canonical))
    for n in names:
        if plan.rule(n).kind != "frozen" and not params[n].is_floating_point():
            raise PlanError(f"parameter {n!r} has dtype {params[n].dtype} and cannot be trained")
    return plan
