"""pointwise_conv: run 1x1 convolutions on channels-last activations as one matrix multiply.

On a channels-last (NHWC) activation a 1x1, stride-1, unpadded, ungrouped convolution is exactly
a matrix product over the flattened pixels: ``y[NHW, Cout] = x[NHW, Cin] @ W[Cout, Cin]^T``, with
``x``, ``y`` and the gradient ``g`` viewed as 2-D matrices at no cost. The pass rewrites

* ``convolution(x, W, b)``           -> ``addmm(b, x2, W2.t())`` (``mm`` without a bias), or over
  ``MKLDNN_MIN_ROWS`` pixels or more oneDNN's ``mkldnn._convolution_pointwise`` (faster there);
* ``convolution_backward(g, x, W)`` -> ``grad_input = g2 @ W2``, ``grad_weight = g2.t() @ x2``,
  ``grad_bias = g2.sum(0)``, each only when the backward op's output mask asks for it,

where ``x2``/``g2`` are ``view(permute(t, [0, 2, 3, 1]), [N*H*W, C])`` and results are viewed back
as NCHW-shaped, channels-last-strided tensors (the layout ATen's convolution would give them).

Why: with one intra-op thread and a batch under 16, ATen sends such convolutions to its
``_slow_conv2d`` path (a GEMM per image, plus a zero-fill of ``grad_input`` in the backward),
measured 1.2x slower than one GEMM over all pixels for MobileNetV2's pointwise layers (b8, 128px,
2-core EPYC: forward 50.5 -> 44.4 ms, grad-input 51.7 -> 41.4 ms per step summed over the
layers). A second effect: the grad-input GEMM does not read ``x``, so a step that does not train
the weight no longer keeps the convolution's input alive for the backward pass only for its shape.

Applies only where the fake values say the activation (and, for the backward, the gradient) is
channels-last contiguous -- the views are then exact -- which after passes.channels_last is every
4-D activation of a CPU conv net at 64x64 pixels or more. Other convolutions are left alone.
Numerics: the same products summed by another GEMM blocking, within float tolerance of ATen's
convolution (tests/test_pointwise_conv.py checks the structure and the eager oracle).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .fx_utils import PassResult, call, dce

aten = torch.ops.aten


# Forward convolutions over at least this many pixels (N*H*W) run as oneDNN's convolution (the op
# Inductor itself emits), which beats one MKL GEMM there: 8x16x64x64 -> 96 channels 4.2 vs 6.3 ms,
# 8x144x32x32 -> 24 2.3 vs 2.5 ms; below it (16x16 maps and smaller at batch 8) the GEMM is as fast
# or faster (8x192x8x8 -> 64: 0.38 vs 0.46 ms). The backward's GEMMs have no such oneDNN win.
MKLDNN_MIN_ROWS = 8192
MKLDNN_CONV = torch.ops.mkldnn._convolution_pointwise.default if hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
    else None


def _has_mkldnn() -> bool:
    return MKLDNN_CONV is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _channels_last(v) -> bool:
    """A batch of several images, channels-last contiguous, unambiguously: with one pixel (or one
    channel) an NCHW tensor is channels-last contiguous too, and such convolutions stay as they are
    (a 1x1 map at batch 2 is where batch norm amplifies any reordering of a sum; the step there is
    NCHW, not converted). A batch of one image is left alone too: ATen's per-image GEMM loop is then
    a single GEMM already (measured gains under 0.1 ms a layer), and microcontroller-sized steps,
    planned to the byte under a budget, keep the memory profile their plans were chosen with."""
    return (isinstance(v, torch.Tensor) and v.dim() == 4 and v.device.type == "cpu" and v.shape[0] > 1
            and v.shape[1] > 1 and v.shape[2] * v.shape[3] > 1
            and v.is_contiguous(memory_format=torch.channels_last))


def _pointwise(w, stride, padding, dilation, transposed, groups) -> bool:
    return (isinstance(w, torch.Tensor) and w.dim() == 4 and tuple(w.shape[2:]) == (1, 1)
            and w.is_contiguous() and not transposed and groups == 1 and list(stride) == [1, 1]
            and list(padding) == [0, 0] and list(dilation) == [1, 1])


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _as_matrix(graph, t, meta_from):
    """``t`` (N, C, H, W), channels-last contiguous -> its (N*H*W, C) matrix view. ``view`` (not
    ``as_strided``) so that a tensor which is not channels-last at run time fails loudly instead of
    being misread."""
    n, c, h, w = _val(t).shape
    p = call(graph, aten.permute.default, (t, [0, 2, 3, 1]), meta_from=meta_from)
    return call(graph, aten.view.default, (p, [n * h * w, c]), meta_from=meta_from)


def _as_image(graph, m, shape, meta_from):
    """(N*H*W, C) matrix just computed by ``mm`` (contiguous) -> an (N, C, H, W) channels-last view
    of it, as one ``as_strided`` op (the step runs op by op: one dispatch, not view + permute)."""
    n, c, h, w = shape
    return call(graph, aten.as_strided.default, (m, [n, c, h, w], [h * w * c, 1, w * c, c]), meta_from=meta_from)


def _weight(graph, w, meta_from):
    """A (Cout, Cin, 1, 1) weight as its (Cout, Cin) matrix."""
    cout, cin = _val(w).shape[:2]
    return call(graph, aten.view.default, (w, [cout, cin]), meta_from=meta_from)


def _rewrite_forward(graph, node) -> bool:
    x, w, b, stride, padding, dilation, transposed, _out_pad, groups = node.args
    if not (_pointwise(_val(w), stride, padding, dilation, transposed, groups) and _channels_last(_val(x))
            and _channels_last(_val(node))):
        return False
    cout, cin = _val(w).shape[:2]
    n, _, h, wd = _val(x).shape
    if n * h * wd >= MKLDNN_MIN_ROWS and _val(x).dtype == torch.float32 and _has_mkldnn():
        with graph.inserting_before(node):
            y = call(graph, MKLDNN_CONV, (x, w, b, [0, 0], [1, 1], [1, 1], 1, "none", [], None), meta_from=node)
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        return True
    with graph.inserting_before(node):
        x2 = _as_matrix(graph, x, node)
        wt = call(graph, aten.t.default, (_weight(graph, w, node),), meta_from=node)
        y2 = (call(graph, aten.addmm.default, (b, x2, wt), meta_from=node) if b is not None
              else call(graph, aten.mm.default, (x2, wt), meta_from=node))
        y = _as_image(graph, y2, tuple(_val(node).shape), node)
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    return True


def _rewrite_backward(graph, node) -> bool:
    g, x, w, bias_sizes, stride, padding, dilation, transposed, _out_pad, groups, mask = node.args
    if not (_pointwise(_val(w), stride, padding, dilation, transposed, groups) and _channels_last(_val(g))):
        return False
    items = {}
    for u in node.users:
        if u.op != "call_function" or u.target is not operator.getitem:
            return False
        items.setdefault(u.args[1], []).append(u)
    if not all(mask[i] for i in items) or (1 in items and not _channels_last(_val(x))):
        return False  # an output the mask did not compute is read, or x is not a matrix view
    cout, cin = _val(w).shape[:2]
    new = {}
    with graph.inserting_before(node):
        g2 = _as_matrix(graph, g, node)
        if 0 in items:
            gi = call(graph, aten.mm.default, (g2, _weight(graph, w, node)), meta_from=node)
            new[0] = _as_image(graph, gi, tuple(_val(x).shape), node)
        if 1 in items:
            gt = call(graph, aten.t.default, (g2,), meta_from=node)
            gw = call(graph, aten.mm.default, (gt, _as_matrix(graph, x, node)), meta_from=node)
            new[1] = call(graph, aten.view.default, (gw, [cout, cin, 1, 1]), meta_from=node)
        if 2 in items:
            new[2] = call(graph, aten.sum.dim_IntList, (g2, [0]), meta_from=node)
    for i, users in items.items():
        for u in users:
            u.replace_all_uses_with(new[i])
            graph.erase_node(u)
    graph.erase_node(node)
    return True


def pointwise_conv(gm: fx.GraphModule, layout=None) -> PassResult:
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default:
            changed |= _rewrite_forward(graph, node)
        elif node.target is aten.convolution_backward.default:
            changed |= _rewrite_backward(graph, node)
    if changed:
        dce(gm)
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
