"""patch_stages: run the frozen high-resolution stages of a CNN tile by tile (MCUNetV2's
patch-based inference), exactly, so that only one tile's intermediates are alive at a time.

With the first blocks frozen (``update="last:4+head"``) the step's peak often lies in the forward
pass of those blocks: a 1x1 expand convolution's output and the maps after it at full
resolution. Nothing of a frozen prefix is saved for the backward pass (no gradient flows into
it), so the prefix can run on H-wise tiles of its input: each tile is the input rows the tile's
output rows need (the receptive field's halo), every convolution on a tile pads only at the
true image border, and each tile's output rows are copied into the stage's full output map
(``aten.empty_strided`` + ``aten.slice`` + ``aten.copy_``). The tiled computation is emitted as
plain aten nodes, unrolled over the tiles, so plan_memory sees every storage and a saved program
needs nothing new.

What a stage may hold (anything else ends the stage; a stage that cannot start is refused with
the reason in the report): convolutions (any kernel, stride, padding, dilation, groups; not
transposed), batch norm (eval mode: elementwise; train mode: see below), its getitem 0,
elementwise unary ops (relu, hardtanh = ReLU6, silu, hardswish, clone...), elementwise binary
ops between maps of one shape (the residual add) or with operands constant over H, and the
pointwise-convolution chain of passes/pointwise_conv.py (``permute`` to NHWC, ``view`` to rows,
``mm``/``addmm``, ``as_strided`` back).

Train-mode batch norm normalizes with statistics over the whole map. Per such batch norm the
stage runs one statistics pass before its final pass: the tile pipeline up to that batch norm's
input over a disjoint partition of its rows, each tile's mean and biased variance
(``aten.var_mean``) merged with Chan et al.'s parallel formula (count, mean, M2), then the
running statistics updated as the kernel updates them (momentum; unbiased variance with
n = N*H*W for ``running_var``). The later passes normalize with those statistics
(``aten._native_batch_norm_legit_no_training``). A stage with k train-mode batch norms runs
k statistics passes and the final pass: exact up to the float rounding of the reductions (the
batch statistics differ from the kernel's in the last bits, about 1e-7 relative).

Which stage: the frozen prefix starting at the image input, cut where one map crosses. The cut
is driven by the memory plan: starting at the planned peak, the pass cuts at the first
local minimum of the map size at or after the peak node, plans the tiled graph, and while the
new peak still lies in the untiled rest of the prefix (and each extension lowers the peak by
more than ``min_bytes``) extends the stage to it. ``gm.meta["pockc.patch"]`` records the stage,
its tiles and statistics passes, the planned peak before and after, and refusals with reasons.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import PassResult, call, dce, fake_mode_of, getitem, is_aten, mutated_args, shape
from .plan_memory import plan_memory

aten = torch.ops.aten

# batch norm: op -> index of its training flag (None: eval mode); with their out= overloads
# (passes/inplace_ops.py: batch norm writing into its dying input, the saved statistics into
# aten.empty nodes)
_BN_EVAL = (aten._native_batch_norm_legit_no_training,)
_BN = {}
for _packet in (aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_no_training):
    for _name in ("default", "out"):
        if hasattr(_packet, _name):
            _BN[getattr(_packet, _name)] = None if _packet in _BN_EVAL else 5
_BN_OUT = {op: tuple(a.name for a in op._schema.arguments
                     if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write)
           for op in _BN if op._overloadname == "out"}
_UNARY = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default,
          aten.clone.default, aten.silu.default, aten.silu_.default, aten.sigmoid.default,
          aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default, aten.gelu.default,
          aten.leaky_relu.default, aten.leaky_relu_.default, aten.tanh.default, aten.alias.default,
          aten.add.Scalar, aten.add_.Scalar, aten.mul.Scalar, aten.mul_.Scalar}
_BINARY = {aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.mul_.Tensor, aten.sub.Tensor,
           aten.div.Tensor}
_VIEW = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# passes/pointwise_conv.py: a 1x1 convolution over a large channels-last map as oneDNN's op
_MKLDNN_CONV = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)
_MKLDNN_CONV = _MKLDNN_CONV.default if _MKLDNN_CONV is not None else None
_MAXIMUM_ATTEMPTS = 8
MAP, NHWC, FLAT = "map", "nhwc", "flat"   # H at dim 2 / H at dim 1 / rows N*H*W of a 2-D matrix


class Refuse(Exception):
    pass


def _hdim(layout):
    return 2 if layout == MAP else 1


# -- finding the stage -------------------------------------------------------------------------
def _image_input(gm, layout):
    phs = layout.placeholders(gm.graph)["batch"] if layout is not None else \
        [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph in phs:
        v = ph.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point():
            return ph
    return None


def _trained_closure(gm, layout):
    """Nodes that depend on a trained parameter (their values carry gradient)."""
    if layout is None:
        return set()
    out, todo = set(), list(layout.placeholders(gm.graph)["params"])
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo.extend(n.users)
    return out


def _classify(n, info, X, trained):
    """(class, output layout) of ``n`` as a stage node, or Refuse(reason)."""
    if n in trained:
        raise Refuse("depends on a trained parameter (its forward is saved for the backward)")
    if n.meta.get("pockc.role") != "forward":
        raise Refuse(f"has role {n.meta.get('pockc.role')!r}, not 'forward'")

    def lay(a):
        return MAP if a is X else info[a][1] if a in info else None

    ins = [a for a in n.all_input_nodes if a is X or a in info]
    t = n.target
    if t is operator.getitem:
        p = n.args[0]
        if info.get(p, ("",))[0] != "bn":
            raise Refuse("getitem of a multi-output op other than batch norm")
        if n.args[1] != 0:
            raise Refuse("reads batch norm's saved statistics (a backward input)")
        return "getitem", MAP
    if not is_aten(n):
        raise Refuse(f"{t} is not an aten op")
    if t is aten.convolution.default:
        if n.args[0] not in ins or len(ins) != 1 or lay(n.args[0]) != MAP:
            raise Refuse("convolution whose weight or bias comes from the stage, or over a non-NCHW map")
        if n.args[6] or len(n.args[3]) != 2:
            raise Refuse("transposed or non-2-D convolution")
        return "conv", MAP
    if _MKLDNN_CONV is not None and t is _MKLDNN_CONV:
        x, w = n.args[0], n.args[1]
        if ins != [x] or lay(x) != MAP:
            raise Refuse("oneDNN convolution whose weight or bias comes from the stage")
        if (tuple(shape(w)[2:]) != (1, 1) or list(n.args[3]) != [0, 0] or list(n.args[4]) != [1, 1]
                or list(n.args[5]) != [1, 1] or n.args[7] != "none"):
            raise Refuse("oneDNN convolution other than a plain 1x1 one")
        return "pwconv", MAP
    if t in _BN:
        if len(ins) != 1 or n.args[0] not in ins or lay(n.args[0]) != MAP:
            raise Refuse("batch norm whose parameters come from the stage")
        users = [u for u in n.users]
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            raise Refuse("batch norm whose saved statistics are read (a backward input)")
        if t in _BN_OUT:
            out, *saved = (n.kwargs.get(k) for k in _BN_OUT[t])
            if out is not n.args[0]:
                raise Refuse("batch norm writing into another tensor than its input")
            if any(not isinstance(e, fx.Node) or set(e.users) != {n} for e in saved):
                raise Refuse("batch norm whose saved statistics are read (a backward input)")
        return "bn", "tuple"
    if t in _UNARY:
        if len(ins) != 1 or n.args[0] not in ins or lay(n.args[0]) not in (MAP, NHWC):
            raise Refuse("unary op over a non-map value")
        return "ew", lay(n.args[0])
    if t in _BINARY:
        lays = {lay(a) for a in ins}
        if len(lays) != 1 or lays - {MAP, NHWC}:
            raise Refuse("elementwise op over values of different layouts")
        out = tuple(n.meta["val"].shape)
        for a in ins:
            if tuple(a.meta["val"].shape) != out:
                raise Refuse("elementwise op that broadcasts a map")
        h = _hdim(lays.pop())
        for a in n.args:
            if isinstance(a, fx.Node) and a not in ins:
                v = a.meta.get("val")
                k = v.dim() - (len(out) - h) if isinstance(v, torch.Tensor) else -1
                if k >= 0 and v.shape[k] != 1:
                    raise Refuse("elementwise op with an operand that varies over H")
        return "ew", lay(ins[0])
    if t is aten.permute.default and len(ins) == 1:
        dims = list(n.args[1])
        if lay(n.args[0]) == MAP and dims == [0, 2, 3, 1]:
            return "ew", NHWC
        if lay(n.args[0]) == NHWC and dims == [0, 3, 1, 2]:
            return "ew", MAP
        raise Refuse(f"permute {dims} of a {lay(n.args[0])} value")
    if t in _VIEW and len(ins) == 1:
        src, out = tuple(n.args[0].meta["val"].shape), list(n.args[1])
        if lay(n.args[0]) == NHWC and len(out) == 2 and out == [src[0] * src[1] * src[2], src[3]]:
            return "view", FLAT
        if lay(n.args[0]) == FLAT and len(out) == 4 and out[0] * out[1] * out[2] == src[0]:
            return "view", NHWC
        raise Refuse(f"view to {out} of a {lay(n.args[0])} value")
    if t is aten.mm.default and ins == [n.args[0]] and lay(n.args[0]) == FLAT:
        return "ew", FLAT
    if t is aten.addmm.default and ins == [n.args[1]] and lay(n.args[1]) == FLAT:
        v = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        if v is not None and v.dim() == 2 and v.shape[0] != 1:
            raise Refuse("addmm with a bias that varies over rows")
        return "ew", FLAT
    if t is aten.as_strided.default and len(ins) == 1 and lay(n.args[0]) == FLAT:
        N, C, H, W = n.meta["val"].shape
        off = n.args[3] if len(n.args) > 3 else n.kwargs.get("storage_offset", 0)
        if list(n.args[2]) == [H * W * C, 1, W * C, C] and not off:
            return "as_strided", MAP
        raise Refuse("as_strided other than rows back to a channels-last map")
    raise Refuse(f"{t} is not tileable (whitelist: convolution, batch norm, elementwise ops, "
                 f"the pointwise-convolution chain)")


def find_stage(gm, layout, tiles):
    """``(X, stage, cuts, info, stop)``: the image input, the tileable frozen prefix nodes in
    graph order, the valid cut positions (stage[:k] ends at a single map), node -> (class,
    layout), and why the prefix ends (None at the end of the graph)."""
    X = _image_input(gm, layout)
    if X is None:
        return None, [], [], {}, ("", "the step has no 4-D floating-point image input")
    trained = _trained_closure(gm, layout)
    info, stage, cuts, stop = {}, [], [], None
    members = set()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        ins = [a for a in n.all_input_nodes if a is X or a in members]
        if not ins:
            continue
        try:
            if X in mutated_args(n):
                raise Refuse("writes the image input")
            info[n] = _classify(n, info, X, trained)
        except Refuse as e:
            if any(a in members for a in ins):
                stop = (n.name, f"{n.name} ({n.target}) {e}")
                break
            if stage:      # reads only the image (kept whole): not part of the stage
                continue
            stop = (n.name, f"{n.name} ({n.target}) {e}")
            break
        stage.append(n)
        members.add(n)
        v = n.meta.get("val")
        if info[n][1] == MAP and isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[2] >= tiles:
            if all(u in members for m in stage[:-1] for u in m.users):
                cuts.append(len(stage))
    return X, stage, cuts, info, stop


# -- emitting the tiled stage ------------------------------------------------------------------
def _parts(H, tiles):
    """``tiles`` disjoint row ranges covering [0, H), as equal as possible."""
    b = [H * i // tiles for i in range(tiles + 1)]
    return [(b[i], b[i + 1]) for i in range(tiles) if b[i + 1] > b[i]]


def _conv_geom(n):
    x, w = n.args[0], n.args[1]
    return (shape(x)[2], shape(w)[2], n.args[3][0], n.args[4][0], n.args[5][0])


def _conv_in(n, r):
    """Input rows [lo, hi) that convolution ``n``'s output rows ``r`` read, and the padding rows
    they need above and below (at the true border only)."""
    Hin, k, s, p, d = _conv_geom(n)
    a = r[0] * s - p
    b = (r[1] - 1) * s + d * (k - 1) + 1 - p
    lo, hi = max(a, 0), min(b, Hin)
    return (lo, hi), lo - a, b - hi


def _is_train_bn(n):
    i = _BN.get(n.target)
    return i is not None and bool(n.args[i])


def _bn_args(n):
    """(weight, bias, running_mean, running_var, momentum, eps) of a batch norm node."""
    a = n.args
    if _BN.get(n.target, 0) is None:    # eval mode: (input, weight, bias, mean, var, momentum, eps)
        return a[1], a[2], a[3], a[4], a[5], a[6]
    return a[1], a[2], a[3], a[4], a[6], a[7]


class _Emitter:
    def __init__(self, gm, X, stage, info):
        self.graph, self.X, self.stage, self.info = gm.graph, X, stage, info
        self.index = {n: i for i, n in enumerate(stage)}
        self.stats = {}       # train-mode bn -> (mean, biased var) nodes
        self.new = []         # every node emitted

    def _call(self, target, args, kwargs=None, like=None, tag=None):
        node = call(self.graph, target, args, kwargs, meta_from=like)
        node.meta["pockc.patch_tile"] = tag
        self.new.append(node)
        return node

    def need(self, targets):
        """node -> the rows of its output a tile must compute so that ``targets`` (node -> rows)
        can be computed; the image input included."""
        need = dict(targets)
        for n in reversed(self.stage):
            r = need.get(n)
            if r is None:
                continue
            cls = self.info[n][0]
            for a in n.all_input_nodes:
                if a is not self.X and a not in self.index:
                    continue
                ra = _conv_in(n, r)[0] if cls == "conv" else r
                old = need.get(a)
                if old is not None and old != ra and (a is not self.X and self.info[a][1] == FLAT):
                    raise Refuse(f"{a.name} (rows of a matrix) is read by tiles of different heights")
                need[a] = ra if old is None else (min(old[0], ra[0]), max(old[1], ra[1]))
        return need

    def run(self, need, tag):
        """Emit the stage nodes ``need`` lists on their rows; returns node -> tile value."""
        env = {}

        def get(a, ra):
            if a is self.X:
                if ra == (0, shape(a)[2]):
                    return a
                return self._call(aten.slice.Tensor, (a, 2, ra[0], ra[1]), like=self.stage[0], tag=tag)
            v, rv = env[a], need[a]
            if ra == rv:
                return v
            lay = self.info[a][1]
            if lay == FLAT:
                raise Refuse(f"{a.name} (rows of a matrix) cannot be narrowed")
            return self._call(aten.slice.Tensor, (v, _hdim(lay), ra[0] - rv[0], ra[1] - rv[0]), like=a, tag=tag)

        for n in self.stage:
            r = need.get(n)
            if r is None:
                continue
            cls, lay = self.info[n]
            h = r[1] - r[0]
            if cls == "conv":
                rin, top, bottom = _conv_in(n, r)
                xin = get(n.args[0], rin)
                _, _, s, _, _ = _conv_geom(n)
                pad, drop = list(n.args[4]), 0
                if top >= bottom:
                    pad[0] = top
                elif (bottom - top) % s == 0:
                    pad[0], drop = bottom, (bottom - top) // s
                else:
                    xin = self._call(aten.constant_pad_nd.default, (xin, [0, 0, top, bottom], 0.0), like=n, tag=tag)
                    pad[0] = 0
                args = list(n.args)
                args[0], args[4] = xin, pad
                y = self._call(n.target, tuple(args), n.kwargs, like=n, tag=tag)
                if drop or shape(y)[2] != h:
                    y = self._call(aten.slice.Tensor, (y, 2, drop, drop + h), like=n, tag=tag)
                env[n] = y
            elif cls == "bn":
                xin = get(n.args[0], r)
                w, b, rm, rv, mom, eps = _bn_args(n)
                if _is_train_bn(n):
                    mean, var = self.stats[n]
                else:
                    mean, var = rm, rv
                env[n] = self._call(aten._native_batch_norm_legit_no_training.default,
                                    (xin, w, b, mean, var, mom, eps), like=n, tag=tag)
            elif cls == "getitem":
                g = getitem(self.graph, env[n.args[0]], 0, meta_from=n)
                g.meta["pockc.patch_tile"] = tag
                self.new.append(g)
                env[n] = g
            elif cls == "view":
                xin = get(n.args[0], r)
                v = xin.meta["val"]
                if self.info[n][1] == FLAT:
                    if not v.is_contiguous():
                        xin = self._call(aten.clone.default, (xin,), {"memory_format": torch.contiguous_format},
                                         like=n, tag=tag)
                    size = [v.shape[0] * v.shape[1] * v.shape[2], v.shape[3]]
                else:
                    o = list(n.args[1])
                    size = [o[0], h, o[2], o[3]]
                env[n] = self._call(n.target, (xin, size) + tuple(n.args[2:]), n.kwargs, like=n, tag=tag)
            elif cls == "pwconv":
                xin = get(n.args[0], r)
                if not xin.meta["val"].is_contiguous(memory_format=torch.channels_last):
                    xin = self._call(aten.clone.default, (xin,), {"memory_format": torch.channels_last},
                                     like=n, tag=tag)
                env[n] = self._call(n.target, (xin,) + tuple(n.args[1:]), n.kwargs, like=n, tag=tag)
            elif cls == "as_strided":
                xin = get(n.args[0], r)
                N, C, _, W = n.meta["val"].shape
                env[n] = self._call(aten.as_strided.default, (xin, [N, C, h, W], [h * W * C, 1, W * C, C], 0),
                                    like=n, tag=tag)
            else:    # elementwise, permute, mm: the same op on the tiles
                args = tuple(get(a, r) if isinstance(a, fx.Node) and (a is self.X or a in self.index) else a
                             for a in n.args)
                env[n] = self._call(n.target, args, n.kwargs, like=n, tag=tag)
        return env

    def stats_pass(self, bn, tiles, k):
        """Batch statistics of train-mode ``bn`` over disjoint tiles of its input, merged with
        Chan's formula; then its running statistics updated as the kernel updates them."""
        x = bn.args[0]
        N, _, H, W = shape(x)
        mean = m2 = None
        count = 0
        for t, part in enumerate(_parts(H, tiles)):
            tag = ("stats", k, t)
            need = self.need({x: part})
            env = self.run(need, tag)
            xt = env[x] if x is not self.X else self.run_input(part, tag)
            vm = self._call(aten.var_mean.correction, (xt, [0, 2, 3]), {"correction": 0, "keepdim": False},
                            like=bn, tag=tag)
            var_t, mean_t = (self._getitem(vm, i, bn, tag) for i in (0, 1))
            nt = N * (part[1] - part[0]) * W
            m2_t = self._call(aten.mul.Scalar, (var_t, float(nt)), like=bn, tag=tag)
            if mean is None:
                mean, m2, count = mean_t, m2_t, nt
                continue
            tot = count + nt
            delta = self._call(aten.sub.Tensor, (mean_t, mean), like=bn, tag=tag)
            mean = self._call(aten.add.Tensor, (mean, delta), {"alpha": nt / tot}, like=bn, tag=tag)
            d2 = self._call(aten.mul.Tensor, (delta, delta), like=bn, tag=tag)
            m2 = self._call(aten.add.Tensor, (m2, m2_t), like=bn, tag=tag)
            m2 = self._call(aten.add.Tensor, (m2, d2), {"alpha": count * nt / tot}, like=bn, tag=tag)
            count = tot
        tag = ("stats", k, "merge")
        var = self._call(aten.div.Scalar, (m2, float(count)), like=bn, tag=tag)
        _, _, rm, rv, mom, _ = _bn_args(bn)
        if rm is not None:
            self._call(aten.mul_.Scalar, (rm, 1.0 - mom), like=bn, tag=tag)
            self._call(aten.add_.Tensor, (rm, mean), {"alpha": mom}, like=bn, tag=tag)
        if rv is not None:
            unbiased = self._call(aten.div.Scalar, (m2, float(max(count - 1, 1))), like=bn, tag=tag)
            self._call(aten.mul_.Scalar, (rv, 1.0 - mom), like=bn, tag=tag)
            self._call(aten.add_.Tensor, (rv, unbiased), {"alpha": mom}, like=bn, tag=tag)
        self.stats[bn] = (mean, var)

    def run_input(self, part, tag):
        return self._call(aten.slice.Tensor, (self.X, 2, part[0], part[1]), like=self.stage[0], tag=tag)

    def _getitem(self, node, i, like, tag):
        g = getitem(self.graph, node, i, meta_from=like)
        g.meta["pockc.patch_tile"] = tag
        self.new.append(g)
        return g


