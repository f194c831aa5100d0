"""Replaying the random number generator, so that recomputed dropout draws the same mask.

passes/rematerialize.py may recompute a dropout mask in the backward pass instead of keeping it.
The forward pass then saves the generator's state right before the random op (``rng_state``:
5 KB on CPU, 16 bytes on CUDA, instead of a mask the size of the activation), and the
backward pass runs the same op from that state (``replay``) and puts the generator back where it
was, so every later draw -- and so the next step -- is what it would have been without the
recomputation: the step still matches eager PyTorch bit for bit in its masks.

This module imports torch only; it is part of pockc's runtime.
"""
from __future__ import annotations

import torch

__all__ = ["rng_state", "replay", "state_numel"]


def _get(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set(state, device: torch.device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def state_numel(device) -> int:
    """Bytes of the generator state of ``device`` (what ``rng_state`` returns)."""
    return _get(torch.device(device)).numel()


def rng_state(device: str) -> torch.Tensor:
    """A copy of the default generator's state for ``device`` (a CPU uint8 tensor)."""
    return _get(torch.device(device)).clone()


def replay(buf: torch.Tensor, state: torch.Tensor, op: str, *args):
    """Run ``aten.<op>(buf, *args)`` (an in-place random fill, e.g. ``"bernoulli_.float"``) with the
    generator set to ``state``, then restore the generator. Returns ``buf``."""
    packet, overload = op.split(".")
    fn = getattr(getattr(torch.ops.aten, packet), overload)
    cur = _get(buf.device)
    _set(state, buf.device)
    try:
        fn(buf, *args)
    finally:
        _set(cur, buf.device)
    return buf
