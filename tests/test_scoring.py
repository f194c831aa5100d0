"""Layer-sensitivity scores (pockc/scoring.py) and budget selection driven by them."""
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