def tile_stage(gm, X, stage, info, tiles):
    """Replace ``stage`` (ending at a single map, its last node) by its tiled computation in
    place. Returns the number of statistics passes."""
    graph = gm.graph
    cut = stage[-1]
    members = set(stage)
    order = {n: i for i, n in enumerate(graph.nodes)}
    bufs = {a for n in stage if info[n][0] == "bn" for a in _bn_args(n)[2:4] if isinstance(a, fx.Node)}
    for n in graph.nodes:
        if order[stage[0]] <= order[n] <= order[cut] and n not in members and bufs & set(n.all_input_nodes):
            raise Refuse(f"{n.name} reads a running statistic that the stage updates")
    em = _Emitter(gm, X, stage, info)
    bns = [n for n in stage if info[n][0] == "bn" and _is_train_bn(n)]
    val = cut.meta["val"]
    with graph.inserting_before(cut):
        for k, bn in enumerate(bns):
            em.stats_pass(bn, tiles, k)
        out = graph.call_function(aten.empty_strided.default, (list(val.shape), list(val.stride())),
                                  {"dtype": val.dtype, "device": val.device})
        with fake_mode_of(gm):
            out.meta["val"] = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype,
                                                  device=val.device)
        out.meta.update({k: v for k, v in cut.meta.items() if k.startswith("pockc.")})
        out.meta["pockc.patch_tile"] = ("output",)
        em.new.append(out)
        for t, part in enumerate(_parts(val.shape[2], tiles)):
            tag = ("final", t)
            env = em.run(em.need({cut: part}), tag)
            dst = em._call(aten.slice.Tensor, (out, 2, part[0], part[1]), like=cut, tag=tag)
            em._call(aten.copy_.default, (dst, env[cut]), like=cut, tag=tag)
    cut.replace_all_uses_with(out)
    for n in reversed(stage):
        graph.erase_node(n)
    dce(gm)
    graph.lint()
    gm.recompile()
    return len(bns)


