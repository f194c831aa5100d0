"""Layer-sensitivity analysis: how much does fine-tuning one candidate alone help?

For every candidate of pockc/budget.py (a layer's ``bias``, ``channels:R`` of its weight, its
``full`` parameters), pockc compiles a step that trains only that candidate, fine-tunes a copy of
the model for ``steps`` steps on ``train_data`` and records the improvement of the validation
metric over the frozen model. ``pockc.compile(..., budget=..., scores=scores)`` then spends the
budget on the candidates that buy the most.

With ``base`` (an update policy, e.g. ``"head"`` or ``{"classifier.*": "full"}``) every candidate is
fine-tuned *together with* the base and scored against the base fine-tuned alone -- Tiny
Training's protocol when the classifier is new for the task and any other layer alone cannot help.
The scores remember the base, and budget selection then trains it in every plan.

The metric is ``metric(model, *batch) -> float`` averaged over ``val_data`` (higher is better, e.g.
accuracy); without one it is the negative mean loss. Scores are cached as JSON under
``cache_dir`` keyed by the model's structure and weights, the data and the settings, so a second
call with the same inputs reuses them.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import time
import types
import warnings

import torch

from pockc.errors import CompileError
from pockc.runtime.fileio import atomic_write, remove_stale_temps


class LayerScores(dict):
    """``{(layer, option): score}`` plus what was skipped; prints as a table, saves to JSON."""

    def __init__(self, scores=(), skipped=(), baseline=None, settings=None, frozen=None, model=None):
        super().__init__(scores)
        self.skipped = dict(skipped)       # (layer, option) -> reason
        self.baseline = baseline           # validation metric of the frozen model, or of the base alone
        self.frozen = baseline if frozen is None else frozen    # the frozen model's metric
        self.settings = settings or {}
        self.model = model                 # model_fingerprint() of the model measured on (None: unknown)

    @property
    def base(self):
        """The update policy every scored candidate was trained with (None: each alone)."""
        return self.settings.get("base")

    def table(self) -> str:
        from tabulate import tabulate
        rows = [[m, o, f"{s:+.4f}"] for (m, o), s in sorted(self.items(), key=lambda kv: -kv[1])]
        rows += [[m, o, f"skipped: {r}"] for (m, o), r in self.skipped.items()]
        over = (f"over the base {_policy_str(self.base)} alone: {self.baseline:.4f}" if self.base is not None
                else f"over the frozen model: {self.baseline:.4f}")
        return tabulate(rows, headers=["layer", "option", f"score (metric gain {over})"], tablefmt="simple")

    def __str__(self):
        return self.table()

    def to_dict(self):
        d = {"baseline": self.baseline, "frozen": self.frozen, "settings": self.settings,
             "scores": [{"layer": m, "option": o, "score": s} for (m, o), s in self.items()],
             "skipped": [{"layer": m, "option": o, "reason": r} for (m, o), r in self.skipped.items()]}
        if self.model is not None:
            d["model"] = self.model
        return d

    def dumps(self) -> str:
        """The JSON text ``to_json`` writes."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def to_json(self, path):
        """Save to ``path`` (atomically: an interrupted save leaves the previous file)."""
        atomic_write(path, self.dumps())

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict) or not isinstance(d.get("scores"), list):
            raise ValueError("no 'scores' list")
        model = d.get("model")
        if model is not None and not (isinstance(model, dict) and isinstance(model.get("parameters"), list)):
            raise ValueError("malformed 'model' fingerprint")
        return cls({(e["layer"], e["option"]): float(e["score"]) for e in d["scores"]},
                   {(e["layer"], e["option"]): e["reason"] for e in d.get("skipped", [])},
                   d.get("baseline"), d.get("settings"), d.get("frozen"), model)

    @classmethod
    def from_json(cls, path):
        """Load a file ``to_json`` wrote; ``ValueError`` (naming the file) if it is not one."""
        with open(path, "rb") as f:
            raw = f.read()
        try:
            return cls.from_dict(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            why = f"not UTF-8 text ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            why = f"invalid JSON ({e})" if raw.strip() else "the file is empty"
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            why = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path} is not a scores file written by pockc: {why}")


def model_fingerprint(model) -> dict:
    """What a model's scores are tied to: its parameter names and shapes, in order."""
    return {"parameters": [[n, list(p.shape)] for n, p in model.named_parameters()]}


