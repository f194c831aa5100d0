"""pockc.compile: model + loss + example batch + update policy -> TrainStep."""
from __future__ import annotations

import time

import torch
import torch.fx as fx

from pockc.errors import CompileError
from pockc.passes.insert_optimizer import insert_optimizer
from pockc.passes.prune_backward import prune_backward
from pockc.passes.schedule_updates import schedule_updates
from pockc.plan import UpdatePlan, resolve_update
from pockc.runtime.optim import SGD, Optimizer
from pockc.runtime.train_step import TrainStep
from pockc.trace import analyze_forward, trace_joint


def _check_inputs(model, loss_fn, example_batch, optimizer):
    if not isinstance(model, torch.nn.Module):
        raise CompileError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise CompileError("loss_fn must be a callable loss_fn(model, *batch) -> scalar tensor")
    if isinstance(example_batch, torch.Tensor):
        example_batch = (example_batch,)
    if not isinstance(example_batch, (tuple, list)) or not any(isinstance(b, torch.Tensor) for b in example_batch):
        raise CompileError("example_batch must be a tuple of tensors, e.g. (x, y)")
    if optimizer is None:
        optimizer = SGD(lr=1e-3)
    if isinstance(optimizer, torch.optim.Optimizer):
        raise CompileError(f"pass a pockc optimizer (pockc.SGD / pockc.AdamW with torch.optim's arguments), "
                           f"not torch.optim.{type(optimizer).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise CompileError(f"optimizer must be pockc.SGD(...) or pockc.AdamW(...), got {type(optimizer).__name__}")
    return tuple(example_batch), optimizer


def run_passes(gm, stages):
    """Run ``(name, fn)`` stages in order; a failure names the stage and those that ran before."""
    done = []
    for name, fn in stages:
        try:
            gm = fn(gm).graph_module
        except CompileError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CompileError(f"pass {name} failed ({type(e).__name__}: {e}); passes run before it: "
                               f"{', '.join(done) or 'none'}. This is a pockc bug: please report it") from e
        done.append(name)
    return gm


def build_graph(model, loss_fn, batch, plan: UpdatePlan, optimizer):
    """The pipeline: trace the joint graph, prune it, add the optimizer, schedule."""
    gm, layout = trace_joint(model, loss_fn, batch, plan)                 # forward + needed backward
    gm = run_passes(gm, [
        ("prune_backward", lambda g: prune_backward(g, layout)),         # channel slices, masks, DCE
        ("insert_optimizer", lambda g: insert_optimizer(g, layout, optimizer)),  # in-place updates
        ("schedule_updates", schedule_updates),                           # update right after grad
    ])
    return gm, layout


def compile(model: torch.nn.Module, loss_fn, example_batch, update="full", optimizer: Optimizer | None = None,
            *, verbose: bool = False) -> TrainStep:
    """Compile one training step of ``model``.

    ``update`` is a preset (``"full"``, ``"bias"``, ``"last:K"``, ``"head"``; join with ``+``), a
    dict of glob patterns over parameter names to ``"full"`` / ``"frozen"`` / ``"channels:R"``, an
    UpdatePlan, or a list of these (later entries override earlier ones).

    >>> import torch, torch.nn.functional as F, pockc
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    >>> def loss_fn(model, x, y):
    ...     return F.cross_entropy(model(x), y)
    >>> step = pockc.compile(model, loss_fn, (x, y), update="last:1", optimizer=pockc.SGD(lr=0.1, momentum=0.9))
    >>> loss = step(x, y)          # updates model[2] in place; model[0] stays as it was
    >>> step.update_plan.trainable_names()
    ['2.bias', '2.weight']
    """
    batch, optimizer = _check_inputs(model, loss_fn, example_batch, optimizer)
    t0 = time.perf_counter()
    order = analyze_forward(model, loss_fn, batch)
    plan = resolve_update(update, model, order)
    gm, layout = build_graph(model, loss_fn, batch, plan, optimizer)
    if layout.unused:
        import warnings
        warnings.warn(f"pockc: trained parameters with no path to the loss get no update: {layout.unused}",
                      stacklevel=2)

    def recompile(new_batch):
        g, lay = build_graph(model, loss_fn, tuple(new_batch), plan, optimizer)
        if lay.to_dict() != layout.to_dict():
            raise CompileError("recompiling for a new batch shape changed the step's inputs; compile again")
        return g

    step = TrainStep(model, gm, layout, optimizer, plan, batch, recompile)
    step.compile_seconds = time.perf_counter() - t0
    if verbose:
        print(plan.table())
        print(f"compiled in {step.compile_seconds:.2f}s, {len(gm.graph.nodes)} graph nodes")
    return step


def graph_stats(gm: fx.GraphModule) -> dict:
    """Counts of nodes per role (forward / backward / update)."""
    out = {}
    for n in gm.graph.nodes:
        r = n.meta.get("pockc.role", "other")
        out[r] = out.get(r, 0) + 1
    return out
