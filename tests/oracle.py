"""The correctness oracle: eager PyTorch autograd + torch.optim with the same trainable set.

The eager side is tests/reference.py: its own resolver of update policies and its own trainer, no
pockc code, so a bug in pockc's resolver or row arithmetic cannot hide by being on both sides.
compiled_and_eager asserts that pockc's UpdatePlan agrees with the reference resolution, and by
default feeds a different batch at every step (a stale gradient or a batch bound at compile time
would pass a test that repeats one batch)."""
from __future__ import annotations

import copy

import torch

import pockc

try:
    from tests import reference
except ImportError:          # tests/ itself on sys.path (``from oracle import ...``)
    import reference


def eager_steps(model, loss_fn, batches, plan, opt: pockc.Optimizer):
    """Train ``model`` (in place) for len(batches) steps the eager way; returns the losses.

    ``plan`` is a reference resolution (reference.resolve) or a pockc UpdatePlan; of the latter
    only the per-parameter rules are read (its serialized form), and the rows they select are
    computed by the reference. Channel-sparse tensors train a separate leaf holding the selected
    rows; torch.optim's single-tensor path, as pockc's."""
    rows = plan if isinstance(plan, dict) else reference.resolve(plan, model)
    return reference.train(model, loss_fn, batches, rows, opt)


def compiled_and_eager(example, update, opt, steps=3, batches=None, seed=0, vary_batches=True, **compile_kw):
    """Run ``steps`` compiled steps and ``steps`` eager steps from identical copies of the model.
    Returns (compiled model, eager model, original model, step, compiled losses, eager losses).

    ``batches=None``: ``steps`` distinct batches derived from the example batch (same shapes and
    dtypes, see reference.varied_batches), or the example batch repeated if ``vary_batches`` is
    False. ``compile_kw`` goes to pockc.compile. The eager side trains what reference.resolve makes of ``update``, and pockc's
    ``step.update_plan`` must agree with it parameter for parameter and row for row."""
    original = example.model
    m_c, m_e = copy.deepcopy(original), copy.deepcopy(original)
    if batches is None:
        batches = (reference.varied_batches(example.example_batch, steps, seed) if vary_batches
                   else [example.example_batch] * steps)
    expected = reference.resolve(update, original, example.loss_fn, example.example_batch)
    step = pockc.compile(m_c, example.loss_fn, example.example_batch, update=update, optimizer=opt, **compile_kw)
    reference.assert_same_plan(step.update_plan, expected, f" for {getattr(example, 'name', '?')}, update={update!r}")
    torch.manual_seed(seed)
    # The first step runs under the allocator-level tracker: the memory plan equals it to the byte.
    measured = step.memory.measure(*batches[0])
    planned = step.memory.peak_bytes
    assert measured == planned, (example.name, update, measured, planned)
    step.measured_peak = measured
    lc = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    torch.manual_seed(seed)
    le = eager_steps(m_e, example.loss_fn, batches, expected, opt)
    return m_c, m_e, original, step, lc, le


def assert_match(m_c, m_e, original, plan, rtol=1e-5, atol=1e-6):
    """Compiled and eager parameters and buffers agree; frozen parameters, and the rows a
    channel-sparse parameter does not train, are bit-identical to ``original`` on both sides.

    What is frozen comes from the reference: ``plan`` is a reference resolution, or a pockc
    UpdatePlan whose rules the reference turns into rows (and whose own rows must agree)."""
    if isinstance(plan, dict):
        rows = plan
    else:
        rows = reference.resolve(plan, original)
        reference.assert_same_plan(plan, rows)
    pc, pe, po = dict(m_c.named_parameters()), dict(m_e.named_parameters()), dict(original.named_parameters())
    for name in pc:
        if name not in rows:
            assert torch.equal(pc[name], po[name]), f"frozen {name} changed"
            assert torch.equal(pe[name], po[name]), f"frozen {name} changed in the eager reference"
        torch.testing.assert_close(pc[name], pe[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        if rows.get(name) is not None:  # rows outside the selection are frozen: bit-identical
            keep = torch.ones(pc[name].shape[0], dtype=torch.bool)
            keep[list(rows[name])] = False
            assert torch.equal(pc[name][keep], po[name][keep]), f"unselected rows of {name} changed"
            assert torch.equal(pe[name][keep], po[name][keep]), f"unselected rows of {name} changed in the reference"
    bc, be = dict(m_c.named_buffers()), dict(m_e.named_buffers())
    for name in bc:
        torch.testing.assert_close(bc[name], be[name], rtol=rtol, atol=atol, msg=lambda m: f"buffer {name}: {m}")