def check_scores_match(scores, model) -> None:
    """``CompileError`` unless ``scores`` were measured on a model of ``model``'s architecture: the
    same parameter names and shapes (from the fingerprint the scores store), or -- scores without
    one -- every layer they name is a layer of ``model`` with parameters."""
    if scores is None:
        return
    fp = getattr(scores, "model", None)
    if fp is not None:
        theirs = {n: tuple(s) for n, s in fp.get("parameters", [])}
        ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if theirs == ours:
            return
        shape = lambda s: "x".join(map(str, s)) or "scalar"  # noqa: E731
        diff = [n for n in ours if n in theirs and theirs[n] != ours[n]]
        missing, extra = [n for n in theirs if n not in ours], [n for n in ours if n not in theirs]
        if diff:
            why = f"parameter {diff[0]!r} is {shape(theirs[diff[0]])} there but {shape(ours[diff[0]])} here"
        elif missing:
            why = (f"it has parameter(s) this model lacks: {', '.join(missing[:3])}"
                   + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        else:
            why = (f"this model has parameter(s) it lacks: {', '.join(extra[:3])}"
                   + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""))
        raise CompileError(f"the contribution scores were measured on another model ({len(theirs)} parameter "
                           f"tensors there, {len(ours)} here; {why}); score this model with "
                           "pockc.score_layers (or run without --scores)")
    mods = {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    unknown = sorted({m for m, _ in list(scores) + list(getattr(scores, "skipped", {}))} - mods)
    if unknown:
        raise CompileError(f"the contribution scores name layer(s) this model does not have: "
                           f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}; they were measured "
                           "on another model: score this model with pockc.score_layers")


def _policy_str(policy):
    return policy if isinstance(policy, str) else json.dumps(policy)


def as_batches(data, name):
    """``data`` as a list of batch tuples; a clear CompileError if it is not an iterable of them or empty."""
    try:
        out = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
    except TypeError:
        raise CompileError(f"{name} must be an iterable of batches (tuples of tensors)") from None
    if not out:
        raise CompileError(f"{name} is empty: give at least one batch")
    return out


def _const_key(c):
    """A process-independent text for a code constant (frozensets sorted, nested code hashed)."""
    if isinstance(c, types.CodeType):
        return "code:" + _code_key(c)
    if isinstance(c, (tuple, list)):
        return "(" + ",".join(_const_key(x) for x in c) + ")"
    if isinstance(c, (frozenset, set)):
        return "{" + ",".join(sorted(_const_key(x) for x in c)) + "}"
    return f"{type(c).__name__}:{c!r}"


def _code_key(code) -> str:
    h = hashlib.sha256()
    for part in (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        h.update(repr(part).encode())
    h.update(_const_key(code.co_consts).encode())
    return h.hexdigest()


def code_fingerprint(fn):
    """What a loss or metric function *is*, for the scores cache key: its qualified name, bytecode,
    constants, names, defaults and (when available) its source; ``None`` for ``None``. Editing the
    function changes it; renaming nothing else does not matter."""
    if fn is None:
        return None
    h = hashlib.sha256()
    while isinstance(fn, functools.partial):
        h.update(f"partial{fn.args!r}{sorted(fn.keywords.items())!r}".encode())
        fn = fn.func
    fn = getattr(fn, "__func__", fn)                      # bound method -> function
    target = fn
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):                     # a callable object: its class's __call__
        target = getattr(type(fn).__call__, "__func__", type(fn).__call__)
        code = getattr(target, "__code__", None)
        h.update(type(fn).__qualname__.encode())
    h.update(f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode())
    if code is not None:
        h.update(_code_key(code).encode())
    else:
        h.update(repr(fn).encode())                      # a builtin: its name is all there is
    h.update(_const_key(getattr(target, "__defaults__", None) or ()).encode())
    h.update(repr(sorted((getattr(target, "__kwdefaults__", None) or {}).items())).encode())
    try:
        h.update(inspect.getsource(target).encode())
    except (OSError, TypeError):
        pass
    return h.hexdigest()[:24]


