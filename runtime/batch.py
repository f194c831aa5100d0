"""Batches as torch pytrees: every tensor leaf, however nested, is an input of the step.

A batch is the tuple of arguments after ``model`` in ``loss_fn(model, *batch)``: tensors, and
tuples, lists, dicts (a Hugging Face batch ``{"input_ids", "attention_mask", "labels"}``) or other
pytree containers of them. Tensor leaves become graph inputs in ``tree_flatten`` order; every
other leaf (an int, a string, None) and the nesting itself are part of the batch *signature*: the
step is specialized to them, and a batch with another structure or another constant compiles a
new step, as a new shape does.

This module imports torch only; it is part of pockc's runtime.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


_LEAVES = (torch.Tensor, int, float, str, type(None))


def _flat(batch) -> bool:
    """A plain tuple of tensors and constants: the common case, handled without pytree (a
    flatten costs ~12 us per call, this check ~1 us)."""
    return type(batch) is tuple and all(isinstance(b, _LEAVES) for b in batch)


def batch_tensors(batch) -> list:
    """The tensor leaves of ``batch``, in the order the step takes them."""
    leaves = batch if _flat(batch) else pytree.tree_leaves(batch)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def rebuild_batch(batch, tensors):
    """``batch`` with its tensor leaves replaced, in order, by ``tensors``."""
    leaves, spec = pytree.tree_flatten(batch)
    it = iter(tensors)
    return pytree.tree_unflatten([next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)


def leaf_signature(leaf) -> tuple:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type)
    return ("const", type(leaf).__name__, repr(leaf))


def batch_signature(batch) -> tuple:
    """What a compiled step is specialized to: the nesting of ``batch`` and, per leaf, its path
    (``[0]['labels']``) with (shape, dtype, device) for a tensor or the value for a constant."""
    if _flat(batch):
        return (f"tuple of {len(batch)}", tuple((f"[{i}]", leaf_signature(b)) for i, b in enumerate(batch)))
    with_path, spec = pytree.tree_flatten_with_path(batch)
    return (str(spec), tuple((pytree.keystr(path), leaf_signature(leaf)) for path, leaf in with_path))


def describe_leaf(sig) -> str:
    if sig[0] == "tensor":
        return f"{sig[2]} tensor of shape {list(sig[1])} on {sig[3]}".replace("torch.", "")
    return f"constant {sig[2]}"


def signature_difference(sig, ref) -> str:
    """One sentence naming why a batch of signature ``sig`` cannot run a step compiled for
    ``ref``: another nesting, or a tensor of another rank, dtype or device. '' when a step
    specialized to ``sig`` can be compiled (other sizes, other constants)."""
    paths, ref_paths = [p for p, _ in sig[1]], [p for p, _ in ref[1]]
    if sig[0] != ref[0] or paths != ref_paths:
        missing = [p for p in ref_paths if p not in paths]
        extra = [p for p in paths if p not in ref_paths]
        parts = ([f"lacks batch{', batch'.join(missing)}"] if missing else []) + \
                ([f"has batch{', batch'.join(extra)}, which the step was not compiled for"] if extra else [])
        return ("the batch " + " and ".join(parts or ["is nested differently"])
                + f"; the step was compiled for {', '.join('batch' + p for p in ref_paths)}")
    for (path, a), (_, b) in zip(sig[1], ref[1]):
        if a[0] != b[0]:
            return f"batch{path} is a {describe_leaf(a)}, the step was compiled for a {describe_leaf(b)}"
        if a[0] == "tensor" and (len(a[1]) != len(b[1]) or a[2] != b[2] or a[3] != b[3]):
            return (f"batch{path} is a {describe_leaf(a)}, the step was compiled for a {describe_leaf(b)}: "
                    "rank, dtype and device must match")
    return ""
