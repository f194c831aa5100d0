"""The correctness oracle: eager PyTorch autograd + torch.optim with the same trainable set."""
from __future__ import annotations

import copy

import torch

import pockc
from benchmarks.bench_core import EagerStep


def eager_steps(model, loss_fn, batches, plan: pockc.UpdatePlan, opt: pockc.Optimizer):
    """Train ``model`` (in place) for len(batches) steps the eager way; returns the losses.

    Channel-sparse tensors train a separate leaf holding the selected rows (benchmarks'
    EagerStep, also the benchmark baseline); torch.optim's single-tensor path, as pockc's."""
    step = EagerStep(model, loss_fn, opt, plan, foreach=False)
    losses = [step(*batch) for batch in batches]
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def compiled_and_eager(example, update, opt, steps=3, batches=None, seed=0):
    """Run ``steps`` compiled steps and ``steps`` eager steps from identical copies of the model.
    Returns (compiled model, eager model, original model, step, compiled losses, eager losses)."""
    original = example.model
    m_c, m_e = copy.deepcopy(original), copy.deepcopy(original)
    batches = batches or [example.example_batch] * steps
    step = pockc.compile(m_c, example.loss_fn, example.example_batch, update=update, optimizer=opt)
    torch.manual_seed(seed)
    # The first step runs under the exact peak tracker: the memory plan must bound it, tightly.
    measured = step.memory.measure(*batches[0])
    planned = step.memory.peak_bytes
    assert measured <= planned <= 1.1 * measured, (example.name, update, measured, planned)
    step.measured_peak = measured
    lc = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    torch.manual_seed(seed)
    le = eager_steps(m_e, example.loss_fn, batches, step.update_plan, opt)
    return m_c, m_e, original, step, lc, le


def assert_match(m_c, m_e, original, plan, rtol=1e-5, atol=1e-6):
    pc, pe, po = dict(m_c.named_parameters()), dict(m_e.named_parameters()), dict(original.named_parameters())
    for name in pc:
        if plan.rule(name).kind == "frozen":
            assert torch.equal(pc[name], po[name]), f"frozen {name} changed"
        torch.testing.assert_close(pc[name], pe[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        sel = plan.selection(name)
        if sel is not None:  # rows outside the selection are frozen: bit-identical
            keep = torch.ones(pc[name].shape[0], dtype=torch.bool)
            keep[list(range(sel[1], sel[2])) if sel[0] == "slice" else list(sel[1])] = False
            assert torch.equal(pc[name][keep], po[name][keep]), f"unselected rows of {name} changed"
    bc, be = dict(m_c.named_buffers()), dict(m_e.named_buffers())
    for name in bc:
        torch.testing.assert_close(bc[name], be[name], rtol=rtol, atol=atol, msg=lambda m: f"buffer {name}: {m}")
