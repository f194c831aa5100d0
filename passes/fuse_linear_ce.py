"""fuse_linear_ce: the output layer and its cross-entropy in chunks of tokens, without the logits.

A causal LM's loss is ``cross_entropy(h @ W.T, target)`` over a vocabulary-sized output: for
Llama's 32000 tokens and 2 x 256 tokens that is a [512 x 32000] logits tensor (62.5 MiB in
float32), its log-probabilities and its gradient, the largest tensors of the whole step. This pass
rewrites the joint graph so none of them exists: for each chunk of ``chunk_rows`` tokens the
forward computes the chunk's logits, their log-sum-exp, the chunk's loss and the gradient of the
loss with respect to the chunk's hidden state (and to the head's weight and bias when they are
trained), then frees the chunk. A mean's ``1 / total_weight`` is known in the forward (it counts
the targets that are not ``ignore_index``) and is applied where the unfused backward applies it,
before the casts and matmuls; the backward only scales the gradients by the loss's incoming
gradient ``gout`` (1 for a plain loss): the cross-entropy gradient is linear in it. This is the technique of Liger Kernel's fused linear cross-entropy and
torchtune's chunked loss, written as ordinary aten ops (slices, mm, amax, exp_, gather,
scatter_add_, cat) so the memory planner sees every buffer, and it runs on torch 2.11 too.

Per chunk of rows ``s:e``:  ``z = h[s:e] @ W.T (+ b)`` (in the head's dtype, then cast to the
loss's dtype as the unfused graph casts the logits: Hugging Face upcasts them to float32),
``e = exp(z - max(z))`` in place, ``lse = log(sum(e)) + max(z)``,
``loss += sum(valid * (lse - z[target]))``, ``p = e * (w / sum(e))`` in place (the softmax times
``w = valid / total_weight``, ``valid`` for a sum) and ``p[target] -= w``, as the unfused
backward scales; ``G_h[s:e] = p @ W`` and ``G_W += p.T @ h[s:e]``,
``G_b += p.sum(0)`` when used. The chunk holds one [chunk_rows x vocab] buffer (two while a
bfloat16 head's output is cast to float32).

Matched, after prune_backward: ``M = mm(h, t(W))`` or ``addmm(b, h, t(W))`` on 2-D ``h``,
followed by reshapes that keep the vocabulary as the last dimension and the row order (view,
_unsafe_view, reshape, clone, a dtype-only _to_copy) into ``_log_softmax(x, 1)`` and
``nll_loss_forward(logp, target, None, mean|sum, ignore_index)``, and the backward
``_log_softmax_backward_data(nll_loss_backward(gout, logp, ...), logp)`` whose result reaches,
through the inverse reshapes, only ``mm(g, W)`` (the hidden state's gradient), ``mm(t(g), h)`` /
``mm(t(h), g)`` (the weight's) and ``sum(g, [0])`` (the bias's). That covers Hugging Face's
``model(input_ids, labels=labels).loss`` (labels shifted, not logits; ``ignore_index=-100``;
``reduction="sum"`` divided by ``num_items_in_batch``) and a hand-written
``F.cross_entropy(logits.view(-1, V), y.view(-1))``. Anything else -- the logits read by another
op (an accuracy), class weights, label smoothing, a LoRA adapter on the head, logits sliced
before the loss -- is left alone; passes/fuse_ce_backward.py then still removes the backward's
dense temporaries. Invariant: the graph's outputs are unchanged in value (to rounding: the
log-sum-exp kernel, the weight's gradient summed chunk by chunk, and ``gout`` applied after the
matmuls rather than before).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import PassResult, call, dce, shape

aten = torch.ops.aten

# float32 logits of one chunk: 16 MiB, 131 tokens of a 32000 vocabulary. On one CPU core a
# [rows x 512] @ [512 x 32000] fp32 matmul and its input gradient ran at 54-67 and 82 GFLOP/s
# with 65 rows, 73-82 and 88-90 with 128, 87 and 94 with 256 (one run each, noisy): smaller
# chunks cost time, larger ones memory.
DEFAULT_CHUNK_BYTES = 16 << 20

_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
             aten.alias.default, aten.detach.default, aten._to_copy.default}


def default_chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so one chunk's float32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab))


def _row_preserving(node, vocab) -> bool:
    """A reshape (or dtype cast, clone) that keeps ``vocab`` as the last dimension: the rows, in
    order, are the same."""
    if node.op != "call_function" or node.target not in _RESHAPES:
        return False
    if node.target is aten._to_copy.default:
        src = node.args[0].meta.get("val")
        extra = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        if (extra.get("layout", torch.strided) is not torch.strided or src is None
                or extra.get("device", src.device) != src.device or set(extra) - {"layout", "device"}):
            return False
    if node.target is aten.clone.default and node.kwargs.get("memory_format") not in (None, torch.contiguous_format):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() >= 1 and val.shape[-1] == vocab


def _transposes_to(node, target) -> int | None:
    """How many transposes (t, permute [1, 0]) lead from ``target`` to ``node``, or None."""
    n = 0
    while node is not target:
        if node.op != "call_function":
            return None
        if node.target is aten.t.default or (node.target is aten.permute.default and list(node.args[1]) == [1, 0]):
            n += 1
        elif node.target not in (aten.alias.default, aten.detach.default):
            return None
        node = node.args[0]
    return n


def _is(node, base, transposed: bool) -> bool:
    """``node`` is ``base`` (``transposed``: its transpose) through t / permute / aliases."""
    n = _transposes_to(node, base)
    return n is not None and n % 2 == int(transposed)


def _forward_match(logsm, min_classes):
    """``(M, h, Wt, W, b, cast_dtype)`` for the head producing ``logsm``'s input, or None."""
    x, dim, half = logsm.args[:3]
    if half or len(shape(x)) != 2 or dim % 2 != 1:
        return None
    n_rows, vocab = shape(x)
    if vocab < min_classes:
        return None
    node, chain = x, []
    while _row_preserving(node, vocab):
        chain.append(node)
        node = node.args[0]
    m = node
    if m.op != "call_function" or m.target not in (aten.mm.default, aten.addmm.default):
        return None
    if any(len(c.users) != 1 for c in chain + [m]) and chain:
        return None
    if not chain and len(m.users) != 1:
        return None
    b, h, wt = (m.args[0], m.args[1], m.args[2]) if m.target is aten.addmm.default else (None, m.args[0], m.args[1])
    if m.kwargs or len(m.args) > (3 if b is not None else 2):   # addmm's beta / alpha
        return None
    if b is not None and shape(b) != (vocab,):
        return None
    if shape(h)[0] != n_rows or len(shape(h)) != 2 or shape(wt) != (shape(h)[1], vocab):
        return None
    w = wt
    while w.op == "call_function" and w.target in (aten.t.default, aten.permute.default, aten.alias.default,
                                                   aten.detach.default):
        w = w.args[0]
    if not _is(wt, w, True) or shape(w) != (vocab, shape(h)[1]):
        return None
    cast = x.meta["val"].dtype
    return m, h, wt, w, b, cast


