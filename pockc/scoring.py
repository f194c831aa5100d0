"""Layer-sensitivity analysis: how much does fine-tuning one candidate alone help?

For every candidate of pockc/budget.py (a layer's ``bias``, ``channels:R`` of its weight, its
``full`` parameters), pockc compiles a step that trains only that candidate, fine-tunes a copy of
the model for ``steps`` steps on ``train_data`` and records the improvement of the validation
metric over the frozen model. ``pockc.compile(..., budget=..., scores=scores)`` then spends the
budget on the candidates that buy the most.

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

    def __init__(self, scores=(), skipped=(), baseline=None, settings=None):
        super().__init__(scores)
        self.skipped = dict(skipped)       # (layer, option) -> reason
        self.baseline = baseline           # the frozen model's validation metric
        self.settings = settings or {}

    def table(self) -> str:
        from tabulate import tabulate
        rows = [[m, o, f"{s:+.4f}"] for (m, o), s in sorted(self.items(), key=lambda kv: -kv[1])]
        rows += [[m, o, f"skipped: {r}"] for (m, o), r in self.skipped.items()]
        return tabulate(rows, headers=["layer", "option", f"score (metric gain over {self.baseline:.4f})"],
                        tablefmt="simple")

    def __str__(self):
        return self.table()

    def to_dict(self):
        return {"baseline": self.baseline, "settings": self.settings,
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
                   d.get("baseline"), d.get("settings"))

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _batches(data, name):
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


def _evaluate(model, loss_fn, metric, val):
    with torch.no_grad():
        if metric is None:
            return -sum(float(loss_fn(model, *b)) for b in val) / len(val)
        return sum(float(metric(model, *b)) for b in val) / len(val)


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


def score_layers(model, loss_fn, train_data, val_data, metric=None, *, optimizer=None, steps=20,
                 max_layers=12, seed=0, cache_dir=None, progress=None) -> LayerScores:
    """Score every candidate update of the last ``max_layers`` layers (see module docstring).

    ``cache_dir``: where scores are cached (default ``$POCKC_CACHE`` or ``~/.cache/pockc``;
    ``False`` disables the cache)."""
    from tqdm.auto import tqdm

    import pockc
    from pockc.budget import _plan_of, layer_options
    from pockc.trace import analyze_forward

    train, val = _batches(train_data, "train_data"), _batches(val_data, "val_data")
    optimizer = optimizer if optimizer is not None else pockc.SGD(lr=0.01, momentum=0.9)
    settings = {"steps": steps, "max_layers": max_layers, "seed": seed, "optimizer": repr(optimizer),
                "metric": getattr(metric, "__qualname__", None), "loss_fn": getattr(loss_fn, "__qualname__", None)}
    key = _digest(model, [train, val], settings)
    if cache_dir is None:
        cache_dir = os.environ.get("POCKC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pockc"))
    path = os.path.join(cache_dir, f"scores-{key}.json") if cache_dir else None
    if path and os.path.isfile(path):
        scores = LayerScores.from_json(path)
        scores.cached = True
        return scores

    order = analyze_forward(model, loss_fn, train[0])
    opts = layer_options(model, order, max_layers)
    reaches = _reaches_loss(model, loss_fn, train[0])
    baseline = _evaluate(model, loss_fn, metric, val)
    scores = LayerScores(baseline=baseline, settings=settings)
    t0 = time.perf_counter()
    bar = tqdm(opts, desc="pockc: scoring candidates", unit="candidate", leave=False,
               disable=None if progress is None else not progress)
    for k, (layer, option, rules) in enumerate(bar):
        if not any(reaches.get(n) for n in rules):
            scores.skipped[(layer, option)] = "no path to the loss"
            continue
        m = copy.deepcopy(model)
        step = pockc.compile(m, loss_fn, train[0], update=_plan_of(m, {n: r for n, r in rules.items() if reaches.get(n)}),
                             optimizer=copy.deepcopy(optimizer))
        torch.manual_seed(seed)
        for i in range(steps):
            step(*train[i % len(train)])
        scores[(layer, option)] = _evaluate(m, loss_fn, metric, val) - baseline
        if k == 0:  # the estimate of the whole run, from the first candidate
            bar.set_postfix_str(f"~{(time.perf_counter() - t0) * len(opts):.0f}s in all")
    scores.cached = False
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        scores.to_json(path)
    return scores
