"""insert_optimizer: put the optimizer update into the graph as in-place ops.

For every gradient output ``(param, selection)`` of the joint graph, the optimizer's ``update``
(plain torch code, runtime/optim.py) is traced with make_fx and spliced in. It writes the
trained tensor in place: the whole parameter, a ``slice`` view of its selected rows, or, for an
index list, a gathered copy written back with ``index_copy_``. Optimizer state exists only for the
trained rows. New placeholders: one per state tensor (after the buffers) and one per optimizer
scalar (0-d float64, shared by all tensors). The graph's output becomes the loss alone.

Nodes added here carry ``meta['pockc.role'] = 'update'`` and ``meta['pockc.param'] = name``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

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


def insert_optimizer(gm: fx.GraphModule, layout, optimizer) -> PassResult:
    graph = gm.graph
    groups = layout.placeholders(graph)
    param_ph = dict(zip(layout.params, groups["params"]))
    weights = groups["params"] + groups["frozen"] + groups["buffers"]
    last_buffer = weights[-1] if weights else None
    out = next(n for n in graph.nodes if n.op == "output")
    loss, *grads = out.args[0]
    state_names = tuple(optimizer.state_names)
    scalar_names = tuple(optimizer.scalar_names)

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

    for (name, sel), g in zip(layout.grads, grads):
        p = param_ph[name]
        before = set(graph.nodes)
        with graph.inserting_before(out):
            if sel is None:
                target = p
            elif sel[0] == "slice":
                target = call(graph, aten.slice.Tensor, (p, 0, sel[1], sel[2]))
            else:
                idx = sel[1] if isinstance(sel[1], fx.Node) else None
                if idx is None:
                    const = f"_pockc_rows_{_safe(name)}"
                    gm.register_buffer(const, torch.tensor(sel[1], dtype=torch.long))
                    idx = graph.get_attr(const)
                target = graph.call_function(aten.index_select.default, (p, 0, idx))
            gval = g.meta["val"]
            pdtype = p.meta["val"].dtype
            sub = _update_graph(optimizer, tuple(gval.shape), pdtype, gval.dtype, state_names, scalar_names)
            sub_ph = [n for n in sub.graph.nodes if n.op == "placeholder"]
            val_map = dict(zip(sub_ph, [target, g] + [state_ph[(name, s)] for s in state_names]
                               + [scalar_ph[s] for s in scalar_names]))
            graph.graph_copy(sub.graph, val_map)
            if sel is not None and sel[0] == "index":
                graph.call_function(aten.index_copy_.default, (p, 0, idx, target))
        for n in graph.nodes:
            if n not in before:
                n.meta["pockc.role"] = "update"
                n.meta["pockc.param"] = name
    out.args = ((loss,),)
    dce(gm)
    graph.lint()
    gm.recompile()
    # spliced nodes carry vals of the update traced at a placeholder shape: recompute them
    refresh_vals(gm, [n for n in graph.nodes if n.meta.get("pockc.role") == "update"])
    return PassResult(gm, True)