def _backward_leaves(lb, vocab, h, w):
    """The consumers of the logits' gradient ``lb`` through reshapes: a dict kind -> [nodes] with
    kinds ``grad_h`` (mm(g, W)), ``grad_w`` (mm(t(g), h): [V, D]), ``grad_wt`` (mm(t(h), g):
    [D, V]) and ``grad_b`` (sum(g, [0])), or None when anything else reads it."""
    leaves = {"grad_h": [], "grad_w": [], "grad_wt": [], "grad_b": []}
    stack = [(lb, False)]
    seen = set()
    while stack:
        node, transposed = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for u in node.users:
            if not transposed and _row_preserving(u, vocab):
                stack.append((u, False))
            elif not transposed and u.target is aten.t.default and len(shape(u)) == 2:
                stack.append((u, True))
            elif u.op == "call_function" and u.target is aten.mm.default:
                a, bb = u.args[0], u.args[1]
                if not transposed and a is node and len(shape(node)) == 2 and _is(bb, w, False):
                    leaves["grad_h"].append(u)
                elif transposed and a is node and _is(bb, h, False):
                    leaves["grad_w"].append(u)
                elif not transposed and bb is node and len(shape(node)) == 2 and _is(a, h, True):
                    leaves["grad_wt"].append(u)
                else:
                    return None
            elif (not transposed and u.target is aten.sum.dim_IntList and len(shape(node)) == 2
                  and list(u.args[1]) == [0] and not u.kwargs):
                leaves["grad_b"].append(u)
            else:
                return None
    return leaves


