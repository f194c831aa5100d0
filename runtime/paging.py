"""Paging saved activations out to a slower, larger memory tier and back (POET's third choice).

passes/rematerialize.py may decide that a saved activation is *paged*: right after its last
forward reader the step starts copying its storage out, a few ops later it waits for that copy
(the storage is then freed, as the memory plan assumes), and a few ops before its first backward
reader it allocates a fresh storage and starts copying the bytes back in, waiting right before
the reader. Both copies run while the step goes on computing (the ops between start and wait):

* **CPU** -- the tier is a memory-mapped file (the "flash" of a microcontroller or a Raspberry
  Pi), created in ``POCKC_PAGE_DIR`` (default: the system's temporary directory) on first use and
  unlinked at once, so nothing is left behind. Copies run on one background thread (ATen's copy
  releases the GIL). The pages are file-backed: the kernel may write them back and drop them
  under memory pressure, which RAM holding the activation cannot do. On a machine with free RAM
  they stay in the page cache, so the copies cost about a ``memcpy``.
* **CUDA** -- the tier is pinned host memory; copies are asynchronous on a side stream. The
  compute stream waits for the copy-out event before the storage can be reused, and for the
  copy-in event before the first backward reader.

The graph calls the four functions below with constants naming the pool, the slot's offset and
size (``key, offset, nbytes, total``). A pool is created lazily on first use in a process, so a
GraphModule that calls them runs anywhere pockc's runtime is installed. Allocation happens on the
calling thread (so pockc's CPU memory tracker sees the paged-in storage like any other).

**Optimizer state on the slow tier** (rematerialize's ``page_state``): a state tensor that is
needed only at its parameter's update (SGD momentum, Adam's moments) is kept in the tier between
steps (:func:`tier_tensor`: an unlinked memory-mapped file on CPU, pinned host memory on CUDA), and
the step copies it into a fresh storage a few ops before the update (:func:`state_in`, waited for
by :func:`state_in_wait` right before the first update op), updates that copy in place, and copies
it back right after (:func:`state_out`, waited for by :func:`state_out_wait` a few ops later, when
the copy is freed) -- ZeRO-Offload's placement of optimizer state, at one tensor's granularity.
The state tensor the step holds *is* the tier copy, so saving, checkpoints and ``step.state`` see
the current values.

This module imports torch only; it is part of pockc's runtime.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["page_out", "page_out_wait", "page_in", "page_in_wait", "state_in", "state_in_wait", "state_out",
           "state_out_wait", "tier_tensor", "is_tier_tensor", "release", "PAGE_FUNCTIONS"]


class _Pool:
    def __init__(self, total: int, device: torch.device):
        self.device = device
        self.total = total
        self.pending = {}                 # offset -> Future / cuda Event of the copy in flight
        if device.type == "cuda":
            self.host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            self.stream = torch.cuda.Stream(device=device)
            self.worker = None
            self._map = None
        else:
            d = os.environ.get("POCKC_PAGE_DIR") or tempfile.gettempdir()
            fd, path = tempfile.mkstemp(prefix="pockc-page-", dir=d)
            try:
                os.ftruncate(fd, max(total, 1))
                self._map = mmap.mmap(fd, max(total, 1))
            finally:
                os.close(fd)
                os.unlink(path)
            self.host = torch.frombuffer(self._map, dtype=torch.uint8, count=total) if total else torch.empty(0, dtype=torch.uint8)
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pockc-page")
            self.stream = None

    def close(self):
        if self.worker is not None:
            self.worker.shutdown(wait=True)


_POOLS: dict = {}
_LOCK = threading.Lock()


def _pool(key: str, total: int, device) -> _Pool:
    p = _POOLS.get(key)
    if p is None:
        with _LOCK:
            p = _POOLS.get(key)
            if p is None:
                p = _POOLS[key] = _Pool(total, torch.device(device))
    return p


def release(key: str) -> None:
    """Drop a pool (called when the GraphModule that uses it is collected)."""
    p = _POOLS.pop(key, None)
    if p is not None:
        p.close()


def _copy(dst, box):
    dst.copy_(box[0])


def _bytes_of(x: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor over the first ``nbytes`` of ``x``'s storage."""
    return torch.empty(0, dtype=torch.uint8, device=x.device).set_(x.untyped_storage(), 0, (nbytes,), (1,))


