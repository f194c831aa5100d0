"""TrainStep: run a compiled training step against the user's module.

The step's graph takes, in order: trained parameters, frozen parameters, buffers, optimizer
state, optimizer scalars and the batch tensors, and returns the loss. It updates the trained
parameters, the optimizer state and the buffers (batch-norm statistics) in place, so the user's
module stays the source of truth, as after ``optimizer.step()``.

This module imports torch and pockc.runtime only: a saved step runs without the compiler.
"""
from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Mapping

import torch

from . import heap, paging
from .batch import batch_signature, batch_tensors, describe_leaf, signature_difference
from .errors import BatchError, StepError
from .optim import ACCUM_INV, ACCUM_ITEMS, ACCUM_STATE, Optimizer, checked_optimizer


class TrainStep:
    """A compiled training step; call it like ``loss = step(*batch)``.

    Attributes: ``graph`` (the torch.fx.GraphModule), ``code`` (its Python source over aten
    ops), ``update_plan``, ``optimizer`` (change ``step.optimizer.lr`` between steps freely),
    ``layout`` (the order of the graph's inputs), ``state`` (optimizer state tensors).

    A compiled program is specialized to the batch signature (nesting, shapes, dtypes, constants),
    to the model's modules and their train/eval mode, and to the optimizer's hyperparameters other
    than ``lr``. A call that differs in any of them compiles (and caches) a step specialized to it,
    with one warning per kind of change; a change that alters the step's inputs (another optimizer
    class, momentum turned on) is a :class:`StepError`. Other Python attributes of the model
    changed after compiling (``dropout.p``) are not seen: compile again.

    Gradient accumulation (``accumulate`` > 1): each call adds its micro-batch's gradient, weighted
    by its item count (``num_items``, see :func:`count_items`), into the ``grad_accum`` state
    tensors; the ``accumulate``-th call then runs the update program (``graph.meta["pockc.apply"]``:
    divide by the cycle's items, clip, update, clear). ``step_count`` counts calls,
    ``update_count`` optimizer updates (the count the optimizer's scalars see), ``micro_step`` the
    calls since the last update and ``pending_items`` their items. ``last_grad_norm``: the
    gradient norm before clipping of the latest update, when ``max_grad_norm`` is set.

    A step either completes or, if it raises before its loss is computed (a label out of range),
    leaves parameters and optimizer state as they were (passes/defer_writes.py). Ctrl-C during a
    step takes effect once the step has finished (press it twice to stop at once). Calls from
    several threads run one at a time.
    """

    def __init__(self, model, graph, layout, optimizer: Optimizer, update_plan=None,
                 example_batch=(), recompile=None, state=None, *, accumulate: int = 1, max_grad_norm=None,
                 num_items=None):
        self.model = model
        self.accumulate = accumulate
        self.max_grad_norm = max_grad_norm
        self.num_items = num_items    # callable(*batch) -> int, or None: count_items' default rule
        self.micro_step = 0           # calls since the last optimizer update (accumulation)
        self.pending_items = 0        # items of those calls' micro-batches
        self.update_count = 0         # optimizer updates applied
        self.last_grad_norm = None
        self.layout = layout
        self.optimizer = optimizer
        self.update_plan = update_plan
        self._signature = batch_signature(tuple(example_batch))
        self._nargs = len(example_batch)
        self._example = tuple(example_batch)   # what export(target="executorch") traces by default
        self._opt_names = (tuple(optimizer.state_names), tuple(optimizer.scalar_names))
        self._key = (self._signature, module_key(model), optimizer.graph_key())
        self._graphs = {self._key: graph}
        self._last = None      # (key, graph) of the latest call
        self._recompile = recompile
        self.source = None     # the directory a loaded step came from (named in its errors)
        self._warned = set()
        self._lock = threading.Lock()
        self.step_count = 0
        self.backend = "aten"  # how the graph runs: runtime/backends.py (set by pockc.compile)
        self._lowered = {}     # id(graph) -> callable, for backends other than aten
        self._fast = {}        # (id(graph), id of its forward) -> its copy with fast bindings (aten)
        self._heap_kept = set()  # id(graph) whose working memory runtime/heap.py keeps mapped
        self._scalar_inputs = None  # the scalar inputs' 0-dim tensors, refilled each call (inputs())
        self.comm = None       # data parallel (runtime/distributed.py): set by pockc.compile or pockc.load
        # per input tensor of the model: (module path, attribute, is a parameter), in layout order
        k = len(layout.params) + len(layout.frozen)
        self._paths = [(n.split(".")[:-1], n.split(".")[-1], i < k)
                       for i, n in enumerate((*layout.params, *layout.frozen, *layout.buffers))]
        if state is None:
            params = dict(model.named_parameters())
            rows = {name: selected_rows(params[name].detach(), sel) for name, sel in layout.grads}
            init = {name: optimizer.init_state(t) for name, t in rows.items()}
            state = {}
            for name, s in map(tuple, layout.state):   # the graph's order; grad_accum buffers start at zero
                state[(name, s)] = (init[name][s] if s != ACCUM_STATE
                                    else torch.zeros_like(rows[name], memory_format=torch.contiguous_format))
        self.state = state
        self._place_tier(graph)

    def _restore_signature(self, signature, nargs, source=None):
        """A loaded step: specialized to the saved batch signature, with no compiler behind it."""
        self._signature, self._nargs, self.source = signature, nargs, source
        graph = self._graphs.pop(self._key)
        self._key = (signature, module_key(self.model), self.optimizer.graph_key())
        self._graphs = {self._key: graph}
        self._last = None

    # -- the emitted program ---------------------------------------------------------------
    @property
    def graph(self):
        return self._graphs[self._key]

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, opt):
        self._optimizer = checked_optimizer(opt)

    @property
    def code(self) -> str:
        return self.graph.code

    # -- running ---------------------------------------------------------------------------
    def _graph_for(self, batch):
        key = (batch_signature(batch), module_key(self.model), self.optimizer.graph_key())
        last = self._last
        if last is not None and last[0] == key:   # the usual case: compared element by element,
            return last[1]                        # identical objects first (cheaper than hashing)
        gm = self._graphs.get(key)
        if gm is None:
            gm = self._graphs[key] = self._specialize(key, batch)
            self._place_tier(gm)
        self._last = (key, gm)
        return gm

    def _place_tier(self, gm):
        """Move the optimizer state that ``gm`` keeps in the slow tier (placeholders marked
        ``pockc.tier``, passes/rematerialize.py) into tier storage (runtime/paging.py), once."""
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        k = len(self.layout.params) + len(self.layout.frozen) + len(self.layout.buffers)
        for ph, key in zip(phs[k:], map(tuple, self.layout.state)):
            if ph.meta.get("pockc.tier") and not paging.is_tier_tensor(self.state[key]):
                self.state[key] = paging.tier_tensor(self.state[key])

    def _specialize(self, key, batch):
        sig = key[0]
        ref_sig, ref_modules, ref_opt = self._key
        where = f"{self.source}: " if self.source else ""
        if len(batch) != self._nargs:
            raise BatchError(f"{where}batch has {len(batch)} elements, the step was compiled for {self._nargs}: "
                             + ", ".join(f"batch{p}: {describe_leaf(s)}" for p, s in ref_sig[1]))
        why = signature_difference(sig, ref_sig)
        if why:
            raise BatchError(where + why)
        if key[2] != ref_opt:
            self._check_optimizer()
        if self._recompile is None:
            if self.source is not None:
                what = [w for w, differs in (
                    (f"the batch ({signature_difference_any(sig, ref_sig)})", sig != ref_sig),
                    ("the model's train/eval mode or its submodules", key[1] != ref_modules),
                    ("the optimizer's hyperparameters other than lr", key[2] != ref_opt)) if differs]
                raise BatchError(f"{where}{' and '.join(what)} differ from what the saved step was compiled for; a "
                                 "loaded step runs only that (compile the model again with pockc.compile for others)")
            raise BatchError("the batch, the model's modules or modes, or the optimizer's hyperparameters differ "
                             "from the compiled ones and this step cannot recompile")
        changes = [what for what, differs in (
            ("batch shapes or constants", sig != ref_sig),
            ("the model's train/eval mode or its submodules", key[1] != ref_modules),
            ("the optimizer's hyperparameters", key[2] != ref_opt)) if differs]
        new = [c for c in changes if c not in self._warned]
        if new:
            warnings.warn(f"pockc: {' and '.join(new)} differ from what the step was compiled for; compiling a "
                          "step specialized to them (compiled steps are cached)", stacklevel=4)
            self._warned.update(new)
        return self._recompile(batch, self.optimizer)

    def _check_optimizer(self):
        opt = self.optimizer
        try:
            opt.__post_init__()          # the constructor's checks, on the values as they are now
        except ValueError as e:
            raise StepError(f"step.optimizer: {e}") from None
        if (tuple(opt.state_names), tuple(opt.scalar_names)) != self._opt_names:
            raise StepError(f"step.optimizer ({opt}) keeps other state than the one the step was compiled with "
                            f"(state {list(self._opt_names[0])}, now {list(opt.state_names)}): compile a new step "
                            "for it")

    def inputs(self, batch, items: int = 0) -> list:
        """The flat list of tensors the graph takes for ``batch`` (``items``: its item count, with
        accumulation)."""
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
        scalars = self.optimizer.scalars(self.update_count)
        if self.accumulate > 1:
            total = self.pending_items + items
            if self.comm is not None and self.micro_step + 1 >= self.accumulate:
                total = self.comm.global_items(total)     # the update divides by the global batch's items
            scalars[ACCUM_ITEMS] = float(items)
            scalars[ACCUM_INV] = 1.0 / total if total else 0.0
        # the scalar inputs (lr, bias corrections, accumulation weights) live in tensors of the step,
        # refilled each call: a call allocates nothing of its own before the program runs
        held = self._scalar_inputs
        if held is None or len(held) != len(lay.scalars):
            held = self._scalar_inputs = [torch.zeros((), dtype=torch.float64) for _ in lay.scalars]
        for t, s in zip(held, lay.scalars):
            t.fill_(scalars[s])
        return tensors + [self.state[k] for k in map(tuple, lay.state)] + list(held) + batch_tensors(batch)

    def __call__(self, *batch):
        with self._lock, _DeferInterrupt():
            if self.comm is None:
                return self._call(batch)
            self.comm.check_usable()
            try:
                return self._call(batch)
            except BaseException as e:   # the ranks are out of step now
                err = self.comm.failure(e)
                if err is e:
                    raise
                raise err from e

    def _call(self, batch):
        gm = self._graph_for(batch)
        with torch.no_grad():
            items = self._items(batch)
            inputs = self.inputs(batch, items)
            self._sync_buffers(inputs)
            if id(gm) not in self._heap_kept:
                self._keep_heap(gm, inputs)
            return self._run(gm, inputs, items)

    def _sync_buffers(self, inputs):
        """Data parallel: rank 0's buffers (batch-norm statistics) before the program runs, as DDP's
        broadcast_buffers (runtime/distributed.py)."""
        if self.comm is not None:
            k = len(self.layout.params) + len(self.layout.frozen)
            self.comm.sync_buffers(inputs[k:k + len(self.layout.buffers)])

    def _items(self, batch) -> int:
        if self.accumulate <= 1:
            return 0
        if self.num_items is _NOT_SAVED:
            raise StepError(f"{self.source or 'this step'}: was saved with a custom num_items function, which a saved "
                            "step cannot hold: set step.num_items = <the function> after pockc.load")
        return count_items(batch, self.num_items)

    def _run(self, gm, inputs, items: int = 0):
        """Run ``gm`` on ``inputs``; with accumulation, on the cycle's last call, the update after it."""
        out = self._executable(gm, inputs)(*inputs)
        self.step_count += 1
        if self.accumulate > 1:
            self.micro_step += 1
            self.pending_items += items
            if self.micro_step >= self.accumulate:
                apply = gm.meta["pockc.apply"]
                norm = self._executable(apply, inputs)(*inputs)
                self._updated(norm[0] if norm else None)
        else:
            self._updated(out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _updated(self, norm):
        self.update_count += 1
        self.micro_step = self.pending_items = 0
        if norm is not None:
            self.last_grad_norm = norm

    def _keep_heap(self, gm, inputs):
        """On CPU, keep the step's working memory mapped between calls (runtime/heap.py)."""
        from .backends import device_of
        self._heap_kept.add(id(gm))
        if device_of(inputs) != "cpu":
            return
        memory = getattr(self, "memory", None)
        if memory is not None and gm is self._graphs[self._key]:
            working = memory.required_bytes
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

    def state_dict(self) -> dict:
        """The model's full state dict (``model.state_dict()``), with the trained values."""
        return self.model.state_dict()

    def save(self, path, *, extra: dict | None = None) -> str:
        """Save this step to the directory ``path``: its program, every tensor it reads or writes
        (trained and frozen weights, buffers, optimizer state), its step count and its plans.
        ``pockc.load(path)`` continues training from there with torch and pockc.runtime alone;
        saving again into ``path`` replaces the checkpoint atomically (runtime/artifact.py)."""
        from .artifact import save
        return save(self, path, extra=extra)

    def export(self, path, target: str = "aoti", **kwargs) -> str:
        """Write this step, optimizer update included, for a runtime without pockc:
        ``target="aoti"`` -- an AOTInductor package (``.pt2``) that libtorch runs from C++
        (runtime/aoti.py, runtime/cpp/) and ``pockc.load`` loads."""
        if target == "aoti":
            if self.comm is not None:
                raise StepError("step.export(target='aoti') cannot export a data-parallel step (its program calls "
                                "torch.distributed collectives): compile it with distributed=False to export it")
            if self.accumulate > 1:
                raise StepError(f"step.export(target='aoti') cannot export a step with accumulate={self.accumulate} "
                                "(it runs two programs): compile the model without accumulate= to export it, or "
                                "save this one with step.save(dir)")
            from .aoti import export_aoti
            return export_aoti(self, path, **kwargs)
        if target == "executorch":
            from .executorch import export_executorch
            return export_executorch(self, path, **kwargs)
        raise ValueError(f"unknown export target {target!r}; use 'aoti' or 'executorch' (or step.save(path) for "
                         "pockc's own format)")

    def portable_graph(self, batch):
        """The step's program for ``batch`` as plain contiguous ATen ops, for another runtime
        (runtime/executorch.py): recompiled without the CPU-specific layout passes (channels-last,
        oneDNN 1x1 convolutions, ``_foreach_*`` updates) when the step can recompile, else its own
        program if it has none of them (a StepError naming them otherwise)."""
        if self._recompile is not None:
            try:
                return self._recompile(tuple(batch), self.optimizer, portable=True)
            except TypeError as e:
                if "portable" not in str(e):
                    raise
        gm = self._graph_for(tuple(batch))
        bad = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and not _portable_node(n)})
        if bad:
            raise StepError(f"this step's program uses CPU-specific ops ({', '.join(bad)}) and the step cannot "
                            "recompile (a loaded step): export it from the step pockc.compile returned")
        return gm

    def print_trainable_parameters(self):
        print(self.update_plan.summary() if self.update_plan is not None else "")

    def __repr__(self):
        n = len(self.graph.graph.nodes)
        return (f"TrainStep({type(self.model).__name__}, trains {len(self.layout.grads)} tensors, "
                f"{type(self.optimizer).__name__}, {n} graph nodes)")