def _match(logsm, min_classes):
    fwd = _forward_match(logsm, min_classes)
    if fwd is None:
        return None
    m, h, wt, w, b, cast = fwd
    vocab = shape(logsm)[1]
    nll = nb = lb = None
    for u in logsm.users:
        if u.target is aten.nll_loss_forward.default and nll is None:
            nll = u
        elif u.target is aten.nll_loss_backward.default and nb is None:
            nb = u
        elif u.target in (aten.detach.default, aten.alias.default):
            continue
        else:
            return None
    if nll is None or nb is None or len(nb.users) != 1:
        return None
    target, weight, reduction, ignore_index = nll.args[1:5]
    if weight is not None or reduction not in (1, 2) or len(shape(target)) != 1:
        return None
    if any(u.op != "call_function" or u.target is not operator.getitem for u in nll.users):
        return None
    gout, logp2, target2, weight2, red2, ii2, total_weight = nb.args[:7]
    if logp2 is not logsm or target2 is not target or weight2 is not None or (red2, ii2) != (reduction, ignore_index):
        return None
    if shape(gout) != () or total_weight.op != "call_function" or total_weight.target is not operator.getitem \
            or total_weight.args[0] is not nll:
        return None
    lb = next(iter(nb.users))
    if lb.target is not aten._log_softmax_backward_data.default or lb.args[0] is not nb:
        return None
    out = lb.args[1]
    while out is not logsm:
        if out.op != "call_function" or out.target not in (aten.detach.default, aten.alias.default):
            return None
        out = out.args[0]
    # every alias of logp is read only by the loss pair and the backward
    aliases, stack = {logsm}, [logsm]
    while stack:
        for u in stack.pop().users:
            if u.target in (aten.detach.default, aten.alias.default):
                aliases.add(u)
                stack.append(u)
            elif u not in (nll, nb, lb):
                return None
    leaves = _backward_leaves(lb, vocab, h, w)
    if leaves is None or not any(leaves.values()):
        return None
    return dict(m=m, h=h, wt=wt, w=w, b=b, cast=cast, nll=nll, nb=nb, lb=lb, gout=gout, target=target,
                reduction=reduction, ignore_index=ignore_index, leaves=leaves, vocab=vocab)


def _emit(graph, mt, chunk_rows):
    """The chunked forward, inserted before the loss; returns the replacement nodes."""
    m, h, wt, w, b, cast = mt["m"], mt["h"], mt["wt"], mt["w"], mt["b"], mt["cast"]
    leaves, target = mt["leaves"], mt["target"]
    n_rows = shape(h)[0]
    head_dtype = m.meta["val"].dtype
    need_h, need_w, need_b = bool(leaves["grad_h"]), bool(leaves["grad_w"] or leaves["grad_wt"]), bool(leaves["grad_b"])
    acc = torch.float32 if head_dtype in (torch.float16, torch.bfloat16) else head_dtype
    c = lambda *a, **k: call(graph, *a, meta_from=m, **k)  # noqa: E731
    valid = c(aten.ne.Scalar, (target, mt["ignore_index"]))
    safe_t = c(aten.where.ScalarOther, (valid, target, 0))
    count = c(aten._to_copy.default, (c(aten.sum.default, (valid,)),), {"dtype": cast})
    valid_f = c(aten.unsqueeze.default, (c(aten._to_copy.default, (valid,), {"dtype": cast}), 1))   # [N, 1]
    # per-row weight of the gradient: 1/total_weight for a mean (known here, from the targets),
    # as the unfused backward scales before its casts and matmuls; the backward multiplies by gout
    weight = c(aten.div.Tensor, (valid_f, count)) if mt["reduction"] == 1 else valid_f
    neg_weight = c(aten.neg.default, (weight,))
    safe_t = c(aten.unsqueeze.default, (safe_t, 1))                                                    # [N, 1]
    loss = g_w = g_b = None
    g_h = []
    for s in range(0, n_rows, chunk_rows):
        e = min(n_rows, s + chunk_rows)
        h_c = c(aten.slice.Tensor, (h, 0, s, e))
        z = c(aten.addmm.default, (b, h_c, wt)) if b is not None else c(aten.mm.default, (h_c, wt))
        if cast != head_dtype:
            z = c(aten._to_copy.default, (z,), {"dtype": cast})
        t_c = c(aten.slice.Tensor, (safe_t, 0, s, e))
        v_c = c(aten.slice.Tensor, (valid_f, 0, s, e))
        w_c = c(aten.slice.Tensor, (weight, 0, s, e)) if weight is not valid_f else v_c
        # log-sum-exp and softmax in place over the chunk's logits: one [c, V] buffer, one exp
        # (aten.logsumexp would allocate a second [c, V] scratch and exponentiate again)
        picked = c(aten.gather.default, (z, 1, t_c))                          # [c, 1]
        mx = c(aten.amax.default, (z, [1], True))                             # [c, 1]
        ez = c(aten.exp_.default, (c(aten.sub_.Tensor, (z, mx)),))            # exp(z - max)
        total = c(aten.sum.dim_IntList, (ez, [1], True))                      # [c, 1]
        lse = c(aten.add.Tensor, (c(aten.log.default, (total,)), mx))
        rows = c(aten.mul.Tensor, (c(aten.sub.Tensor, (lse, picked)), v_c))
        part = c(aten.sum.default, (rows,))
        loss = part if loss is None else c(aten.add.Tensor, (loss, part))
        p = c(aten.mul_.Tensor, (ez, c(aten.div.Tensor, (w_c, total))))      # softmax * w = d(loss)/dz
        p = c(aten.scatter_add_.default, (p, 1, t_c, c(aten.slice.Tensor, (neg_weight, 0, s, e))))  # minus w at the target
        if p.meta["val"].dtype != head_dtype:
            p = c(aten._to_copy.default, (p,), {"dtype": head_dtype})
        if need_h:
            g_h.append(c(aten.mm.default, (p, w)))
        if need_w:
            pt = c(aten.t.default, (p,))
            if g_w is not None and acc == head_dtype:        # accumulate in place, no [V, D] temporary
                g_w = c(aten.addmm_.default, (g_w, pt, h_c))
            else:
                gw = c(aten.mm.default, (pt, h_c))
                if gw.meta["val"].dtype != acc:
                    gw = c(aten._to_copy.default, (gw,), {"dtype": acc})
                g_w = gw if g_w is None else c(aten.add_.Tensor, (g_w, gw))
        if need_b:
            gb = c(aten.sum.dim_IntList, (p, [0]))
            if gb.meta["val"].dtype != acc:
                gb = c(aten._to_copy.default, (gb,), {"dtype": acc})
            g_b = gb if g_b is None else c(aten.add_.Tensor, (g_b, gb))
    out = c(aten.div.Tensor, (loss, count)) if mt["reduction"] == 1 else loss
    g_h = (g_h[0] if len(g_h) == 1 else c(aten.cat.default, (g_h, 0))) if need_h else None
    return out, count, g_h, g_w, g_b


