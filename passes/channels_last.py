"""channels_last: run a convolutional step in NHWC memory format on CPU.

ATen's CPU kernels for batch norm (train and eval), pooling and oneDNN convolutions are
markedly faster on channels-last activations than on NCHW ones at this project's sizes (measured
on a 2-core EPYC, 1 thread: train-mode batch norm over 8x96x64x64 5.7 ms vs 10.6 ms;
MobileNetV2 b8 128px step 1.25-1.5x faster, see benchmarks/results/bench_cpu.md). The layout of
every activation follows the layout of the op's input, so it is enough to convert the image
batch once at the start of the step: ``x = clone(x, memory_format=channels_last)``. Parameters
keep their layout (they belong to the user's module); gradients follow the layout ATen gives
them and the in-place updates write into the parameters as they are.

Applies when a 4-D floating-point batch input on CPU of at least 64x64 pixels feeds a 2-D
convolution (directly or through other ops). Results match the NCHW step within float tolerance (kernels sum in another
order). The clone costs one batch-sized copy. The fake values (``meta['val']``) downstream of the
clone are recomputed so their strides are the channels-last ones the step will see.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import PassResult, call, refresh_vals

aten = torch.ops.aten
# Images smaller than 64x64 stay NCHW: their activations are small enough that the layout buys
# little, and at such sizes batch norm statistics over a few pixels (e.g. a 1x1 map at batch 2)
# amplify the float reordering of NHWC kernels beyond the oracle's tolerance over a few steps.
MIN_PIXELS = 64 * 64


def _feeds_conv(node, limit=64) -> bool:
    """True when a 2-D convolution is reachable from ``node`` within ``limit`` nodes."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for u in n.users:
            if u.op == "call_function" and u.target is aten.convolution.default:
                return u.args[0].meta.get("val") is not None and u.args[0].meta["val"].dim() == 4
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def channels_last(gm: fx.GraphModule, layout) -> PassResult:
    graph = gm.graph
    batch = layout.placeholders(graph)["batch"]
    changed, converted = False, []
    for ph in batch:
        v = ph.meta.get("val")
        if not (isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point() and v.device.type == "cpu"
                and v.shape[2] * v.shape[3] >= MIN_PIXELS):
            continue
        if not _feeds_conv(ph):
            continue
        users = list(ph.users)
        with graph.inserting_before(batch[-1].next):   # after the last placeholder
            cl = call(graph, aten.clone.default, (ph,), {"memory_format": torch.channels_last})
        cl.meta["pockc.role"] = "forward"
        for u in users:
            u.replace_input_with(ph, cl)
        converted.append(cl)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
        _refresh_layouts(gm, converted)
    return PassResult(gm, changed)


def _refresh_layouts(gm: fx.GraphModule, starts) -> None:
    """Recompute the fake values downstream of the converted inputs, so that their strides say
    channels-last as the tensors at run time will be (later passes choose kernels by layout)."""
    seen, todo = set(), list(starts)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen and u.op == "call_function":
                seen.add(u)
                todo.append(u)
    try:
        refresh_vals(gm, seen)
    except Exception:  # noqa: BLE001 -- a data-dependent op cannot re-run on fake values: keep old ones
        pass