def _portable_node(n) -> bool:
    """Whether a node of a step's program is plain ATen in the contiguous layout."""
    name = getattr(n.target, "__name__", str(n.target))
    if "_foreach_" in name or "mkldnn" in str(n.target):
        return False
    return n.kwargs.get("memory_format") not in (torch.channels_last, torch.channels_last_3d)


def signature_difference_any(sig, ref) -> str:
    """Which leaves of two signatures of the same structure differ (for a step that cannot recompile)."""
    for (path, a), (_, b) in zip(sig[1], ref[1]):
        if a != b:
            return f"batch{path} is a {describe_leaf(a)}, saved for a {describe_leaf(b)}"
    return "its structure differs"


def module_key(model) -> tuple:
    """The model's module tree as the step sees it: every module object (held, so its id cannot be
    reused) and its ``training`` flag, in a fixed walk order. Cheaper than ``named_modules()``."""
    out, todo = [], [model]
    add, pop, extend = out.append, todo.pop, todo.extend
    while todo:
        m = pop()
        if m is not None:
            add(m)
            add(m.training)
            extend(m._modules.values())
    return tuple(out)


class _DeferInterrupt:
    """Ctrl-C (SIGINT) during a step raises KeyboardInterrupt once the step has finished, so an
    interrupted run never holds half-updated parameters; a second Ctrl-C raises at once. Only in
    the main thread, and only where Python's default handler is installed."""

    def __enter__(self):
        self.hit, self.old = False, None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, exc_type, exc, tb):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.hit and exc_type is None:
            raise KeyboardInterrupt
        return False


