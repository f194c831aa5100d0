"""Budget-driven plan selection that prices rematerialization (pockc/budget.py ``fit_with_remat``):
with a time bound, a plan that fits only by recomputing or paging may win, and it still trains
what eager PyTorch trains."""
import copy

import pytest
import torch

import pockc
from pockc import zoo
from tests.oracle import assert_match, eager_steps

OPT = dict(lr=0.01, momentum=0.9)


def _full_peak(ex):
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full",
                         optimizer=pockc.SGD(**OPT))
    return step.memory.plan.required_bytes


def test_remat_lets_selection_train_more_and_matches_eager():
    ex = zoo.small_cnn()
    budget = int(0.3 * _full_peak(ex))
    opt = pockc.SGD(**OPT)
    plain = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, optimizer=opt, budget=budget,
                          max_overhead=0)
    assert plain.remat is None and not plain.selection.remat_tries
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    step = pockc.compile(m_c, ex.loss_fn, ex.example_batch, optimizer=opt, budget=budget)
    sel, rep = step.selection, step.remat
    # the chosen plan trains more (in the prior's terms) and fits only through rematerialization
    assert sel.benefit > plain.selection.benefit
    assert len(step.update_plan.trainable_names()) >= len(plain.update_plan.trainable_names())
    assert rep is not None and sel.remat is rep and rep.fits and (rep.recomputed or rep.paged or rep.paged_state)
    assert rep.peak_before > budget and 0 < rep.overhead <= 0.15
    assert any(fits for _, _, fits, _, _ in sel.remat_tries)
    assert "fits through rematerialization" in sel.table() and "estimated overhead" in sel.table()
    assert sel.to_dict()["remat"]["overhead"] == rep.overhead
    # the budget holds for the rematerialized step, to the byte of the measured peak
    batch = ex.example_batch
    assert step.memory.measure(*batch) == step.memory.peak_bytes <= budget
    losses = [step.memory.last_loss, step(*batch)]
    ref = eager_steps(m_e, ex.loss_fn, [batch] * 2, step.update_plan, opt)
    for a, b in zip(losses, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_match(m_c, m_e, ex.model, step.update_plan, rtol=1e-4, atol=1e-5)


def test_a_tight_time_bound_keeps_plans_that_fit_as_they_are():
    ex = zoo.small_cnn()
    budget = int(0.3 * _full_peak(ex))
    opt = pockc.SGD(**OPT)
    tight = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, optimizer=opt, budget=budget,
                          max_overhead=1e-6)
    plain = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, optimizer=opt, budget=budget,
                          max_overhead=0)
    assert tight.remat is None and tight.selection.remat_tries
    assert all(not fits for _, _, fits, _, _ in tight.selection.remat_tries)
    assert any(how.endswith("over the bound") for *_, how in tight.selection.remat_tries)
    assert tight.update_plan.to_json() == plain.update_plan.to_json()
    off = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, optimizer=opt, budget=budget,
                        remat="off")
    assert off.remat is None and not off.selection.remat_tries


@pytest.mark.parametrize("bad", [-0.1, "0.15", True, float("nan")])
def test_bad_max_overhead_is_a_clear_error(bad):
    ex = zoo.mlp()
    with pytest.raises(pockc.CompileError, match="max_overhead"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, budget="1MB", max_overhead=bad)


SMALL_CNN = """
from pockc import zoo
_ex = zoo.small_cnn()
def model():
    return _ex.model
def example_batch():
    return _ex.example_batch
def loss_fn(model, *batch):
    return _ex.loss_fn(model, *batch)
"""


def test_cli_max_overhead(tmp_path):
    from tests.test_cli import run
    f = tmp_path / "small_cnn.py"
    f.write_text(SMALL_CNN)
    budget = str(int(0.3 * _full_peak(zoo.small_cnn())))
    r = run("compile", str(f), "--budget", budget, "--steps", "3", "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "fits through rematerialization" in r.stdout
    assert "rematerialization: measured" in r.stdout and "for the same plan without it" in r.stdout
    plan = (tmp_path / "a" / "plan.json").read_text()
    assert '"remat_tries"' in plan and '"max_overhead": 0.15' in plan
    r = run("compile", str(f), "--budget", budget, "--max-overhead", "0", "-o", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert "fits through rematerialization" not in r.stdout and "rematerialization\n" not in r.stdout
    r = run("compile", str(f), "--budget", budget, "--max-overhead", "-1", "-o", str(tmp_path / "c"))
    assert r.returncode == 2 and "--max-overhead must be a fraction >= 0" in r.stderr and "Traceback" not in r.stderr
