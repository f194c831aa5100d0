"""TrainStep: run a compiled training step against the user's module.

The step's graph takes, in order: trained parameters, frozen parameters, buffers, optimizer
state, optimizer scalars and the batch tensors, and returns the loss. It updates the trained
parameters, the optimizer state and the buffers (batch-norm statistics) in place, so the user's
module stays the source of truth, as after ``optimizer.step()``.

This module imports torch and pockc.runtime only: a saved step runs without the compiler.
"""
from __future__ import annotations

import warnings

import torch

from . import heap
from .errors import BatchError
from .optim import Optimizer


def batch_signature(batch) -> tuple:
    """What a compiled step is specialized to: per element, (shape, dtype, device) or the value."""
    sig = []
    for b in batch:
        if isinstance(b, torch.Tensor):
            sig.append(("tensor", tuple(b.shape), b.dtype, b.device.type))
        else:
            sig.append(("const", repr(b)))
    return tuple(sig)


def _describe(sig):
    if sig[0] == "tensor":
        return f"{sig[2]} tensor of shape {list(sig[1])}".replace("torch.", "")
    return f"constant {sig[1]}"


class TrainStep:
    """A compiled training step; call it like ``loss = step(*batch)``.

    Attributes: ``graph`` (the torch.fx.GraphModule), ``code`` (its Python source over aten
    ops), ``update_plan``, ``optimizer`` (change ``step.optimizer.lr`` between steps freely),
    ``layout`` (the order of the graph's inputs), ``state`` (optimizer state tensors).
    """

    def __init__(self, model, graph, layout, optimizer: Optimizer, update_plan=None,
                 example_batch=(), recompile=None, state=None):
        self.model = model
        self.layout = layout
        self.optimizer = optimizer
        self.update_plan = update_plan
        self._signature = batch_signature(example_batch)
        self._graphs = {self._signature: graph}
        self._recompile = recompile
        self._warned = False
        self.step_count = 0
        self.backend = "aten"  # how the graph runs: runtime/backends.py (set by pockc.compile)
        self._lowered = {}     # id(graph) -> callable, for backends other than aten
        self._fast = {}        # (id(graph), id of its forward) -> its copy with fast bindings (aten)
        self._heap_kept = set()  # id(graph) whose working memory runtime/heap.py keeps mapped
        # per input tensor of the model: (module path, attribute, is a parameter), in layout order
        k = len(layout.params) + len(layout.frozen)
        self._paths = [(n.split(".")[:-1], n.split(".")[-1], i < k)
                       for i, n in enumerate((*layout.params, *layout.frozen, *layout.buffers))]
        if state is None:
            params = dict(model.named_parameters())
            state = {}
            for name, sel in layout.grads:
                for s, t in optimizer.init_state(selected_rows(params[name].detach(), sel)).items():
                    state[(name, s)] = t
        self.state = state

    # -- the emitted program ---------------------------------------------------------------
    @property
    def graph(self):
        return self._graphs[self._signature]

    @property
    def code(self) -> str:
        return self.graph.code

    # -- running ---------------------------------------------------------------------------
    def _graph_for(self, batch):
        sig = batch_signature(batch)
        gm = self._graphs.get(sig)
        if gm is not None:
            return gm
        ref = self._signature
        if len(sig) != len(ref):
            raise BatchError(f"batch has {len(sig)} elements, the step was compiled for {len(ref)}: "
                             + ", ".join(_describe(s) for s in ref))
        for i, (a, b) in enumerate(zip(sig, ref)):
            if a[0] != b[0] or (a[0] == "const" and a != b):
                raise BatchError(f"batch element {i} is a {_describe(a)}, the step was compiled for a {_describe(b)}")
            if a[0] == "tensor" and (len(a[1]) != len(b[1]) or a[2] != b[2] or a[3] != b[3]):
                raise BatchError(f"batch element {i} is a {_describe(a)} on {a[3]}, the step was compiled for a "
                                 f"{_describe(b)} on {b[3]}: rank, dtype and device must match")
        if self._recompile is None:
            raise BatchError("batch shapes differ from the compiled ones and this step cannot recompile: "
                             + ", ".join(_describe(s) for s in sig))
        if not self._warned:
            warnings.warn("pockc: batch shapes differ from the example batch; compiling a step specialized "
                          "to them (compiled steps are cached per shape)", stacklevel=3)
            self._warned = True
        gm = self._recompile(batch)
        self._graphs[sig] = gm
        return gm

    def inputs(self, batch) -> list:
        """The flat list of tensors the graph takes for ``batch``."""
        lay = self.layout
        # Each tensor is looked up through the module tree as it is now (a parameter or a submodule
        # replaced since compiling is picked up, as named_parameters() would), without walking
        # every module: that walk cost ~1 ms per step for MobileNetV2.
        tensors = []
        for path, leaf, is_param in self._paths:
            mod = self.model
            for part in path:
                mod = mod._modules[part]
            tensors.append(mod._parameters[leaf] if is_param else mod._buffers[leaf])
        scalars = self.optimizer.scalars(self.step_count)
        return (tensors + [self.state[k] for k in map(tuple, lay.state)]
                + [torch.tensor(scalars[s], dtype=torch.float64) for s in lay.scalars]
                + [b for b in batch if isinstance(b, torch.Tensor)])

    def __call__(self, *batch):
        gm = self._graph_for(batch)
        with torch.no_grad():
            inputs = self.inputs(batch)
            if id(gm) not in self._heap_kept:
                self._keep_heap(gm, inputs)
            loss = self._executable(gm, inputs)(*inputs)
        self.step_count += 1
        return loss[0] if isinstance(loss, (tuple, list)) else loss

    def _keep_heap(self, gm, inputs):
        """On CPU, keep the step's working memory mapped between calls (runtime/heap.py)."""
        from .backends import device_of
        self._heap_kept.add(id(gm))
        if device_of(inputs) != "cpu":
            return
        plan = getattr(getattr(self, "memory", None), "plan", None)
        if plan is not None and gm is self._graphs[self._signature]:
            working = plan.required_bytes
        else:  # no plan for this graph: every intermediate at once, an upper bound
            working = 0
            for n in gm.graph.nodes:
                for v in torch.utils._pytree.tree_leaves(n.meta.get("val")) if n.op == "call_function" else ():
                    if isinstance(v, torch.Tensor):
                        working += v.numel() * v.element_size()
        heap.keep_heap(working)

    def _executable(self, gm, inputs):
        if self.backend == "aten":
            # gm with fast Python bindings (runtime/backends.py), rebuilt if gm was recompiled
            key = (id(gm), id(type(gm).forward))
            fn = self._fast.get(key)
            if fn is None:
                from .backends import fast_aten
                self._fast = {k: v for k, v in self._fast.items() if k[0] != id(gm)}
                fn = self._fast[key] = fast_aten(gm)
            return fn
        fn = self._lowered.get(id(gm))
        if fn is None:  # lowered once per batch shape, on the first call with real inputs
            from .backends import lower
            fn = self._lowered[id(gm)] = lower(gm, self.backend, inputs)
        return fn

    def trainable_parameters(self) -> dict:
        """name -> the trained tensor (a view of the selected rows for a slice selection)."""
        params = dict(self.model.named_parameters())
        out = {}
        for name, sel in self.layout.grads:
            out[name] = selected_rows(params[name].detach(), sel)
        return out

    def print_trainable_parameters(self):
        print(self.update_plan.summary() if self.update_plan is not None else "")

    def __repr__(self):
        n = len(self.graph.graph.nodes)
        return (f"TrainStep({type(self.model).__name__}, trains {len(self.layout.grads)} tensors, "
                f"{type(self.optimizer).__name__}, {n} graph nodes)")


def selected_rows(p, sel):
    """The trained part of ``p``: itself, a view of rows a:b, or a gathered copy of listed rows."""
    if sel is None:
        return p
    if sel[0] == "slice":
        return p[sel[1]:sel[2]]
    return p.index_select(0, torch.as_tensor(list(sel[1]), device=p.device))
