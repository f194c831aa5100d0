"""prune_backward: compute only the gradients the UpdatePlan needs.

The joint trace already omits gradients of frozen parameters (autograd only walks paths that
reach a tensor requiring grad). This pass does what autograd cannot:

1. **Channel-sparse gradients.** A channel-sparse parameter's gradient arrives as a row selection
   (``slice`` / ``index_select`` on dim 0) of the full gradient. The selection is pushed up through
   views, ``mm``, reductions, additions and ``convolution_backward`` until it reaches the op that
   computes the gradient, so that op computes only the selected rows and its cost is proportional
   to the ratio. The full-size gradient becomes dead.
2. **Output masks.** Multi-output backward ops (convolution / batch-norm / layer-norm backward)
   stop computing outputs nobody uses.
3. **Dead code** is removed (mutating and random ops are kept).

Invariant: the values of the graph's outputs are unchanged.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import OUTPUT_MASK_ARG, PassResult, call, dce, getitem, shape

aten = torch.ops.aten

_VIEWLIKE = (aten.detach.default, aten.alias.default)


def _selection(node):
    """(dim, sel) if ``node`` selects rows of its input, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.slice.Tensor:
        args = list(node.args) + [None] * (5 - len(node.args))
        step = args[4] if args[4] is not None else 1
        if step != 1:
            return None
        dim = args[1] if args[1] is not None else 0
        n = shape(node.args[0])[dim]
        start = args[2] if args[2] is not None else 0
        stop = min(args[3] if args[3] is not None else n, n)
        return dim % len(shape(node.args[0])), ("slice", start, stop)
    if node.target is aten.index_select.default:
        return node.args[1] % len(shape(node.args[0])), ("index", node.args[2])
    return None


class _Pusher:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.conv_cache = {}
        self.pushed = 0

    def select(self, x, dim, sel):
        if sel[0] == "slice":
            return call(self.graph, aten.slice.Tensor, (x, dim, sel[1], sel[2]), meta_from=x)
        return call(self.graph, aten.index_select.default, (x, dim, sel[1]), meta_from=x)

    def push(self, x, dim, sel):
        """A node equal to ``select(x, dim, sel)`` that computes as little as possible."""
        t = x.target if x.op == "call_function" else None
        single = len(x.users) <= 1
        nd = len(shape(x))
        dim = dim % nd
        self.pushed += 1
        if t is aten.t.default:
            return call(self.graph, t, (self.push(x.args[0], 1 - dim if nd == 2 else dim, sel),), meta_from=x)
        if t is aten.transpose.int:
            d0, d1 = (d % nd for d in x.args[1:3])
            src = d1 if dim == d0 else d0 if dim == d1 else dim
            return call(self.graph, t, (self.push(x.args[0], src, sel), d0, d1), meta_from=x)
        if t is aten.permute.default:
            dims = [d % nd for d in x.args[1]]
            return call(self.graph, t, (self.push(x.args[0], dims[dim], sel), dims), meta_from=x)
        if t in _VIEWLIKE:
            return self.push(x.args[0], dim, sel)
        if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            src = _unit_dim_map(shape(x.args[0]), shape(x), dim)
            if src is not None:
                inner = self.push(x.args[0], src, sel)
                new_shape = list(shape(x))
                new_shape[dim] = shape(inner)[src]
                return call(self.graph, aten.view.default, (inner, new_shape), meta_from=x)
        if single and t is aten.mm.default:
            a, b = x.args
            if dim == 0:
                return call(self.graph, t, (self.push(a, 0, sel), b), meta_from=x)
            return call(self.graph, t, (a, self.push(b, 1, sel)), meta_from=x)
        if single and t is aten.sum.dim_IntList:
            src_nd = len(shape(x.args[0]))
            dims = sorted(d % src_nd for d in x.args[1]) if x.args[1] else list(range(src_nd))
            keep = x.args[2] if len(x.args) > 2 else x.kwargs.get("keepdim", False)
            kept = list(range(src_nd)) if keep else [d for d in range(src_nd) if d not in dims]
            src = kept[dim]
            if src not in dims:
                return call(self.graph, t, (self.push(x.args[0], src, sel),) + tuple(x.args[1:]),
                            dict(x.kwargs), meta_from=x)
        if single and t in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor):
            a, b = x.args[:2]
            ok = all(not isinstance(v, fx.Node) or shape(v) == shape(x) for v in (a, b))
            if ok:
                na = self.push(a, dim, sel) if isinstance(a, fx.Node) else a
                nb = self.push(b, dim, sel) if isinstance(b, fx.Node) else b
                return call(self.graph, t, (na, nb) + tuple(x.args[2:]), dict(x.kwargs), meta_from=x)
        if single and t is aten.clone.default:
            return self.push(x.args[0], dim, sel)
        if single and t is operator.getitem and dim == 0 and x.args[1] in (1, 2):
            src = x.args[0]
            if src.op == "call_function" and src.target is aten.convolution_backward.default:
                out = self._conv(src, x.args[1], sel)
                if out is not None:
                    return out
        self.pushed -= 1
        return self.select(x, dim, sel)

    def _conv(self, cb, which, sel):
        (g, inp, w, bias_sizes, stride, padding, dilation, transposed, out_pad, groups, mask) = cb.args
        if transposed:
            return None
        cout = shape(w)[0]
        cin = shape(inp)[1]
        if groups == 1:
            g2, inp2, groups2 = self.select(g, 1, sel), inp, 1
        else:
            per_out, per_in = cout // groups, cin // groups
            if sel[0] != "slice" or sel[1] % per_out or sel[2] % per_out:
                return None
            lo, hi = sel[1] // per_out, sel[2] // per_out
            g2 = self.select(g, 1, sel)
            inp2 = self.select(inp, 1, ("slice", lo * per_in, hi * per_in))
            groups2 = hi - lo
        key = (cb, sel if sel[0] == "slice" else ("index", id(sel[1])))
        node = self.conv_cache.get(key)
        if node is None:
            w2 = self.select(w, 0, sel)
            rows = shape(w2)[0]
            node = call(self.graph, aten.convolution_backward.default,
                        (g2, inp2, w2, [rows] if bias_sizes else None, stride, padding, dilation,
                         transposed, out_pad, groups2, [False, which == 1, which == 2]), meta_from=cb)
            self.conv_cache[key] = node
        else:
            m = list(node.args[10])
            m[which] = True
            if node.args[3] is None and which == 2:
                node.update_arg(3, [shape(node.args[2])[0]])
            node.update_arg(10, m)
            _refresh_val(node)
        return getitem(self.graph, node, which, meta_from=cb)


