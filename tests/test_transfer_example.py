"""The shipped transfer task (examples/transfer_digits.py): data splits, pretrained weights, and a
plan under the README's budget."""
import os
import sys

import pytest
import torch

import pockc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def task():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import transfer_digits
    finally:
        sys.path.pop(0)
    return transfer_digits


def test_splits_are_disjoint_and_balanced(task):
    xb, yb, train, val, test = task.task_b()
    assert (len(train), len(val), len(test)) == (150, 298, 448)
    ids = torch.cat([train, val, test])
    assert len(set(ids.tolist())) == len(ids) == len(yb) == 896
    assert torch.bincount(yb[train]).tolist() == [30] * 5 and set(yb.tolist()) == set(range(5))
    batches = task.train_data()
    assert len(batches) == 18 and all(b[0].shape == (8, 1, 16, 16) for b in batches)
    assert sum(len(b[1]) for b in task.val_data()) == 298 and sum(len(b[1]) for b in task.test_data()) == 448


def test_model_has_pretrained_features_and_a_new_classifier(task):
    state = torch.load(task.WEIGHTS, weights_only=True)
    m = task.model()
    assert torch.equal(m.blocks[2].depthwise.weight, state["blocks.2.depthwise.weight"])
    assert not torch.equal(m.classifier.weight, state["classifier.weight"])
    acc = task.metric(m, *task.val_data()[0])          # random head: about chance
    assert 0.0 <= float(acc) < 0.5


def test_readme_budget_is_under_a_third_of_full_fine_tuning(task):
    batch = task.example_batch()
    full = pockc.compile(task.model(), task.loss_fn, batch, update="full", optimizer=task.optimizer())
    step = pockc.compile(task.model(), task.loss_fn, batch, optimizer=task.optimizer(), budget="1MB")
    assert step.memory.plan.required_bytes <= 1024 * 1024 <= full.memory.peak_bytes / 3
    assert step.memory.measure(*batch) == step.memory.peak_bytes
