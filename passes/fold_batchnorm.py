"""fold_batchnorm: fold frozen eval-mode BatchNorm into the convolution before it.

A batch norm in eval mode with a frozen affine is a per-channel affine map of its input,
``y = conv(x, W) * s + t`` with ``s = gamma / sqrt(running_var + eps)`` and
``t = beta - running_mean * s``; it equals ``conv(x, W * s) + (b * s + t)``. The pass rewrites

    c = convolution(x, W, b);  y = native_batch_norm(c, gamma, beta, mean, var, False, ...)[0]

into ``y = convolution(x, W * s, b * s + t)``, so one pass over the activation (and the
activation ``c`` itself) disappears. ``s`` and the folded weight are computed *in the graph*
from the current tensors on every step (a few ops over weights, not activations), so the user's
module stays the source of truth: changing a frozen weight or a running statistic between steps
takes effect, as in eager PyTorch.

Validity:

* the batch norm runs in eval mode (``training=False``): it neither uses batch statistics nor
  updates its buffers; a train-mode batch norm normalizes with batch statistics and is left alone;
* its affine parameters (``gamma``, ``beta``) are frozen -- a trained affine needs its own
  gradient, which the folded form does not expose;
* the convolution's weight may be trained or frozen: gradients still flow through the original
  ``W``. When the backward pass goes through the batch norm, its backward
  (``native_batch_norm_backward(..., train=False, output_mask=[True, False, False])``) is exactly
  ``grad * s`` per channel; the pass replaces it with that product, which ``convolution_backward``
  then consumes with the original ``x`` and ``W`` (so ``dW`` and ``dx`` are unchanged);
* the convolution output is used by nothing but the batch norm (and its backward), else it
  must be materialized anyway and folding would only add work.

Linear + BatchNorm1d is not folded yet (rare in the models pockc targets).
Invariant (tests/test_fold_batchnorm.py): no eval-mode batch norm with a frozen affine is left
after a convolution, and one compiled step matches eager PyTorch within float tolerance.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import PassResult, call
from .inplace_ops import BN_OUT_OPS

aten = torch.ops.aten

_BN_EVAL = {aten._native_batch_norm_legit_no_training.default} if hasattr(
    aten, "_native_batch_norm_legit_no_training") else set()


def _eval_bn_args(node):
    """(input, weight, bias, running_mean, running_var, eps) of an eval-mode batch norm, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.native_batch_norm.default and node.args[5] is False:
        x, w, b, rm, rv, _, _, eps = node.args
        return x, w, b, rm, rv, eps
    if node.target in _BN_EVAL:
        x, w, b, rm, rv, _, eps = node.args
        return x, w, b, rm, rv, eps
    return None


def _getitems(node):
    return {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem}


def _fold_one(graph, bn, trained, frozen_ok) -> bool:
    x, w, b, rm, rv, eps = _eval_bn_args(bn)
    conv = x
    if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target is aten.convolution.default):
        return False
    if conv.args[6]:  # transposed: the weight's output channels are on dim 1
        return False
    if any(isinstance(t, fx.Node) and t in trained for t in (w, b)):
        return False  # a trained affine needs its own gradient
    if not all(isinstance(t, fx.Node) and t in frozen_ok for t in (rm, rv)):
        return False
    items = _getitems(bn)
    if len(items) != len(bn.users):
        return False
    backwards = []
    for i, g in items.items():
        if i == 0:
            continue
        for u in g.users:
            if u.target is not aten.native_batch_norm_backward.default or u.args[1] is not conv:
                return False
    for u in conv.users:
        if u is bn:
            continue
        if (u.target is aten.native_batch_norm_backward.default and u.args[1] is conv and u.args[7] is False
                and not any(u.args[9][1:]) and u.args[3] is rm and u.args[4] is rv and u.args[2] is w
                and all(gi.args[1] == 0 for gi in u.users)):
            backwards.append(u)
            continue
        return False  # the conv output is needed elsewhere
    wv = conv.args[1].meta["val"]
    view_shape = [-1] + [1] * (wv.dim() - 1)
    with graph.inserting_before(conv):
        inv = call(graph, aten.rsqrt.default, (call(graph, aten.add.Tensor, (rv, eps), meta_from=conv),),
                   meta_from=conv)
        scale = call(graph, aten.mul.Tensor, (inv, w), meta_from=conv) if w is not None else inv
        weight = call(graph, aten.mul.Tensor, (conv.args[1], call(graph, aten.view.default, (scale, view_shape),
                                                                   meta_from=conv)), meta_from=conv)
        shift = call(graph, aten.mul.Tensor, (rm, scale), meta_from=conv)
        bias = call(graph, aten.sub.Tensor, (b, shift), meta_from=conv) if b is not None else \
            call(graph, aten.neg.default, (shift,), meta_from=conv)
        if conv.args[2] is not None:
            bias = call(graph, aten.add.Tensor, (bias, call(graph, aten.mul.Tensor, (conv.args[2], scale),
                                                            meta_from=conv)), meta_from=conv)
        folded = call(graph, aten.convolution.default, (conv.args[0], weight, bias, *conv.args[3:]), meta_from=conv)
    if 0 in items:
        items[0].replace_all_uses_with(folded)
    chan_shape = [-1] + [1] * (conv.meta["val"].dim() - 2)
    for u in backwards:
        with graph.inserting_before(u):
            s = call(graph, aten.view.default, (scale, chan_shape), meta_from=u)
            grad = call(graph, aten.mul.Tensor, (u.args[0], s), meta_from=u)
        for gi in list(u.users):
            gi.replace_all_uses_with(grad)
            graph.erase_node(gi)
        graph.erase_node(u)
    for g in list(bn.users):
        graph.erase_node(g)
    graph.erase_node(bn)
    graph.erase_node(conv)
    return True


def fold_batchnorm(gm: fx.GraphModule, layout) -> PassResult:
    graph = gm.graph
    groups = layout.placeholders(graph)
    trained = set(groups["params"])
    frozen_ok = set(groups["frozen"] + groups["buffers"])  # frozen parameters and buffers
    changed = False
    for node in list(graph.nodes):
        if node.graph is graph and _eval_bn_args(node) is not None:
            changed |= _fold_one(graph, node, trained, frozen_ok)
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def count_batchnorms(gm: fx.GraphModule, eval_only=True) -> int:
    """Number of (eval-mode, by default) batch-norm ops left in ``gm``."""
    return sum(1 for n in gm.graph.nodes if (_eval_bn_args(n) is not None if eval_only else
                                             n.target in (aten.native_batch_norm.default, *_BN_EVAL, *BN_OUT_OPS)))  # inplace_ops' forms