_NOT_SAVED = object()   # num_items of a loaded step that was saved with a custom function


def count_items(batch, num_items=None) -> int:
    """The items n_i a micro-batch's mean loss averages over, which gradient accumulation weights
    its gradient by: ``num_items(*batch)`` when given; else, for a batch with a ``labels`` tensor
    leaf (a dict key, at any depth), its labels != -100 -- of ``labels[..., 1:]`` when it has 2 or
    more dims, since Hugging Face's causal LM loss shifts them by one (pass ``num_items`` for a
    loss that does not); else the batch size, the first dimension of the first tensor."""
    if num_items is not None:
        n = num_items(*batch)
        if isinstance(n, torch.Tensor) and n.numel() == 1 and not n.is_floating_point():
            n = int(n.item())
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise StepError(f"num_items(*batch) must return a whole number >= 0 of items, got {n!r}")
        return n
    labels = _find_labels(batch)
    if labels is not None:
        if labels.dim() >= 2:
            labels = labels[..., 1:]
        return int((labels != -100).sum())
    first = next(iter(batch_tensors(batch)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def _find_labels(obj):
    if isinstance(obj, Mapping):   # a dict, or transformers' BatchEncoding
        t = obj.get("labels")
        if isinstance(t, torch.Tensor):
            return t
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for x in obj:
            if isinstance(x, (Mapping, list, tuple)):
                t = _find_labels(x)
                if t is not None:
                    return t
    return None


def selected_rows(p, sel):
    """The trained part of ``p``: itself, a view of rows a:b, or a gathered copy of listed rows."""
    if sel is None:
        return p
    if sel[0] == "slice":
        return p[sel[1]:sel[2]]
    return p.index_select(0, torch.as_tensor(list(sel[1]), device=p.device))