def fuse_linear_ce(gm: fx.GraphModule, min_classes: int = 1024, chunk_rows: int | None = None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PassResult:
    """Fuse every matched head + cross-entropy; ``chunk_rows`` tokens per chunk (default: about
    ``chunk_bytes`` of float32 logits per chunk). ``gm.meta["pockc.fused_head"]`` lists what was
    fused: rows, vocabulary, chunk rows, chunks."""
    graph = gm.graph
    fused = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten._log_softmax.default:
            continue
        mt = _match(node, min_classes)
        if mt is None:
            continue
        n_rows, vocab = shape(mt["h"])[0], mt["vocab"]
        rows = max(1, min(n_rows, chunk_rows if chunk_rows is not None else default_chunk_rows(vocab, chunk_bytes)))
        with graph.inserting_before(mt["nll"]):
            out, count, g_h, g_w, g_b = _emit(graph, mt, rows)
        for u in list(mt["nll"].users):
            u.replace_all_uses_with(out if u.args[1] == 0 else count)
        coef = mt["gout"]          # the chunks' gradients are d(loss)/d(...): scale by the loss's gradient
        leaves = mt["leaves"]
        readers = {"grad_h": len(leaves["grad_h"]), "grad_w": len(leaves["grad_w"]) + len(leaves["grad_wt"]),
                   "grad_b": len(leaves["grad_b"])}
        for kind, grad in (("grad_h", g_h), ("grad_w", g_w), ("grad_wt", g_w), ("grad_b", g_b)):
            for leaf in leaves[kind]:
                # the chunks' gradient is a buffer of this pass: scale it in place when it has one reader
                mul = aten.mul_.Tensor if readers[kind.replace("grad_wt", "grad_w")] == 1 else aten.mul.Tensor
                with graph.inserting_before(leaf):
                    scaled = call(graph, mul, (grad, coef), meta_from=leaf)
                    if kind == "grad_wt":
                        scaled = call(graph, aten.t.default, (scaled,), meta_from=leaf)
                    if kind == "grad_b" and leaf.args[2:3] and leaf.args[2]:        # keepdim: [1, V]
                        scaled = call(graph, aten.unsqueeze.default, (scaled, 0), meta_from=leaf)
                    want = leaf.meta["val"].dtype
                    if scaled.meta["val"].dtype != want:
                        scaled = call(graph, aten._to_copy.default, (scaled,), {"dtype": want}, meta_from=leaf)
                leaf.replace_all_uses_with(scaled)
                graph.erase_node(leaf)
        fused.append({"rows": n_rows, "vocab": vocab, "chunk_rows": rows, "chunks": -(-n_rows // rows),
                      "trains_head": bool(mt["leaves"]["grad_w"] or mt["leaves"]["grad_wt"])})
    if fused:
        dce(gm)
        graph.lint()
        gm.recompile()
        gm.meta["pockc.fused_head"] = fused
    return PassResult(gm, bool(fused))
