"""fuse_ce_backward: the cross-entropy backward without its two vocabulary-sized temporaries.

Autograd differentiates ``cross_entropy = nll_loss(log_softmax(logits))`` in two ops:
``g = nll_loss_backward(...)`` materializes a dense [tokens x vocab] tensor that is zero except
one entry per row, then ``_log_softmax_backward_data(g, logp)`` computes
``g - exp(logp) * g.sum(-1)`` into a second [tokens x vocab] tensor. For a causal LM that is two
extra logits-sized buffers alive at once at the top of the backward pass, where the peak is.

Since row ``i`` of ``g`` holds exactly ``-c_i`` at the target column (``c_i = grad / total_weight``
for ``reduction="mean"``, ``grad`` for ``"sum"``, 0 for rows whose target is ``ignore_index``),
the gradient is ``exp(logp) * c_i`` plus ``-c_i`` at the target column. This pass emits exactly
that: ``exp`` (in place over the log-probabilities when nothing reads them afterwards, which
makes the gradient free of any new vocabulary-sized buffer), an in-place row scale, and an in-place
``scatter_add_`` of one value per row. Same operands and operations per element as the unfused pair (``a - b*(-c)`` is
``b*c + (-c)`` in IEEE arithmetic), so the result matches to the last bit up to the exp kernel.

Matched: ``_log_softmax_backward_data(nll_loss_backward(gout, logp, target, None, reduction,
ignore_index, total_weight), logp', dim=1, dtype)`` on 2-D ``logp`` where ``logp'`` aliases the
``_log_softmax`` output and the ``nll_loss_backward`` result has no other user. Class weights are
left alone. Invariant: the graph's outputs are unchanged.

Applied only from ``min_classes`` classes (default 1024, vocabulary-sized): below that the two
buffers are small, and the exp kernel differs from the one inside ``_log_softmax_backward_data``
by an ulp, which sharp small-batch classifiers (tests/test_equivalence.py's MobileNetV2 at batch 2)
amplify into visibly different trajectories; pockc then stays bit-identical to eager there.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import PassResult, call, dce, shape

aten = torch.ops.aten


def _root(node):
    while node.op == "call_function" and node.target in (aten.detach.default, aten.alias.default):
        node = node.args[0]
    return node


def _match(node, min_classes=0):
    if node.op != "call_function" or node.target is not aten._log_softmax_backward_data.default:
        return None
    g, out, dim = node.args[0], node.args[1], node.args[2]
    if not isinstance(g, fx.Node) or g.target is not aten.nll_loss_backward.default or len(g.users) != 1:
        return None
    gout, logp, target, weight, reduction, ignore_index, total_weight = g.args[:7]
    if weight is not None or reduction not in (1, 2) or len(shape(logp)) != 2 or dim % 2 != 1:
        return None
    if shape(logp)[1] < min_classes:
        return None
    if _root(out) is not _root(logp) or _root(logp).target is not aten._log_softmax.default:
        return None
    if len(shape(target)) != 1 or shape(gout) != ():
        return None
    return out, gout, target, reduction, ignore_index, total_weight


def _dead_after(out, node, ignore) -> bool:
    """True when no alias of ``out``'s storage is read at or after ``node`` except by ``ignore``
    (and the alias chain itself), and the storage is an op's result, not a graph input."""
    root = _root(out)
    if root.op != "call_function":
        return False
    pos = {n: i for i, n in enumerate(node.graph.nodes)}
    aliases, stack = {root}, [root]
    while stack:
        a = stack.pop()
        for u in a.users:
            if u.op == "call_function" and u.target in (aten.detach.default, aten.alias.default) and u not in aliases:
                aliases.add(u)
                stack.append(u)
    for a in aliases:
        for u in a.users:
            if u in aliases or u in ignore or u is node:
                continue
            if pos[u] >= pos[node]:
                return False
    return True


def fuse_ce_backward(gm: fx.GraphModule, min_classes: int = 0) -> PassResult:
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        m = _match(node, min_classes)
        if m is None:
            continue
        out, gout, target, reduction, ignore_index, total_weight = m
        dtype = node.meta["val"].dtype
        with graph.inserting_before(node):
            c = call(graph, aten.div.Tensor, (gout, total_weight), meta_from=node) if reduction == 1 else gout
            valid = call(graph, aten.ne.Scalar, (target, ignore_index), meta_from=node)
            zero = call(graph, aten.zeros_like.default, (c,), meta_from=node)
            coef = call(graph, aten.where.self, (valid, c, zero), meta_from=node)          # [N]
            coef = call(graph, aten.unsqueeze.default, (coef, 1), meta_from=node)          # [N, 1]
            if coef.meta["val"].dtype != dtype:
                coef = call(graph, aten._to_copy.default, (coef,), {"dtype": dtype}, meta_from=node)
            safe_t = call(graph, aten.where.ScalarOther, (valid, target, 0), meta_from=node)
            safe_t = call(graph, aten.unsqueeze.default, (safe_t, 1), meta_from=node)      # [N, 1]
            neg = call(graph, aten.neg.default, (coef,), meta_from=node)
            # In place over the log-probabilities when nothing reads them later (the usual case:
            # the loss is computed before the backward), else into one new buffer.
            exp = aten.exp_.default if _dead_after(out, node, {m[0], node.args[0]}) else aten.exp.default
            e = call(graph, exp, (out,), meta_from=node)
            e = call(graph, aten.mul_.Tensor, (e, coef), meta_from=node)
            e = call(graph, aten.scatter_add_.default, (e, 1, safe_t, neg), meta_from=node)
        node.replace_all_uses_with(e)
        graph.erase_node(node)
        changed = True
    if changed:
        dce(gm)
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
