"""Cost model for rematerialization: the estimated time of re-running one aten op.

``op_cost(node)`` is a roofline estimate from the node's fake values: the larger of FLOPs over a
compute rate and bytes moved (inputs read + outputs written) over a memory bandwidth, plus a fixed
per-op dispatch overhead. FLOPs come from shapes for the ops that dominate training graphs
(``mm``/``addmm``/``bmm``/``convolution``/attention: 2 x multiply-adds; normalizations: a few per
element) and are one per output element for everything else; views cost only the dispatch.

The rates are CPU defaults (``CostModel()``, fixed so that compiles are reproducible);
``CostModel.calibrate()`` times a matmul, a copy and a tiny op on the current machine
(``POCKC_REMAT_CALIBRATE=1`` makes the pass use it). The pass only compares costs with each other, so the absolute scale
matters only for the report (seconds of added work per step).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

_MATMUL = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
_NORM = {aten.native_batch_norm.default, aten.native_layer_norm.default, aten.native_group_norm.default}
_FREE = {aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
         aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
         aten.select.int, aten.slice.Tensor, aten.alias.default, aten.detach.default, aten.split.Tensor}


def _tensors(x):
    return [v for v in torch.utils._pytree.tree_leaves(x) if isinstance(v, torch.Tensor)]


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def flops(node: fx.Node) -> float:
    """Floating-point operations of one run of ``node`` (multiply-add = 2)."""
    if node.op != "call_function" or node.target is operator.getitem or node.target in _FREE:
        return 0.0
    outs = _tensors(node.meta.get("val"))
    out_numel = sum(t.numel() for t in outs)
    t = node.target
    try:
        if t in _MATMUL:
            a = _val(node.args[1] if t in (aten.addmm.default, aten.baddbmm.default) else node.args[0])
            k = a.shape[-1]
            return 2.0 * outs[0].numel() * k
        if t is aten.convolution.default:
            w = _val(node.args[1])
            per_out = math.prod(w.shape[1:])     # (Cin / groups) * kernel elements
            return 2.0 * outs[0].numel() * per_out
        if "scaled_dot_product" in str(t):
            q, k = _val(node.args[0]), _val(node.args[1])
            return 4.0 * q.numel() * k.shape[-2]
        if t in _NORM:
            return 8.0 * outs[0].numel()
    except (AttributeError, IndexError, TypeError):
        pass
    return float(out_numel)


def bytes_moved(node: fx.Node) -> float:
    """Bytes read (tensor inputs) plus bytes written (tensor outputs)."""
    if node.op != "call_function" or node.target is operator.getitem or node.target in _FREE:
        return 0.0
    ins = [t for a in node.all_input_nodes for t in _tensors(a.meta.get("val"))]
    outs = _tensors(node.meta.get("val"))
    return float(sum(t.numel() * t.element_size() for t in ins + outs))


@dataclass
class CostModel:
    """Seconds to re-run an op: max(flops / flop_rate, bytes / byte_rate) + overhead."""
    flop_rate: float = 20e9       # FLOP/s  (one or two x86 cores, fp32)
    byte_rate: float = 5e9        # B/s
    overhead: float = 10e-6       # s per op (dispatch + the generated Python code)

    def __call__(self, node: fx.Node) -> float:
        if node.op != "call_function":
            return 0.0
        if node.target is operator.getitem:
            return 0.0
        return max(flops(node) / self.flop_rate, bytes_moved(node) / self.byte_rate) + self.overhead

    @classmethod
    def calibrate(cls, n: int = 256, repeat: int = 5) -> "CostModel":
        """Time a matmul, a large copy and a tiny op here to set the rates and the per-op
        overhead (about 20 ms)."""
        import time
        a, b = torch.randn(n, n), torch.randn(n, n)
        x = torch.randn(1 << 20)
        s = torch.randn(16)
        best_mm = best_cp = best_op = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.ops.aten.mm.default(a, b)
            best_mm = min(best_mm, time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.ops.aten.clone.default(x)
            best_cp = min(best_cp, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(100):
                torch.ops.aten.add.Tensor(s, s)
            best_op = min(best_op, (time.perf_counter() - t0) / 100)
        return cls(flop_rate=2.0 * n ** 3 / best_mm, byte_rate=2.0 * x.numel() * 4 / best_cp, overhead=best_op)


_DEFAULT = []


def default_cost_model() -> CostModel:
    """The fixed defaults (compiles are reproducible: the same model and budget give the same
    graph on every machine), or, with ``POCKC_REMAT_CALIBRATE=1``, rates timed on this machine
    once per process."""
    import os
    if os.environ.get("POCKC_REMAT_CALIBRATE") == "1":
        if not _DEFAULT:
            _DEFAULT.append(CostModel.calibrate())
        return _DEFAULT[0]
    return CostModel()
