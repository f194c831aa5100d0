"""insert_optimizer: put the optimizer update into the graph as in-place ops.

For every gradient output ``(param, selection)`` of the joint graph, the optimizer's ``update``
(plain torch code, runtime/optim.py) is traced with make_fx and spliced in. It writes the
trained tensor in place: the whole parameter, a ``slice`` view of its selected rows, or, for an
index list, a gathered copy written back with ``index_copy_``. Optimizer state exists only for the
trained rows. New placeholders: one per state tensor (after the buffers) and one per optimizer
scalar (0-d float64, shared by all tensors). The graph's output becomes the loss alone.

Many small trained vectors (``FOREACH_MIN_TENSORS`` or more 0-d/1-d tensors of at most
``FOREACH_MAX_NUMEL`` elements each, whole or a row slice, of one dtype and device: biases and
norm affines, e.g. the 105 of a bias-only MobileNetV2) are updated together by the optimizer's
``update_foreach``: one ``torch._foreach_*`` op per arithmetic step for the whole list instead of
one op per tensor. Their arithmetic is tiny; what the per-tensor form costs is per-op dispatch
(measured, 105 SGD-momentum updates of bias vectors, 1 thread: 3.1 ms per step as per-tensor ops,
1.3 ms as foreach ops). The group runs once the last of its gradients is final
(passes.schedule_updates), so those small gradients live a little longer (bias-only
MobileNetV2, b2 64px: planned peak +80 bytes); weight matrices and kernels keep the per-tensor
update right after their own gradient, which frees their gradients early. Both forms apply the
same elementwise ops to each tensor (runtime/optim.py): the results are bit-identical.

Gradient clipping (``max_grad_norm``): the norm of every trained gradient (trained rows only),
their global L2 norm and the factor ``min(1, max_norm / (norm + 1e-6))`` are nodes of the group
``'clip_grad_norm'``, as torch.nn.utils.clip_grad_norm_ computes them (runtime/optim.py); each
update first multiplies its gradient by the factor. Every update then depends on every gradient,
so passes.schedule_updates keeps them all after the last one (the memory plan holds the
gradients until then), and the graph returns ``(loss, norm)``.

Gradient accumulation (``accumulate`` > 1): one more state tensor per trained tensor,
``grad_accum`` (its trained rows), and two scalars, ``accum_items`` (n_i) and
``accum_inv_items`` (1/N). The graph itself only accumulates, ``acc.addcmul_(g, n_i)`` right after
each gradient (``acc`` ends as the gradient of the sum over the cycle's items, since the loss is
each micro-batch's mean); :func:`apply_program` builds the update program, stored in
``gm.meta['pockc.apply']``, that the K-th call runs next over the same inputs: ``acc *= 1/N`` in
place, the clip factor of those, the updates with ``acc`` as the gradient, ``acc.zero_()``.
Its updates run after the whole backward pass, so they cost no memory next to activations.

Data parallel (``comm``, pockc/distributed.py): the final gradients are averaged over the ranks
before their updates, bucketed and in place where possible (passes/allreduce.py); with
accumulation, the apply program sums the ranks' divided buffers instead, once per update.

Nodes added here carry ``meta['pockc.role'] = 'update'`` and ``meta['pockc.param'] = name`` (for a
foreach group: ``'foreach[first name..]'``, and ``meta['pockc.params']`` lists every name).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from pockc.runtime.optim import (ACCUM_INV, ACCUM_ITEMS, ACCUM_STATE, clip_coefficient,
                                  total_grad_norm)

from .fx_utils import PassResult, call, dce, refresh_vals

aten = torch.ops.aten


def _safe(name):
    return "".join(c if c.isalnum() else "_" for c in name)


def _shape_free(gm: fx.GraphModule) -> bool:
    """True when no op in ``gm`` takes a shape or size, so the graph is valid for any shape."""
    for n in gm.graph.nodes:
        for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(a, int) and not isinstance(a, bool) and n.op == "call_function":
                return False
    return True


_UPDATE_CACHE: dict = {}
FOREACH_MAX_NUMEL = 16384   # elements: below this a tensor's update costs more in dispatch than in arithmetic
FOREACH_MIN_TENSORS = 16    # fewer small tensors than this save too little (~5 us a tensor) to group


def _update_graph(optimizer, shape, pdtype, gdtype, state_names, scalar_names):
    """The traced update, shared by every tensor when it is elementwise (it usually is)."""
    key = (id(optimizer), repr(optimizer), pdtype, gdtype)
    gm = _UPDATE_CACHE.get(key)
    if gm is not None:
        return gm
    gm = _trace_update(optimizer, (2,), pdtype, gdtype, state_names, scalar_names)
    if _shape_free(gm):
        if len(_UPDATE_CACHE) > 64:
            _UPDATE_CACHE.clear()
        _UPDATE_CACHE[key] = gm
        return gm
    return _trace_update(optimizer, shape, pdtype, gdtype, state_names, scalar_names)


def _trace_update(optimizer, shape, pdtype, gdtype, state_names, scalar_names):
    def fn(p, g, *rest):
        state = dict(zip(state_names, rest[:len(state_names)]))
        scalars = dict(zip(scalar_names, rest[len(state_names):]))
        optimizer.update(p, g, state, scalars)
        return None

    args = [torch.empty(shape, dtype=pdtype), torch.empty(shape, dtype=gdtype)]
    args += [torch.empty(shape, dtype=pdtype) for _ in state_names]
    args += [torch.zeros((), dtype=torch.float64) for _ in scalar_names]
    return make_fx(fn, tracing_mode="fake")(*args)


def _trace_foreach(optimizer, gvals, pdtype, state_names, scalar_names):
    n = len(gvals)

    def fn(*flat):
        ps, gs = list(flat[:n]), list(flat[n:2 * n])
        states = {name: list(flat[2 * n + k * n: 2 * n + (k + 1) * n]) for k, name in enumerate(state_names)}
        rest = flat[(2 + len(state_names)) * n:]
        optimizer.update_foreach(ps, gs, states, dict(zip(scalar_names, rest)))
        return None

    args = [torch.empty(tuple(g.shape), dtype=pdtype) for g in gvals]
    args += [torch.empty(tuple(g.shape), dtype=g.dtype) for g in gvals]
    args += [torch.empty(tuple(g.shape), dtype=pdtype) for _ in state_names for g in gvals]
    args += [torch.zeros((), dtype=torch.float64) for _ in scalar_names]
    return make_fx(fn, tracing_mode="fake")(*args)


def foreach_groups(layout, grads, param_vals, optimizer, max_numel=None, min_tensors=None) -> list:
    """Lists of gradient indices to update together with ``update_foreach`` (see the docstring)."""
    max_numel = FOREACH_MAX_NUMEL if max_numel is None else max_numel
    min_tensors = FOREACH_MIN_TENSORS if min_tensors is None else min_tensors
    if not getattr(optimizer, "has_foreach", False):
        return []
    by_kind = {}
    for i, ((name, sel), g) in enumerate(zip(layout.grads, grads)):
        gval, pval = g.meta.get("val"), param_vals[name]
        if (gval is None or gval.dim() > 1 or gval.numel() > max_numel
                or (sel is not None and sel[0] != "slice")):
            continue
        by_kind.setdefault((pval.dtype, gval.dtype, gval.device), []).append(i)
    return [idx for idx in by_kind.values() if len(idx) >= min_tensors]


def _mark(graph, before, role_meta):
    for n in graph.nodes:
        if n not in before:
            n.meta.update(role_meta)


def _emit_clip(gm, graph, grads, max_grad_norm, where):
    """Nodes (before ``where``) computing the global L2 norm of ``grads`` and the clip factor
    ``min(1, max_norm / (norm + 1e-6))``; returns (norm node, factor node)."""
    def fn(*gs):
        total = total_grad_norm(list(gs))
        return total, clip_coefficient(total, float(max_grad_norm))

    sub = make_fx(fn, tracing_mode="fake")(*[torch.empty(tuple(g.meta["val"].shape), dtype=g.meta["val"].dtype)
                                             for g in grads])
    before = set(graph.nodes)
    with graph.inserting_before(where):
        total, coef = graph.graph_copy(sub.graph, dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"],
                                                           grads)))
    _mark(graph, before, {"pockc.role": "update", "pockc.param": CLIP_GROUP})
    refresh_vals(gm, [n for n in graph.nodes if n not in before])   # in this graph's fake mode
    return total, coef


CLIP_GROUP = "clip_grad_norm"   # meta['pockc.param'] of the norm and factor nodes


def _emit_updates(gm, graph, layout, grads, param_ph, state_ph, scalar_ph, optimizer, where, *,
                  coef=None, scale_in_place=False, foreach_max_numel=None, foreach_min_tensors=None):
    """Splice the optimizer's update of every trained tensor in before ``where``. With ``coef``
    (gradient clipping) each gradient is first multiplied by it, in place when
    ``scale_in_place`` (an accumulation buffer, ours to overwrite), else into a temporary that
    inplace_ops may turn into an in-place op where the gradient dies."""
    state_names = tuple(optimizer.state_names)
    scalar_names = tuple(optimizer.scalar_names)
    scale = aten.mul_.Tensor if scale_in_place else aten.mul.Tensor

    def scaled(g):
        return g if coef is None else call(graph, scale, (g, coef))

    groups_fe = foreach_groups(layout, grads, {n: ph.meta["val"] for n, ph in param_ph.items()}, optimizer,
                               foreach_max_numel, foreach_min_tensors)
    grouped = {i for idx in groups_fe for i in idx}
    for idx in groups_fe:
        before = set(graph.nodes)
        names = [layout.grads[i][0] for i in idx]
        with graph.inserting_before(where):
            targets = []
            for i in idx:
                name, sel = layout.grads[i]
                p = param_ph[name]
                targets.append(p if sel is None else call(graph, aten.slice.Tensor, (p, 0, sel[1], sel[2])))
            gs = [scaled(grads[i]) for i in idx]
            gvals = [grads[i].meta["val"] for i in idx]
            sub = _trace_foreach(optimizer, gvals, param_ph[names[0]].meta["val"].dtype, state_names, scalar_names)
            sub_ph = [n for n in sub.graph.nodes if n.op == "placeholder"]
            inputs = (targets + gs
                      + [state_ph[(nm, s)] for s in state_names for nm in names] + [scalar_ph[s] for s in scalar_names])
            graph.graph_copy(sub.graph, dict(zip(sub_ph, inputs)))
        _mark(graph, before, {"pockc.role": "update", "pockc.param": f"foreach[{names[0]}..]",
                              "pockc.params": list(names)})

    for i, ((name, sel), g) in enumerate(zip(layout.grads, grads)):
        if i in grouped:
            continue
        p = param_ph[name]
        before = set(graph.nodes)
        with graph.inserting_before(where):
            if sel is None:
                target = p
            elif sel[0] == "slice":
                target = call(graph, aten.slice.Tensor, (p, 0, sel[1], sel[2]))
            else:
                idx = sel[1] if isinstance(sel[1], fx.Node) else None
                if idx is None:
                    const = f"_pockc_rows_{_safe(name)}"
                    if not hasattr(gm, const):
                        gm.register_buffer(const, torch.tensor(sel[1], dtype=torch.long))
                    idx = graph.get_attr(const)
                target = graph.call_function(aten.index_select.default, (p, 0, idx))
            gval = g.meta["val"]
            g = scaled(g)
            pdtype = p.meta["val"].dtype
            sub = _update_graph(optimizer, tuple(gval.shape), pdtype, gval.dtype, state_names, scalar_names)
            sub_ph = [n for n in sub.graph.nodes if n.op == "placeholder"]
            val_map = dict(zip(sub_ph, [target, g] + [state_ph[(name, s)] for s in state_names]
                               + [scalar_ph[s] for s in scalar_names]))
            graph.graph_copy(sub.graph, val_map)
            if sel is not None and sel[0] == "index":
                graph.call_function(aten.index_copy_.default, (p, 0, idx, target))
        _mark(graph, before, {"pockc.role": "update", "pockc.param": name})


def insert_optimizer(gm: fx.GraphModule, layout, optimizer, foreach_max_numel=None,
                     foreach_min_tensors=None, *, accumulate: int = 1, max_grad_norm=None, comm=None) -> PassResult:
    graph = gm.graph
    groups = layout.placeholders(graph)
    param_ph = dict(zip(layout.params, groups["params"]))
    weights = groups["params"] + groups["frozen"] + groups["buffers"]
    last_buffer = weights[-1] if weights else None
    out = next(n for n in graph.nodes if n.op == "output")
    loss, *grads = out.args[0]
    accumulating = accumulate > 1
    state_names = tuple(optimizer.state_names) + ((ACCUM_STATE,) if accumulating else ())
    scalar_names = tuple(optimizer.scalar_names) + ((ACCUM_ITEMS, ACCUM_INV) if accumulating else ())

    # New placeholders: state per trained tensor, then scalars; they go before the batch.
    anchor = last_buffer
    def add_placeholder(name, val):  # noqa: E306
        nonlocal anchor
        ctx = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(next(iter(graph.nodes)))
        with ctx:
            node = graph.placeholder(name)
        node.meta["pockc.role"] = "input"
        node.meta["val"] = val
        anchor = node
        return node

    state_ph = {}
    layout.state = []
    for (name, _sel), g in zip(layout.grads, grads):
        gval, pval = g.meta["val"], param_ph[name].meta["val"]
        for s in state_names:  # state covers the trained rows, in the parameter's dtype
            val = gval.new_empty(gval.shape, dtype=pval.dtype)
            state_ph[(name, s)] = add_placeholder(f"state_{_safe(name)}_{s}", val)
            layout.state.append((name, s))
    pv0 = next(iter(param_ph.values())).meta["val"] if param_ph else None
    scalar_val = (pv0.new_empty((), dtype=torch.float64, device="cpu") if pv0 is not None
                  else torch.empty((), dtype=torch.float64))  # TrainStep passes 0-d float64 CPU tensors
    scalar_ph = {s: add_placeholder(f"opt_{s}", scalar_val) for s in scalar_names}
    layout.scalars = list(scalar_names)

    outputs = (loss,)
    if accumulating:
        # This program accumulates (acc += n_i * g, each right after its gradient is final:
        # passes.schedule_updates); the update is the apply program, run on the K-th call.
        for (name, _sel), g in zip(layout.grads, grads):
            before = set(graph.nodes)
            with graph.inserting_before(out):
                call(graph, aten.addcmul_.default, (state_ph[(name, ACCUM_STATE)], g, scalar_ph[ACCUM_ITEMS]))
            _mark(graph, before, {"pockc.role": "update", "pockc.param": name})
    else:
        if comm is not None:            # data parallel: the ranks' average of each gradient (passes/allreduce.py)
            from .allreduce import reduce_gradients
            grads = reduce_gradients(gm, graph, layout, grads, out, comm, op="avg")
        coef = None
        if max_grad_norm is not None:   # every update waits for the norm of all gradients
            total, coef = _emit_clip(gm, graph, grads, max_grad_norm, out)
            outputs += (total,)
        _emit_updates(gm, graph, layout, grads, param_ph, state_ph, scalar_ph, optimizer, out, coef=coef,
                      foreach_max_numel=foreach_max_numel, foreach_min_tensors=foreach_min_tensors)
    out.args = (outputs,)
    dce(gm)
    graph.lint()
    gm.recompile()
    # spliced nodes carry vals of the update traced at a placeholder shape: recompute them
    refresh_vals(gm, [n for n in graph.nodes if n.meta.get("pockc.role") == "update"])
    if accumulating:
        gm.meta["pockc.apply"] = apply_program(gm, layout, optimizer, max_grad_norm,
                                               foreach_max_numel, foreach_min_tensors, comm=comm)
        if comm is not None:
            gm.meta["pockc.buckets"] = gm.meta["pockc.apply"].meta["pockc.buckets"]
    return PassResult(gm, True)


def apply_program(gm: fx.GraphModule, layout, optimizer, max_grad_norm=None, foreach_max_numel=None,
                  foreach_min_tensors=None, comm=None) -> fx.GraphModule:
    """The program the K-th call of an accumulating step runs after ``gm`` (its micro-batch
    program), over the same inputs: ``g = acc * (1/N)`` in place, the clip factor of the norm
    of all ``g`` (with ``max_grad_norm``), the optimizer update with ``g``, then ``acc = 0``.
    Returns ``(total norm,)`` when clipping, else ``()``."""
    graph = fx.Graph()
    phs = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            ph = graph.placeholder(n.name)
            ph.meta.update({k: v for k, v in n.meta.items() if k in ("val", "pockc.role")})
            phs[n.name] = ph
    out = graph.output(())
    new = fx.GraphModule(torch.nn.Module(), graph)
    groups = layout.placeholders(graph)
    param_ph = dict(zip(layout.params, groups["params"]))
    state_ph = dict(zip(map(tuple, layout.state), groups["state"]))
    scalar_ph = dict(zip(layout.scalars, groups["scalars"]))
    before = set(graph.nodes)
    with graph.inserting_before(out):
        grads = [call(graph, aten.mul_.Tensor, (state_ph[(name, ACCUM_STATE)], scalar_ph[ACCUM_INV]))
                 for name, _sel in layout.grads]
    _mark(graph, before, {"pockc.role": "update", "pockc.param": "accumulated"})
    if comm is not None:   # data parallel, once per update: the sum over ranks of acc / N (N: the global batch's items)
        from .allreduce import reduce_gradients
        grads = reduce_gradients(new, graph, layout, grads, out, comm, op="sum", owned=True)
    coef, outputs = None, ()
    if max_grad_norm is not None:
        total, coef = _emit_clip(new, graph, grads, max_grad_norm, out)
        outputs = (total,)
    _emit_updates(new, graph, layout, grads, param_ph, state_ph, scalar_ph, optimizer, out, coef=coef,
                  scale_in_place=True, foreach_max_numel=foreach_max_numel, foreach_min_tensors=foreach_min_tensors)
    before = set(graph.nodes)
    with graph.inserting_before(out):
        for name, _sel in layout.grads:
            call(graph, aten.zero_.default, (state_ph[(name, ACCUM_STATE)],))
    _mark(graph, before, {"pockc.role": "update", "pockc.param": "accumulated"})
    out.args = (outputs,)
    graph.lint()
    new.recompile()
    refresh_vals(new, [n for n in graph.nodes if n.meta.get("pockc.role") == "update"])
    return new