def _start(pool, offset, dst, src, device):
    """Start the copy ``dst <- src`` beside the compute: on the side stream after the work queued
    so far (CUDA), or on the pool's thread (CPU, which holds ``src`` only until ``_wait``)."""
    if pool.stream is not None:
        pool.stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(pool.stream):
            dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(pool.stream)
        pool.pending[offset] = ev
    else:
        box = [src]
        pool.pending[offset] = (pool.worker.submit(_copy, dst, box), box)


def _wait(pool, offset, device):
    """Wait for the copy started at ``offset``: the compute stream waits for its event (CUDA), or
    this thread for the pool's thread, then drops the source here (CPU)."""
    h = pool.pending.pop(offset)
    if pool.stream is not None:
        torch.cuda.current_stream(device).wait_event(h)
    else:
        h[0].result()
        h[1].clear()


def page_out(x: torch.Tensor, key: str, offset: int, nbytes: int, total: int):
    """Start copying the first ``nbytes`` of ``x``'s storage to the pool; returns the slot."""
    pool = _pool(key, total, x.device)
    _start(pool, offset, pool.host[offset:offset + nbytes], _bytes_of(x, nbytes), x.device)
    return offset


def page_out_wait(slot: int, x: torch.Tensor, key: str) -> None:
    """Wait until the copy out of ``x`` is done; ``x`` may be freed after this call."""
    _wait(_POOLS[key], slot, x.device)


def page_in(slot: int, key: str, offset: int, nbytes: int, total: int, device: str) -> torch.Tensor:
    """Allocate ``nbytes`` on ``device`` and start copying the slot back into them."""
    pool = _pool(key, total, device)
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _start(pool, offset, out, pool.host[offset:offset + nbytes], out.device)
    return out


def page_in_wait(buf: torch.Tensor, key: str, offset: int) -> torch.Tensor:
    """Wait for the copy into ``buf`` and return it (the same tensor)."""
    _wait(_POOLS[key], offset, buf.device)
    return buf


def state_in(x: torch.Tensor, key: str, slot: int, device: str) -> torch.Tensor:
    """Allocate a tensor like the tier-resident state ``x`` on ``device`` and start copying ``x``
    into it."""
    pool = _pool(key, 0, device)
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    _start(pool, ("in", slot), out, x, out.device)
    return out


def state_in_wait(buf: torch.Tensor, key: str, slot: int) -> torch.Tensor:
    """Wait for the copy into ``buf`` and return it (the same tensor)."""
    _wait(_POOLS[key], ("in", slot), buf.device)
    return buf


def state_out(buf: torch.Tensor, x: torch.Tensor, key: str, slot: int) -> int:
    """Start copying the updated ``buf`` back into the tier-resident state ``x``."""
    _start(_pool(key, 0, buf.device), ("out", slot), x, buf, buf.device)
    return slot


def state_out_wait(slot: int, buf: torch.Tensor, key: str) -> None:
    """Wait until ``buf`` is back in the tier; ``buf`` may be freed after this call."""
    _wait(_POOLS[key], ("out", slot), buf.device)


def tier_tensor(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x`` whose storage is in the slow tier: an unlinked memory-mapped file
    in ``POCKC_PAGE_DIR`` on CPU (file-backed pages the kernel may write back and drop under
    memory pressure), pinned host memory for a CUDA tensor. The mapping lives as long as the
    tensor."""
    if x.device.type == "cuda":
        out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        out.copy_(x)
        out._pockc_tier = True
        return out
    nbytes = x.numel() * x.element_size()
    d = os.environ.get("POCKC_PAGE_DIR") or tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="pockc-state-", dir=d)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        m = mmap.mmap(fd, max(nbytes, 1))
    finally:
        os.close(fd)
        os.unlink(path)
    # torch.frombuffer holds a reference to the mapping in the storage: it stays open while any
    # tensor over that storage lives
    out = torch.frombuffer(m, dtype=x.dtype, count=x.numel()).view(x.shape) if nbytes else x.new_empty(x.shape)
    out.copy_(x)
    out._pockc_tier = True
    return out


def is_tier_tensor(x) -> bool:
    """Whether ``x`` was made by :func:`tier_tensor`."""
    return bool(getattr(x, "_pockc_tier", False))


# Functions with effects the graph must keep even without users, and which output aliases which
# argument (for the memory planner).
PAGE_FUNCTIONS = (page_out, page_out_wait, page_in, page_in_wait, state_in, state_in_wait, state_out, state_out_wait)
