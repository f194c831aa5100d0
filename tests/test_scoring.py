"""Layer-sensitivity scores (pockc/scoring.py) and budget selection driven by them."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.muted = nn.Linear(16, 3)      # reaches the loss with a zero factor: gradient 0
        self.dead = nn.Linear(16, 16)      # computed, never reaches the loss

    def forward(self, x):
        h = F.relu(self.b(F.relu(self.a(x))))
        _ = self.dead(h)
        return self.c(h) + 0.0 * self.muted(h)


def _data(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n - 16, 16)], [(x[n - 16:], y[n - 16:])]


def loss_fn(m, x, y):
    return F.cross_entropy(m(x), y)


def nll(m, x, y):
    return -F.cross_entropy(m(x), y)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


def test_scores_deterministic_cached_and_invalidated(model, tmp_path):
    train, val = _data()
    s1 = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=5, cache_dir=False)
    s2 = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=5, cache_dir=str(tmp_path))
    assert dict(s1) == dict(s2) and not s2.cached
    s3 = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=5, cache_dir=str(tmp_path))
    assert s3.cached and dict(s3) == dict(s2)
    train2, _ = _data(seed=2)
    assert not pockc.score_layers(model, loss_fn, train2, val, metric=nll, steps=5, cache_dir=str(tmp_path)).cached
    assert not pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=6, cache_dir=str(tmp_path)).cached
    with torch.no_grad():
        model.c.bias.add_(1.0)   # another model: new key
    assert not pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=5, cache_dir=str(tmp_path)).cached


def test_no_effect_scores_zero_and_no_path_is_skipped(model, tmp_path):
    train, val = _data()
    s = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=5, cache_dir=False)
    assert all(abs(v) < 1e-6 for (m, _), v in s.items() if m == "muted")
    assert {m for m, _ in s.skipped} == {"dead"} and "no path" in s.table()
    assert max(v for (m, o), v in s.items() if m == "c") > 1e-3   # the head helps on this task
    path = tmp_path / "s.json"
    s.to_json(path)
    assert dict(pockc.LayerScores.from_json(path)) == dict(s)


def test_budget_selection_uses_scores(model):
    train, val = _data()
    s = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=5, cache_dir=False)
    step = pockc.compile(model, loss_fn, train[0], budget="64KB", scores=s)
    assert step.selection.source == "scores"
    assert step.memory.plan.required_bytes <= 64 * 1024
    chosen_benefit = sum(s.get((m, o), 0.0) for m, o in step.selection.chosen.items())
    assert chosen_benefit >= max(s.values()) - 1e-12   # at least the best single candidate
    assert "dead" not in step.selection.chosen and "muted" not in step.selection.chosen


@pytest.mark.parametrize("train,val,text", [([], None, "train_data is empty"), (5, None, "iterable")])
def test_bad_data_is_a_clear_error(model, train, val, text):
    _, v = _data()
    with pytest.raises(pockc.CompileError, match=text):
        pockc.score_layers(model, loss_fn, train, val or v, cache_dir=False)


def test_knapsack_matches_brute_force_on_random_instances():
    import itertools
    import random

    from pockc.budget import knapsack
    rng = random.Random(0)
    for _ in range(60):
        groups = [[(rng.randint(1, 40), rng.uniform(-0.2, 1.0)) for _ in range(rng.randint(1, 3))]
                  for _ in range(rng.randint(1, 4))]
        cap = rng.randint(0, 90)
        best = 0.0
        for pick in itertools.product(*[[None] + list(range(len(g))) for g in groups]):
            if sum(groups[i][j][0] for i, j in enumerate(pick) if j is not None) <= cap:
                best = max(best, sum(groups[i][j][1] for i, j in enumerate(pick) if j is not None))
        pick = knapsack(groups, cap, units=cap or 1)   # unit costs: exact
        assert sum(groups[i][j][0] for i, j in enumerate(pick) if j is not None) <= cap
        assert sum(groups[i][j][1] for i, j in enumerate(pick) if j is not None) == pytest.approx(best)


def test_base_update_is_scored_on_top_and_kept_in_every_plan(model):
    train, val = _data()
    base = {"c.*": "full"}
    s = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=5, base=base, cache_dir=False)
    assert s.base == base and "c" not in {m for m, _ in s} and "over the base" in s.table()
    assert s.frozen < s.baseline       # the base alone helps; scores are gains over it
    assert all(abs(v) < 1e-6 for (m, _), v in s.items() if m == "muted")
    again = pockc.LayerScores.from_dict(s.to_dict())
    assert again.base == base and again.frozen == s.frozen
    step = pockc.compile(model, loss_fn, train[0], budget="64KB", scores=again)
    assert {"c.weight", "c.bias"} <= set(step.update_plan.trainable_names())
    assert set(step.selection.required) == {"c.weight", "c.bias"} and "always" in step.selection.table()
    assert step.memory.plan.required_bytes <= 64 * 1024


def test_base_that_does_not_fit_is_a_budget_error(model):
    train, val = _data()
    s = pockc.LayerScores({("b", "full"): 0.1}, settings={"base": "full"})
    with pytest.raises(pockc.BudgetError, match="smallest planned peak"):
        pockc.compile(model, loss_fn, train[0], budget="4KB", scores=s)


def test_fit_decays_lr_restores_it_and_learns(model):
    from pockc.scoring import evaluate, fit
    train, val = _data()
    step = pockc.compile(model, loss_fn, train[0], update={"[abc].*": "full"}, optimizer=pockc.SGD(lr=0.1, momentum=0.9))
    before = evaluate(model, loss_fn, val, nll)
    losses = fit(step, train, epochs=4, seed=0)
    assert len(losses) == 4 * len(train) and step.optimizer.lr == 0.1
    assert evaluate(model, loss_fn, val, nll) > before


def test_mismatched_data_is_a_clear_error(model):
    train, val = _data()
    with pytest.raises(pockc.CompileError, match="same shapes"):
        pockc.score_layers(model, loss_fn, train + [(train[0][0][:3], train[0][1][:3])], val, cache_dir=False)
    with pytest.raises(pockc.CompileError, match="evaluating the model on val_data failed"):
        pockc.score_layers(model, loss_fn, train, [(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))],
                           cache_dir=False)


# --- the scores cache survives a corrupt entry; its key covers the loss and metric code --------------

@pytest.mark.parametrize("garbage", [b"", b'{"scores": [{"layer": "a", "opt', b"\xff\xfe not json", b'{"x": 1}'])
def test_a_corrupt_cache_entry_is_named_recomputed_and_overwritten(model, tmp_path, garbage):
    import json
    train, val = _data()
    first = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=2, max_layers=2, cache_dir=str(tmp_path))
    with open(first.path, "wb") as f:        # what a run killed mid-write used to leave: 0 bytes, or half a file
        f.write(garbage)
    with pytest.warns(UserWarning, match="scores cache entry .*" + os.path.basename(first.path) + ".* recomputing"):
        again = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=2, max_layers=2,
                                   cache_dir=str(tmp_path))
    assert not again.cached and again.path == first.path and dict(again) == dict(first)
    assert json.loads(open(first.path).read())["scores"]            # overwritten with the real scores
    third = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=2, max_layers=2, cache_dir=str(tmp_path))
    assert third.cached and dict(third) == dict(first)
    assert [n for n in os.listdir(tmp_path) if "tmp" in n] == []


def test_an_unwritable_cache_is_a_warning_not_a_failure(model, tmp_path):
    train, val = _data()
    (tmp_path / "file").write_text("a file, not a directory")
    with pytest.warns(UserWarning, match="could not save the scores"):
        s = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=2, max_layers=1,
                               cache_dir=str(tmp_path / "file" / "cache"))
    assert len(s) and s.path is None


def _edited(src):
    """A function named like ``loss_fn`` but with another body (as if the file had been edited)."""
    ns = {"F": F}
    exec(compile(src, "<edited>", "exec"), ns)
    fn = ns["loss_fn"]
    fn.__qualname__, fn.__module__ = loss_fn.__qualname__, loss_fn.__module__
    return fn


def test_an_edited_loss_or_metric_is_a_new_cache_key(model, tmp_path):
    from pockc.scoring import code_fingerprint
    train, val = _data()
    kw = dict(metric=nll, steps=2, max_layers=1, cache_dir=str(tmp_path))
    s = pockc.score_layers(model, loss_fn, train, val, **kw)
    assert pockc.score_layers(model, loss_fn, train, val, **kw).cached
    smoothed = _edited("def loss_fn(m, x, y):\n    return F.cross_entropy(m(x), y, label_smoothing=0.1)\n")
    assert smoothed.__qualname__ == loss_fn.__qualname__ and code_fingerprint(smoothed) != code_fingerprint(loss_fn)
    s2 = pockc.score_layers(model, loss_fn=smoothed, train_data=train, val_data=val, **kw)
    assert not s2.cached and s2.path != s.path
    scaled = _edited("def loss_fn(m, x, y):\n    return 2.0 * F.cross_entropy(m(x), y)\n")   # a constant changed
    assert code_fingerprint(scaled) != code_fingerprint(_edited(
        "def loss_fn(m, x, y):\n    return 3.0 * F.cross_entropy(m(x), y)\n"))

    def edited_nll(m, x, y):                # the metric edited, same name
        return -F.cross_entropy(m(x), y) * 1.0
    edited_nll.__qualname__ = nll.__qualname__
    assert not pockc.score_layers(model, loss_fn, train, val, **{**kw, "metric": edited_nll}).cached


def test_the_code_fingerprint_is_the_same_in_every_process():
    """Set literals are frozenset constants whose order depends on PYTHONHASHSEED; the key must not."""
    import subprocess
    import sys
    prog = ("from pockc.scoring import code_fingerprint\n"
            "def loss_fn(m, x, y):\n    return 1.0 if y in {'alpha', 'beta', 'gamma', 'delta'} else 0.0\n"
            "print(code_fingerprint(loss_fn))\n")
    keys = {subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "3")}
    assert len(keys) == 1 and len(next(iter(keys))) == 24, keys


# --- scores measured on another model are refused -----------------------------------------------

class Wider(Net):
    def __init__(self):
        super().__init__()
        self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 3)
        self.muted, self.dead = nn.Linear(32, 3), nn.Linear(32, 16)


def test_scores_store_the_model_and_another_model_is_refused(model, tmp_path):
    from pockc.scoring import check_scores_match, model_fingerprint
    train, val = _data()
    s = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=2, max_layers=2, cache_dir=False)
    assert s.model == model_fingerprint(model) and ["a.weight", [16, 8]] in s.model["parameters"]
    s.to_json(tmp_path / "s.json")
    loaded = pockc.LayerScores.from_json(tmp_path / "s.json")
    assert loaded.model == s.model
    torch.manual_seed(1)
    check_scores_match(loaded, Net())                 # the same architecture, other weights: fine
    with pytest.raises(pockc.CompileError, match="another model .*'b.weight' is 16x16 there but 32x16 here"):
        check_scores_match(loaded, Wider())
    with pytest.raises(pockc.CompileError, match="another model .*lacks: a.weight"):
        check_scores_match(loaded, nn.Sequential(nn.Linear(8, 3)))
    # scores without a fingerprint (hand-made, or from an older pockc): their layers must exist
    check_scores_match(pockc.LayerScores({("b", "full"): 0.1}), model)
    with pytest.raises(pockc.CompileError, match="layer\\(s\\) this model does not have: blocks.3"):
        check_scores_match(pockc.LayerScores({("blocks.3", "full"): 0.1}), model)


def test_compile_refuses_scores_of_another_model(model):
    train, val = _data()
    s = pockc.score_layers(model, loss_fn, train, val, metric=nll, steps=2, max_layers=2, cache_dir=False)
    with pytest.raises(pockc.CompileError, match="another model"):
        pockc.compile(Wider(), loss_fn, train[0], budget="64KB", scores=s)