def _refresh_val(node):
    from .fx_utils import fake_val
    mode = node.meta["val"][1].fake_mode if node.meta["val"][1] is not None else None
    if mode is None:
        for v in node.meta["val"]:
            if v is not None:
                mode = v.fake_mode
    with mode:
        args = torch.utils._pytree.tree_map(fake_val, node.args)
        node.meta["val"] = node.target(*args)


def _unit_dim_map(src_shape, dst_shape, dst_dim):
    """If a view only inserts/removes size-1 dims, the source dim that ``dst_dim`` comes from."""
    src_big = [i for i, s in enumerate(src_shape) if s != 1]
    dst_big = [i for i, s in enumerate(dst_shape) if s != 1]
    if [src_shape[i] for i in src_big] != [dst_shape[i] for i in dst_big]:
        return None
    if dst_shape[dst_dim] == 1 or dst_dim not in dst_big:
        return None
    return src_big[dst_big.index(dst_dim)]


def prune_output_masks(gm: fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        pos = OUTPUT_MASK_ARG.get(node.target) if node.op == "call_function" else None
        if pos is None:
            continue
        used = {u.args[1] for u in node.users if u.target is operator.getitem}
        mask = list(node.args[pos])
        new = [bool(m) and i in used for i, m in enumerate(mask)]
        if new != mask:
            node.update_arg(pos, new)
            changed = True
            if not any(new):
                for u in list(node.users):
                    gm.graph.erase_node(u)
                gm.graph.erase_node(node)
    return changed


def prune_backward(gm: fx.GraphModule, layout) -> PassResult:
    """Push channel selections into gradient producers, drop unused backward outputs, DCE."""
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    outs = list(out.args[0])
    pusher = _Pusher(gm)
    for i in range(1, len(outs)):
        g = outs[i]
        found = _selection(g)
        if found is None:
            continue
        dim, sel = found
        with graph.inserting_before(g):
            new = pusher.push(g.args[0], dim, sel)
        new.meta["pockc.role"] = "backward"
        outs[i] = new
    out.args = (tuple(outs),)
    # Everything the pusher added is backward work.
    for n in graph.nodes:
        n.meta.setdefault("pockc.role", "backward")
    changed = dce(gm)
    changed |= prune_output_masks(gm)
    changed |= dce(gm)
    graph.lint()
    gm.recompile()
    return PassResult(gm, changed or pusher.pushed > 0)
