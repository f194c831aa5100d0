"""Capturing a model's loss through torch.export when plain make_fx cannot trace it.

pockc's tracer (pockc/trace.py) runs the user's Python under make_fx. Some models -- Hugging
Face ``transformers`` versions whose mask code takes data-dependent branches unless it detects
dynamo -- stop there. ``export_loss`` captures ``loss_fn(model, *batch)`` once with
``torch.export.export`` (the path Hugging Face supports for compilation), which yields a graph
of aten ops over the model's parameters and buffers with no Python control flow left, and
returns a *replay* loss function: ``replay(model, *batch)`` runs that graph on whatever tensors
``model``'s attributes hold at call time. pockc.trace treats the replay like any loss function
(functional_call substitutes the parameters), so the joint graph, pruning and the in-graph
optimizer work unchanged. The captured graph is specialized to the batch's shapes: a new shape
re-exports (TrainStep's recompile path).
"""
from __future__ import annotations

import operator
import warnings

import torch

from pockc.errors import CompileError
from pockc.runtime.batch import batch_tensors, rebuild_batch
from pockc.trace import _module_tracker


class _ExportLoss(torch.nn.Module):
    def __init__(self, model, loss_fn, batch):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.batch = batch

    def forward(self, *tensors):
        return self.loss_fn(self.model, *rebuild_batch(self.batch, tensors))


def export_loss(model, loss_fn, batch):
    """Returns ``(replay_loss_fn, module execution order)``; see the module docstring."""
    batch = tuple(batch)
    tensors = batch_tensors(batch)
    wrapper = _ExportLoss(model, loss_fn, batch)
    with _module_tracker(model) as (order, stack), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(wrapper, tuple(tensors), strict=False)
        except Exception as e:  # noqa: BLE001 -- reported as one actionable line
            where = f" in module '{stack[-1][0]}' ({stack[-1][1]})" if stack and stack[-1][0] else ""
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompileError(f"cannot capture the model with torch.export{where}: {type(e).__name__}: "
                               f"{text[:300]}") from e
    order = list(order)
    unlifted = ep.module()
    # Parameters and buffers the exported graph reads, by their name in ``model``.
    sig = ep.graph_signature
    names = [n[len("model."):] for n in list(sig.parameters) + list(sig.buffers) if n.startswith("model.")]
    getters = {n: operator.attrgetter(n) for n in names}

    def replay(m, *b):
        values = {f"model.{n}": get(m) for n, get in getters.items()}
        return torch.func.functional_call(unlifted, values, tuple(batch_tensors(b)), strict=False,
                                          tie_weights=True)

    replay.exported_program = ep
    return replay, order