# -- the pass ----------------------------------------------------------------------------------
def _copy(gm):
    g = fx.Graph()
    env = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    new = fx.GraphModule(gm, g)
    new.meta = dict(gm.meta)
    return new, env


def _local_minima(stage, cuts, pos, order):
    """Stage lengths to try: the cuts at or after graph position ``pos`` where the map crossing
    the cut is smaller than at the next cut (block outputs, typically), in graph order."""
    cand = [k for k in cuts if order[stage[k - 1].name] >= pos]

    def nb(k):
        v = stage[k - 1].meta["val"]
        return v.numel() * v.element_size()
    return [a for a, b in zip(cand, cand[1:] + [None]) if b is None or nb(a) < nb(b)]


def patch_stages(gm: fx.GraphModule, layout, tiles: int = 4, min_bytes: int = 0, *, cut: str | None = None
                 ) -> PassResult:
    """Tile the frozen high-resolution prefix of ``gm`` (see the module docstring) into
    ``tiles`` H-wise tiles where that lowers the planned peak by more than ``min_bytes``.
    ``cut``: the name of the node to end the stage at, bypassing the peak-driven choice (it must
    be a valid cut). Records ``gm.meta["pockc.patch"]``."""
    if not isinstance(tiles, int) or tiles < 2:
        raise ValueError(f"tiles must be an int >= 2, got {tiles!r}")
    base = plan_memory(gm, layout)
    report = {"tiles": tiles, "stage": None, "stats_passes": 0, "peak_before": base.peak_bytes,
              "peak_after": base.peak_bytes, "refused": [], "attempts": []}
    gm.meta["pockc.patch"] = report
    X, stage, cuts, info, stop = find_stage(gm, layout, tiles)
    if stop is not None:
        report["stop"] = stop[1]
    if not cuts:
        report["refused"].append({"node": stop[0] if stop else "", "reason": "no tileable stage: " +
                                  (stop[1] if stop else "the image input feeds no single-map frozen prefix")})
        return PassResult(gm, False)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    names = [n.name for n in stage]

    def attempt(k):
        g, env = _copy(gm)
        st = [env[n] for n in stage]
        inf = {env[n]: v for n, v in info.items() if n in env}
        passes = tile_stage(g, env[X], st[:k], inf, tiles)
        return g, passes, plan_memory(g, layout)

    if cut is not None:
        ks = [k for k in cuts if names[k - 1] == cut]
        if not ks:
            raise ValueError(f"{cut!r} is not a valid cut of the tileable prefix "
                             f"(valid: {[names[k - 1] for k in cuts]})")
        choice = [ks[0]]
    else:
        choice = None
    best = None      # (peak, k, passes)
    pos = order.get(base.peak_node, -1)
    if choice is None and pos < order[stage[0].name]:
        report["refused"].append({"node": base.peak_node, "reason": f"the planned peak (at {base.peak_node}) "
                                  "lies before the tileable frozen prefix"})
        return PassResult(gm, False)
    todo = choice if choice is not None else _local_minima(stage, cuts, pos, order)
    if not todo:
        report["refused"].append({"node": base.peak_node, "reason": f"the planned peak (at {base.peak_node}) "
                                  "lies outside the tileable frozen prefix"
                                  + (f", which ends before {stop[0]}" if stop else "")})
        return PassResult(gm, False)
    worse = 0
    for k in todo[:_MAXIMUM_ATTEMPTS]:
        try:
            _, passes, mem = attempt(k)
        except Refuse as e:
            report["refused"].append({"node": names[k - 1], "reason": str(e)})
            break
        report["attempts"].append({"cut": names[k - 1], "peak": mem.peak_bytes, "peak_node": mem.peak_node})
        if best is None or mem.peak_bytes < best[0]:
            best, worse = (mem.peak_bytes, k, passes), 0
        else:
            worse += 1
        rest = set(names[k:])
        tiled = mem.peak_node not in order            # the peak lies in the tiled stage itself
        if worse >= 2 or not (tiled or mem.peak_node in rest):
            break        # the peak lies past the prefix: a longer stage cannot lower it
    if best is not None and choice is None and best[0] >= base.peak_bytes - min_bytes:
        report["refused"].append({"node": names[best[1] - 1], "reason": f"tiling up to {names[best[1] - 1]} gives "
                                  f"a planned peak of {best[0]:,} B, not more than {min_bytes:,} B below "
                                  f"{base.peak_bytes:,} B"})
        best = None
    if best is None:
        return PassResult(gm, False)
    _, k, passes = best
    tile_stage(gm, X, stage[:k], info, tiles)   # the chosen stage, in place
    after = plan_memory(gm, layout)
    report.update(stage={"start": names[0], "end": names[k - 1], "nodes": k, "ops": names[:k]},
                  stats_passes=passes, peak_after=after.peak_bytes, peak_node_after=after.peak_node)
    return PassResult(gm, True)