def _digest(model, batches_list, settings, code=None) -> str:
    h = hashlib.sha256()
    if code is not None:
        h.update(json.dumps(code, sort_keys=True).encode())
    h.update(repr(model).encode())
    for name, t in list(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.detach().float().cpu().numpy().tobytes())
    for batches in batches_list:
        for b in batches:
            for t in b:
                if isinstance(t, torch.Tensor):
                    h.update(str((tuple(t.shape), t.dtype)).encode())
                    h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
                else:
                    h.update(repr(t).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def evaluate(model, loss_fn, val, metric=None) -> float:
    """``metric(model, *batch)`` averaged over the batches of ``val`` (the negative mean loss
    without a metric), under ``torch.no_grad()``."""
    val = as_batches(val, "val_data")
    with torch.no_grad():
        if metric is None:
            return -sum(float(loss_fn(model, *b)) for b in val) / len(val)
        return sum(float(metric(model, *b)) for b in val) / len(val)


def fit(step, train_data, epochs=1, seed=0, *, cosine=True, progress=None, stop_nonfinite=False,
        start: int = 0, on_step=None) -> list:
    """Run a compiled step over ``train_data`` for ``epochs`` epochs, the batches shuffled per
    epoch with ``seed``, the learning rate decayed from ``step.optimizer.lr`` to 0 on a cosine
    (``cosine=False``: constant); returns the losses. The optimizer's lr is restored after.
    ``stop_nonfinite``: stop at the first loss that is NaN or infinite (the last one returned).
    ``start``: skip the first ``start`` steps of the run (a resumed run: the same batches in the
    same order and the same learning rates as the uninterrupted one). ``on_step(done, loss)`` is
    called after each step, ``done`` counting from the start of the run."""
    import math

    from tqdm.auto import tqdm
    train = as_batches(train_data, "train_data")
    g = torch.Generator().manual_seed(seed)
    total, lr0, losses = epochs * len(train), step.optimizer.lr, []
    done = 0
    try:
        with tqdm(total=total, initial=min(start, total), desc="pockc: fine-tuning", unit="step", leave=False,
                  disable=None if progress is None else not progress) as bar:
            for _ in range(epochs):
                for i in torch.randperm(len(train), generator=g).tolist():
                    if done < start:
                        done += 1
                        continue
                    if cosine:
                        step.optimizer.lr = lr0 * 0.5 * (1 + math.cos(math.pi * done / total))
                    losses.append(float(step(*train[i])))
                    done += 1
                    bar.update()
                    if on_step is not None:
                        on_step(done, losses[-1])
                    if stop_nonfinite and not math.isfinite(losses[-1]):
                        return losses
    finally:
        step.optimizer.lr = lr0
    return losses


def _reaches_loss(model, loss_fn, batch) -> dict:
    """parameter name -> whether the loss depends on it (one eager backward on a copy)."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    for p in params.values():
        p.requires_grad_(p.is_floating_point())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    loss = loss_fn(m, *batch)
    grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
    return {n: g is not None for n, g in zip(trainable, grads)}


def check_shapes(batches, name, like=None, like_name="batch 0"):
    """The step and its memory plan are specialized to one batch's shapes: every training batch
    must have those of ``like`` (default: the first batch); a CompileError names the first that differs."""
    def sig(b):
        return [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in b]
    ref = sig(batches[0] if like is None else like)
    for i, b in enumerate(batches):
        if sig(b) != ref:
            raise CompileError(f"{name} batch {i} has shapes {sig(b)} but {like_name} has {ref}; every training "
                               "batch must have the same shapes: the step and its memory plan are specialized "
                               "to them (drop or pad the last partial batch)")


def _finetune(model, loss_fn, train, rules, optimizer, steps, seed):
    """Fine-tune ``model`` in place for ``steps`` steps with only ``rules`` trained."""
    import pockc
    from pockc.budget import _plan_of
    # one process's probe: under torchrun every rank scores on its own (no collectives)
    step = pockc.compile(model, loss_fn, train[0], update=_plan_of(model, rules), optimizer=copy.deepcopy(optimizer),
                         distributed=False)
    torch.manual_seed(seed)
    for i in range(steps):
        step(*train[i % len(train)])


def score_layers(model, loss_fn, train_data, val_data, metric=None, *, optimizer=None, steps=20, base=None,
                 max_layers=12, seed=0, cache_dir=None, progress=None, log=None) -> LayerScores:
    """Score every candidate update of the last ``max_layers`` layers (see module docstring).

    ``base``: an update policy trained with every candidate; scores are gains over it alone.
    ``cache_dir``: where scores are cached (default ``$POCKC_CACHE`` or ``~/.cache/pockc``;
    ``False`` disables the cache). ``log``: a callable given one-line messages (the time estimate)."""
    from tqdm.auto import tqdm

    import pockc
    from pockc.budget import layer_options
    from pockc.plan import resolve_update
    from pockc.trace import analyze_forward

    train, val = as_batches(train_data, "train_data"), as_batches(val_data, "val_data")
    check_shapes(train, "train_data")
    if steps < 1:
        raise CompileError(f"steps must be at least 1, got {steps}")
    optimizer = optimizer if optimizer is not None else pockc.SGD(lr=0.01, momentum=0.9)
    settings = {"steps": steps, "max_layers": max_layers, "seed": seed, "optimizer": repr(optimizer),
                "metric": getattr(metric, "__qualname__", None), "loss_fn": getattr(loss_fn, "__qualname__", None),
                "base": base}
    fingerprint = model_fingerprint(model)
    key = _digest(model, [train, val], settings,
                  code={"loss_fn": code_fingerprint(loss_fn), "metric": code_fingerprint(metric)})
    if cache_dir is None:
        cache_dir = os.environ.get("POCKC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pockc"))
    path = os.path.join(cache_dir, f"scores-{key}.json") if cache_dir else None
    if path and os.path.exists(path):
        try:
            scores = LayerScores.from_json(path)
            if scores.model is not None and scores.model != fingerprint:
                raise ValueError("measured on another model")
        except (OSError, ValueError) as e:
            warnings.warn(f"pockc: the scores cache entry {path} is unreadable or corrupt ({e}); "
                          "recomputing it", stacklevel=2)
        else:
            scores.cached, scores.path = True, path
            return scores

    order = analyze_forward(model, loss_fn, train[0])
    base_rules = {} if base is None else {n: r for n, r in resolve_update(base, model, order).rules.items()
                                          if r.kind != "frozen"}
    opts = layer_options(model, order, max_layers, exclude=base_rules)
    reaches = _reaches_loss(model, loss_fn, train[0])
    try:
        frozen = evaluate(model, loss_fn, val, metric)
    except Exception as e:  # noqa: BLE001 -- the user's data does not fit the model or the metric
        raise CompileError(f"evaluating the model on val_data failed ({type(e).__name__}: {e}); val_data "
                           "batches must be what loss_fn(model, *batch) and metric(model, *batch) take") from None
    baseline = frozen
    if base_rules:
        m = copy.deepcopy(model)
        _finetune(m, loss_fn, train, base_rules, optimizer, steps, seed)   # also warms pockc up
        baseline = evaluate(m, loss_fn, val, metric)
    scores = LayerScores(baseline=baseline, settings=settings, frozen=frozen, model=fingerprint)
    t0 = time.perf_counter()
    bar = tqdm(opts, desc="pockc: scoring candidates", unit="candidate", leave=False,
               disable=None if progress is None else not progress)
    for layer, option, rules in bar:
        if not any(reaches.get(n) for n in rules):
            scores.skipped[(layer, option)] = "no path to the loss"
            continue
        m = copy.deepcopy(model)
        _finetune(m, loss_fn, train, {**base_rules, **{n: r for n, r in rules.items() if reaches.get(n)}},
                  optimizer, steps, seed)
        scores[(layer, option)] = evaluate(m, loss_fn, val, metric) - baseline
        if t0 is not None and log is not None:   # the estimate, from the first candidate
            log(f"scoring {len(opts)} candidates ({steps} fine-tuning steps each): about "
                f"{(time.perf_counter() - t0) * len(opts):.0f}s in all")
            t0 = None
    scores.cached, scores.path = False, path
    if path:
        try:
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a directory")
            os.makedirs(cache_dir, exist_ok=True)
            remove_stale_temps(cache_dir)       # left by a run killed while saving
            scores.to_json(path)                # atomically: a kill now cannot leave a corrupt entry
        except OSError as e:
            warnings.warn(f"pockc: could not save the scores to the cache {cache_dir} "
                          f"({getattr(e, 'strerror', None) or e}); they are not cached", stacklevel=2)
            scores.path = None
    return scores
