"""The correctness oracle: eager PyTorch autograd + torch.optim with the same trainable set."""
from __future__ import annotations

import copy

import torch

import pockc


def torch_optimizer(opt: pockc.Optimizer, params):
    cfg = {k: v for k, v in opt.to_dict().items() if k != "type"}
    cls = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}[type(opt).__name__]
    return cls(params, foreach=False, **cfg)


def eager_steps(model, loss_fn, batches, plan: pockc.UpdatePlan, opt: pockc.Optimizer):
    """Train ``model`` (in place) for len(batches) steps the eager way; returns the losses."""
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    leaves, sparse = [], []
    for name in plan.trainable_names():
        p = params[name]
        p.requires_grad_(True)
        sel = plan.selection(name)
        if sel is None:
            leaves.append(p)
        else:
            rows = torch.arange(sel[1], sel[2]) if sel[0] == "slice" else torch.tensor(sel[1])
            leaf = p.detach()[rows].clone().requires_grad_(True)
            leaves.append(leaf)
            sparse.append((p, rows, leaf))
    optim = torch_optimizer(opt, leaves)
    losses = []
    for batch in batches:
        optim.zero_grad(set_to_none=True)
        for p, _, _ in sparse:
            p.grad = None
        loss = loss_fn(model, *batch)
        loss.backward()
        for p, rows, leaf in sparse:
            leaf.grad = None if p.grad is None else p.grad[rows].clone()
        optim.step()
        with torch.no_grad():
            for p, rows, leaf in sparse:
                p[rows] = leaf
        losses.append(loss.detach())
    for p in params.values():
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
    lc = [step(*b) for b in batches]
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
