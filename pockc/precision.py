"""Mixed precision for a compiled step: ``precision="bf16"``.

What users run with PEFT on a GPU, as one static step: the frozen weights are stored in bfloat16
(the resident model halves), the trained tensors stay float32 master copies with float32
optimizer state, and the loss is traced under ``torch.autocast(dtype=torch.bfloat16)``: matmuls
and convolutions run in bfloat16 (a trained tensor is cast to bfloat16 where a matmul reads it,
and its gradient cast back to float32), losses and reductions autocast keeps in float32 run in
float32 (``cross_entropy``, ``nll_loss``, ``mse_loss``, ...; Hugging Face models upcast their
logits and attention softmax to float32 themselves). The casts are ordinary ops of the traced
graph, so a saved or exported step needs no autocast at run time.

The conversion is done on the user's model (its frozen parameters become bfloat16 tensors, and
trained bfloat16 / float16 parameters float32), before tracing; if compiling fails, the model is
restored as it was.
"""
from __future__ import annotations

import functools

import torch

from pockc.errors import CompileError

PRECISIONS = ("fp32", "bf16")
_LOW = (torch.bfloat16, torch.float16)


def check_precision(precision) -> str:
    if precision is None:
        return "fp32"
    if precision not in PRECISIONS:
        raise CompileError(f"precision must be 'fp32' (the model's own dtypes) or 'bf16' (bfloat16 frozen weights "
                           f"and compute, float32 trained tensors and optimizer state), got {precision!r}")
    return precision


def apply_precision(model: torch.nn.Module, trained: set, precision: str):
    """Convert ``model``'s parameters for ``precision`` in place; returns a function that undoes it.

    ``trained``: names (any alias of a tied tensor) of the parameters the step trains."""
    if precision != "bf16":
        return lambda: None
    names, params = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):   # every alias of a tied tensor
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    before = []
    for key, p in params.items():
        if not p.is_floating_point():
            continue
        if any(n in trained for n in names[key]):
            want = torch.float32 if p.dtype in _LOW else p.dtype
        else:
            want = torch.bfloat16
        if p.dtype != want:
            before.append((p, p.data))
            p.data = p.data.to(want)

    def restore():
        for p, data in before:
            p.data = data
    return restore


def autocast_loss(loss_fn, precision: str, batch):
    """``loss_fn`` traced under bfloat16 autocast for ``precision="bf16"`` (on the batch's device),
    else ``loss_fn``."""
    if precision != "bf16":
        return loss_fn
    from pockc.runtime.backends import device_of
    from pockc.runtime.batch import batch_tensors
    device_type = device_of(batch_tensors(tuple(batch)))

    @functools.wraps(loss_fn)          # __wrapped__: compile's probe cache keys on the user's function
    def bf16_loss(model, *batch):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return loss_fn(model, *batch)
    bf16_loss.pockc_precision = precision
    return bf16_loss
