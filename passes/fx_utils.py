"""Small helpers shared by pockc's graph passes: op classification, node creation with fake
metadata, dead-code elimination that respects mutation, and the PassResult convention."""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops whose schema does not mark a mutated argument although the kernel writes it
# (batch norm updates running_mean / running_var in place).
HIDDEN_MUTATION = {   # ops that write running_mean / running_var although their schema does not say so
    aten.native_batch_norm.default: (3, 4),
    aten.native_batch_norm.out: (3, 4),          # passes/inplace_ops.py's batch norm into its input
    aten._native_batch_norm_legit.default: (3, 4),
}
for _name in ("cudnn_batch_norm", "miopen_batch_norm"):
    if hasattr(aten, _name):
        HIDDEN_MUTATION[getattr(aten, _name).default] = (3, 4)

# Multi-output backward ops and the position of their output_mask argument.
OUTPUT_MASK_ARG = {
    aten.convolution_backward.default: 10,
    aten.native_batch_norm_backward.default: 9,
    aten.native_layer_norm_backward.default: 7,
    aten.native_group_norm_backward.default: 9,
}


class PassResult(NamedTuple):
    graph_module: fx.GraphModule
    modified: bool


def is_aten(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)


def mutated_args(node: fx.Node) -> list:
    """Argument nodes that ``node`` writes to."""
    if not is_aten(node):
        return []
    out = []
    schema = node.target._schema
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.append(v)
            elif isinstance(v, (list, tuple)):   # Tensor(a!)[]: the _foreach_*_ ops
                out.extend(x for x in v if isinstance(x, fx.Node))
    for i in HIDDEN_MUTATION.get(node.target, ()):
        if i < len(node.args) and isinstance(node.args[i], fx.Node):
            out.append(node.args[i])
    return out


# Ops whose outputs alias their first argument at run time although their schemas do not say so.
UNMARKED_VIEWS = {aten._unsafe_view.default, aten.alias.default, aten.unsafe_split.Tensor,
                  aten.unsafe_split_with_sizes.default, aten.unsafe_chunk.default}
if hasattr(torch.ops._c10d_functional, "wait_tensor"):   # returns the tensor its collective wrote
    UNMARKED_VIEWS.add(torch.ops._c10d_functional.wait_tensor.default)


def is_view(node: fx.Node) -> bool:
    """True when ``node``'s output aliases its first argument (views, and the UNMARKED_VIEWS:
    _unsafe_view, unsafe_split, ..., which return views at run time although their schemas do
    not say so). For a multi-output op (split) every output aliases it."""
    if not is_aten(node):
        return False
    if node.target in UNMARKED_VIEWS:
        return True
    schema = node.target._schema
    ret = schema.returns[0].alias_info if schema.returns else None
    return ret is not None and not ret.is_write and not schema.is_mutable


def returns_input(node: fx.Node):
    """For an in-place or out= op, the argument its result aliases (``add_`` returns self,
    ``mm.out`` its ``out``), else None."""
    if not is_aten(node):
        return None
    schema = node.target._schema
    ret = schema.returns[0].alias_info if schema.returns else None
    if ret is None or not ret.is_write:
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write and set(a.alias_info.before_set) & set(ret.before_set):
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                return v
    return None


def is_impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_function" and node.target in _paging().PAGE_FUNCTIONS:
        return True
    if not is_aten(node):
        return False
    return (bool(mutated_args(node)) or node.target._schema.is_mutable
            or torch.Tag.nondeterministic_seeded in node.target.tags)


def _paging():
    from pockc.runtime import paging
    return paging


def alias_source(node: fx.Node):
    """The argument a non-aten runtime call returns as is (``page_in_wait``, ``state_in_wait``, ``rng.replay``,
    ``distributed.wait``), else None."""
    from pockc.runtime import distributed, rng
    if node.op == "call_function" and node.target in (_paging().page_in_wait, _paging().state_in_wait, rng.replay,
                                                      distributed.wait):
        return node.args[0]
    return None


def dce(gm: fx.GraphModule) -> bool:
    """Remove nodes whose values are never used and which change nothing."""
    changed = False
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not is_impure(node):
            gm.graph.erase_node(node)
            changed = True
    return changed


def fake_val(x):
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def fake_mode_of(gm: fx.GraphModule):
    from torch._guards import detect_fake_mode
    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])


def call(graph: fx.Graph, target, args, kwargs=None, meta_from=None) -> fx.Node:
    """Insert ``target(*args)`` at the graph's insertion point with a fake ``val`` computed by
    running the op on the arguments' fake values."""
    kwargs = kwargs or {}
    node = graph.call_function(target, tuple(args), kwargs)
    fargs = torch.utils._pytree.tree_map(fake_val, (tuple(args), kwargs))
    mode = None
    for v in torch.utils._pytree.tree_leaves(fargs):
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            mode = v.fake_mode
            break
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fargs[0], **fargs[1])
    if meta_from is not None:
        for k, v in meta_from.meta.items():
            if k.startswith("pockc.") and k not in node.meta:
                node.meta[k] = v
    return node


def getitem(graph, node, i, meta_from=None):
    g = graph.call_function(operator.getitem, (node, i))
    val = node.meta.get("val")
    if val is not None:
        g.meta["val"] = val[i]
    if meta_from is not None:
        g.meta.update({k: v for k, v in meta_from.meta.items() if k.startswith("pockc.")})
    return g


def shape(node) -> tuple:
    return tuple(node.meta["val"].shape)


def reorder(graph: fx.Graph, order: list) -> None:
    """Rearrange ``graph`` so its nodes appear in ``order`` (which must list every node)."""
    assert len(order) == len(graph.nodes)
    prev = order[0]
    for n in order[1:]:
        if prev.next is not n:
            prev.append(n)
        prev = n


def refresh_vals(gm: fx.GraphModule, nodes) -> None:
    """Recompute the fake ``meta['val']`` of ``nodes`` (in graph order) in the graph's fake mode.

    Passes that splice in graphs traced elsewhere (the optimizer update is traced once at a
    placeholder shape and shared) leave nodes whose ``val`` has the wrong shape or comes from
    another fake mode; the memory planner needs exact shapes. Only the given nodes are re-run,
    so data-dependent values elsewhere in the graph (``.item()``) are left as traced."""
    from torch._subclasses.fake_tensor import FakeTensor

    mode = next((n.meta["val"].fake_mode for n in gm.graph.nodes
                 if n.op == "placeholder" and isinstance(n.meta.get("val"), FakeTensor)), None)
    if mode is None:
        return
    todo = set(nodes)

    def fv(a):
        if not isinstance(a, fx.Node):
            return a
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor):
            v = mode.from_tensor(v)
        elif isinstance(v, FakeTensor) and v.fake_mode is not mode:
            with mode:
                v = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=v.device)
        return v

    for n in gm.graph.nodes:
        if n not in todo:
            continue
        if n.op == "get_attr":
            n.meta["val"] = mode.from_tensor(getattr(gm, n.target))
        elif n.op == "call_function":
            args, kwargs = torch.utils._pytree.tree_map(fv, (n.args, n.kwargs))
            with mode:
                n.meta["val"] = n.target(*args, **kwargs)


def same_layout(a, b) -> bool:
    """``a`` and ``b`` are tensors of one shape, strides, dtype and device (one may be written
    into the other's storage element for element)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.stride() == b.stride() and a.device == b.device)
