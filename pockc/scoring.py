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
import hashlib
import json
import os
import time

import torch

from pockc.errors import CompileError


class LayerScores(dict):
    """``{(layer, option): score}`` plus what was skipped; prints as a table, saves to JSON."""

    def __init__(self, scores=(), skipped=(), baseline=None, settings=None, frozen=None):
        super().__init__(scores)
        self.skipped = dict(skipped)       # (layer, option) -> reason
        self.baseline = baseline           # validation metric of the frozen model, or of the base alone
        self.frozen = baseline if frozen is None else frozen    # the frozen model's metric
        self.settings = settings or {}

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
        return {"baseline": self.baseline, "frozen": self.frozen, "settings": self.settings,
                "scores": [{"layer": m, "option": o, "score": s} for (m, o), s in self.items()],
                "skipped": [{"layer": m, "option": o, "reason": r} for (m, o), r in self.skipped.items()]}

    def to_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_dict(cls, d):
        return cls({(e["layer"], e["option"]): e["score"] for e in d["scores"]},
                   {(e["layer"], e["option"]): e["reason"] for e in d.get("skipped", [])},
                   d.get("baseline"), d.get("settings"), d.get("frozen"))

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))


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


def _digest(model, batches_list, settings) -> str:
    h = hashlib.sha256()
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


def fit(step, train_data, epochs=1, seed=0, *, cosine=True, progress=None) -> list:
    """Run a compiled step over ``train_data`` for ``epochs`` epochs, the batches shuffled per
    epoch with ``seed``, the learning rate decayed from ``step.optimizer.lr`` to 0 on a cosine
    (``cosine=False``: constant); returns the losses. The optimizer's lr is restored after."""
    import math

    from tqdm.auto import tqdm
    train = as_batches(train_data, "train_data")
    g = torch.Generator().manual_seed(seed)
    total, lr0, losses = epochs * len(train), step.optimizer.lr, []
    try:
        with tqdm(total=total, desc="pockc: fine-tuning", unit="step", leave=False,
                  disable=None if progress is None else not progress) as bar:
            for _ in range(epochs):
                for i in torch.randperm(len(train), generator=g).tolist():
                    if cosine:
                        step.optimizer.lr = lr0 * 0.5 * (1 + math.cos(math.pi * len(losses) / total))
                    losses.append(float(step(*train[i])))
                    bar.update()
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
    step = pockc.compile(model, loss_fn, train[0], update=_plan_of(model, rules), optimizer=copy.deepcopy(optimizer))
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
    key = _digest(model, [train, val], settings)
    if cache_dir is None:
        cache_dir = os.environ.get("POCKC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pockc"))
    path = os.path.join(cache_dir, f"scores-{key}.json") if cache_dir else None
    if path and os.path.isfile(path):
        scores = LayerScores.from_json(path)
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
    scores = LayerScores(baseline=baseline, settings=settings, frozen=frozen)
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
        os.makedirs(cache_dir, exist_ok=True)
        scores.to_json(path)
    return scores
