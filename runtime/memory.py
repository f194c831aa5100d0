"""Peak memory of one call: ``measure_peak(fn, *args, **kwargs) -> (result, peak_bytes)``.

What is reported
----------------
``peak_bytes`` is the high-water mark of the bytes of tensor storage **allocated during the
call** and still alive at that moment. Storage that existed before the call (the arguments,
the model's parameters and buffers, optimizer state from earlier steps, gradients kept from an
earlier step) is *excluded*, even when the call writes to it in place. Use
:func:`measure_peak_total` to add a given set of pre-existing tensors as a constant baseline.

Storage allocated during the call and still alive when it returns (new ``.grad`` tensors,
optimizer state created on a first step, the returned loss) counts towards the peak like any
other allocation; :class:`CpuPeakTracker` also reports it as ``retained``.

CPU: an exact tracker of live tensor storage
--------------------------------------------
A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op dispatched while
it is active, including the backward ops of eager autograd (checked in
tests/test_memory_measure.py: on CPU the autograd engine runs backward on the calling thread;
for device threads it carries the dispatch-mode stack along with the rest of
``at::ThreadLocalState``). For each tensor an op returns, the tracker takes its untyped storage:

* a storage already tracked (a view, or an in-place op on a tensor allocated during the call)
  is counted once;
* a storage shared with one of the op's tensor inputs (views and in-place ops of pre-existing
  tensors) is not new and is not counted;
* otherwise it is a new allocation: its ``nbytes`` are added to the live total and a
  ``weakref.finalize`` on the storage object removes them when the storage is freed. PyTorch
  keeps a storage's Python object alive for as long as the C++ storage lives (PyObject
  preservation), so the finalizer fires exactly when the memory is released, including for
  tensors held only by C++ (autograd's saved tensors).

A storage that an op grows in place (``resize_``, ``out=`` kernels) is re-measured; a
pre-existing storage grown by an op counts by what it grew. The peak is
taken after every op, when its inputs and outputs are both alive.

Limits of the CPU tracker: memory a kernel allocates internally and frees before returning
(oneDNN / MKL scratch, the temporaries of a fused SDPA kernel, im2col buffers of the slow conv
path) never appears as a tensor and is not seen -- :class:`AllocatorPeakTracker` below sees it,
and pockc's plan models it as ``workspace`` storage (passes/workspace.py);
tensors made without the dispatcher (``torch.from_numpy``, ``torch.frombuffer``) are not seen;
allocator rounding/caching is not modelled (bytes are ``storage.nbytes()``). Tensors created by
``torch.tensor(...)`` are seen through ``aten.lift_fresh``. The mode costs Python work per op:
measure in an untimed call.

CPU: at the allocator (kernel scratch included)
-----------------------------------------------
:class:`AllocatorPeakTracker` (``track_peak(device, allocator=True)``,
:func:`measure_allocator_peak`) reports the same quantity as the c10 CPU allocator sees it: the
high-water mark of the bytes allocated during the call and not yet freed, *including* the scratch
a kernel allocates and frees inside itself (oneDNN's scratchpad and reorder buffers in
``mkldnn_convolution`` / ``convolution_backward``, the per-thread buffers of
``native_batch_norm_backward``, the 0-dim tensors a Python number is wrapped into). It runs a
torch.profiler (kineto) session with ``profile_memory`` and reads its allocation events: every
``[memory]`` event carries the pointer and the signed size; a free of a pointer allocated before
the session (which the profiler reports without a size) is ignored, so pre-existing storage is
excluded exactly as in the tracker above. Sizes are the bytes requested (``storage.nbytes()``);
c10 aligns each block to 64 bytes, which is not counted (pockc's arena aligns its offsets to 64
bytes itself). Allocations made by intra-op worker threads are reported only where torch carries
the profiler state into them; ATen's kernels allocate their outputs and scratch on the calling
thread. The session costs about 1.5 ms plus a few microseconds per op; it cannot run while
another torch.profiler session is active (RuntimeError). glibc's malloc behaviour (runtime/heap.py
keeps freed memory mapped) does not change these figures. kineto prints a line at every session
start and stop unless ``KINETO_LOG_LEVEL`` is set before its first use: this module sets it to 6
(silent) when it is unset.

``windows``: allocations inside ``torch.autograd.profiler.record_function(name)`` blocks whose
name starts with ``window_prefix`` are summarized per block (``.windows[name] = (peak, retained)``:
the peak of new allocations inside the block above its start, and what was still allocated at its
end); passes/workspace.py measures the scratch of many ops in one session this way.

CUDA
----
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
``memory_allocated`` at entry: the same quantity (peak of new allocations), as seen by the
caching allocator (block-rounded, and including kernel workspaces). ``allocator=True`` changes
nothing there: the caching allocator's figure is allocator-level already.

This module imports torch only; it is part of pockc's runtime.
"""
from __future__ import annotations

import bisect
import os
import re
import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["measure_peak", "measure_peak_total", "measure_allocator_peak", "storage_bytes", "CpuPeakTracker",
           "AllocatorPeakTracker", "track_peak"]

# ops whose output may be an input tensor object the mode has never seen (torch.tensor(...)).
_FRESH = {torch.ops.aten.lift_fresh.default}
if hasattr(torch.ops.aten, "lift_fresh_copy"):
    _FRESH.add(torch.ops.aten.lift_fresh_copy.default)


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
          "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3}


def parse_size(text) -> int:
    """``"256KB"`` -> 262144. B, KB/MB/GB (binary, 1024) and KiB/MiB/GiB, any case; an int is
    bytes. A ValueError naming the problem for anything else."""
    if isinstance(text, bool):
        raise ValueError(f"budget must be a size such as '256KB', got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"budget must be positive, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"budget must be a size such as '256KB' or a number of bytes, got {type(text).__name__}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise ValueError(f"cannot read budget {text!r}: write a positive size such as 256KB, 1.5MB or 4096 "
                         "(units B, KB, MB, GB = 1024-based; KiB, MiB, GiB)")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {m.group(2)!r} in budget {text!r}: use B, KB, MB, GB (1024-based) "
                         "or KiB, MiB, GiB")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"budget {text!r} is less than one byte")
    return int(value)


def format_bytes(n: int) -> str:
    """262144 -> '256.0 KB (262,144 B)' (binary units, exact bytes echoed)."""
    for unit, size in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit} ({n:,} B)"
    return f"{n:,} B"


def _storage(t):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, AttributeError):  # sparse, nested, meta-less
        return None


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (an iterable / pytree of tensors)."""
    flat, _ = tree_flatten(list(tensors) if not isinstance(tensors, torch.Tensor) else [tensors])
    seen, total = set(), 0
    for t in flat:
        if isinstance(t, torch.Tensor):
            s = _storage(t)
            if s is None or s.device.type == "meta":
                continue
            key = (s.device.type, s.device.index, s.data_ptr())
            if s.nbytes() and key not in seen:
                seen.add(key)
                total += s.nbytes()
    return total


class CpuPeakTracker(TorchDispatchMode):
    """Dispatch mode tracking the live bytes of storages allocated while it is active.

    Attributes after (or during) use: ``current`` (bytes allocated inside and alive now),
    ``peak`` (high-water mark of ``current``), ``retained`` (``current`` when the mode exited),
    ``allocations`` (number of new storages seen), ``total_allocated`` (sum of their bytes).
    """

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._live = {}  # id(storage object) -> [weakref to storage, nbytes, finalizer]
        self.current = 0
        self.peak = 0
        self.retained = 0
        self.allocations = 0
        self.total_allocated = 0

    # -- bookkeeping ---------------------------------------------------------------------
    # An entry is [weakref to the storage, counted bytes, finalizer, base bytes]; base is the
    # size a pre-existing storage had before an op grew it in place (not counted).
    def _freed(self, key):
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]

    def _track(self, s, base=0):
        counted = max(0, s.nbytes() - base)
        key = id(s)
        with self._lock:
            entry = self._live.get(key)
            if entry is not None and entry[0]() is s:
                counted = max(0, s.nbytes() - entry[3])
                if counted != entry[1]:  # grown / shrunk in place (resize_)
                    self.current += counted - entry[1]
                    self.total_allocated += max(0, counted - entry[1])
                    entry[1] = counted
                    self.peak = max(self.peak, self.current)
                return
            # zero-byte storages are tracked too: resize_ may grow them later
            self._live[key] = [weakref.ref(s), counted, weakref.finalize(s, self._freed, key), base]
            self.current += counted
            self.allocations += counted > 0
            self.total_allocated += counted
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins, _ = tree_flatten((args, kwargs))
        before = {}  # id(storage) -> (storage, nbytes) of the op's inputs, before the op
        for t in ins:
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None:
                    before[id(s)] = (s, s.nbytes())
        out = func(*args, **kwargs)
        outs, _ = tree_flatten(out)
        fresh = func in _FRESH
        for o in outs:
            if not isinstance(o, torch.Tensor):
                continue
            s = _storage(o)
            if s is None or s.device.type == "meta":
                continue
            prev = before.get(id(s))
            if prev is not None and prev[0] is s and not fresh:
                # a view of / in-place write to an input: counted already if allocated during
                # the call (re-measured if resized); a pre-existing storage counts only by
                # what an op grew it by.
                if id(s) in self._live or s.nbytes() > prev[1]:
                    self._track(s, base=prev[1])
                continue
            self._track(s)
        return out

    def __exit__(self, *exc):
        r = super().__exit__(*exc)
        with self._lock:
            self.retained = self.current
            entries = list(self._live.values())
            self._live.clear()
        for _, _, fin, _ in entries:  # storages outliving the call no longer call back into us
            fin.detach()
        return r


class _CudaPeak:
    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = self.retained = 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        self.retained = torch.cuda.memory_allocated(self.device) - self._base
        return False


class AllocatorPeakTracker:
    """Peak of new allocations at the c10 CPU allocator during a block (kernel scratch included),
    read from a torch.profiler session's memory events (see the module docstring).

    Attributes after exit: ``peak``, ``retained`` (bytes allocated inside and still allocated at
    exit), ``allocations`` (number of allocations seen), ``total_allocated`` (their bytes) and
    ``windows`` (name -> ``(peak, retained)`` of each ``record_function`` block whose name starts
    with ``window_prefix``; empty when ``window_prefix`` is None).
    """

    def __init__(self, window_prefix: str | None = None):
        self.window_prefix = window_prefix
        self.peak = self.retained = self.allocations = self.total_allocated = 0
        self.windows = {}
        self._on = False

    def __enter__(self):
        from torch._C._profiler import ProfilerActivity, _ExperimentalConfig
        from torch.autograd import ProfilerConfig, ProfilerState, _enable_profiler, _prepare_profiler
        if torch.autograd.profiler._is_profiler_enabled:
            raise RuntimeError("AllocatorPeakTracker: a torch.profiler session is already active; the "
                               "allocator-level measurement needs its own")
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")   # kineto logs each start/stop otherwise
        cfg = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
        _prepare_profiler(cfg, {ProfilerActivity.CPU})
        _enable_profiler(cfg, {ProfilerActivity.CPU})
        self._on = True
        return self

    def __exit__(self, *exc):
        from torch.autograd import _disable_profiler
        if not self._on:
            return False
        self._on = False
        result = _disable_profiler()
        if exc[0] is None:
            self._summarize(result.experimental_event_tree())
        return False

    def _summarize(self, roots):
        alloc_tag = torch._C._profiler._EventType.Allocation
        events, marks, stack, seq = [], [], list(roots), 0
        prefix = self.window_prefix
        while stack:
            e = stack.pop()
            if e.tag == alloc_tag:
                f = e.extra_fields
                if f.device.type == "cpu" and f.alloc_size:
                    events.append((e.start_time_ns, seq, f.ptr, f.alloc_size))
                    seq += 1
            else:
                if prefix is not None and e.name.startswith(prefix):
                    marks.append((e.name, e.start_time_ns, e.end_time_ns))
                stack.extend(e.children)
        events.sort()
        times, running = [], []        # running bytes of new allocations after each event
        live, cur, peak, n, total = {}, 0, 0, 0, 0
        for t, _, ptr, size in events:
            if size > 0:
                live[ptr] = live.get(ptr, 0) + size
                cur += size
                n += 1
                total += size
            else:
                got = live.pop(ptr, None)   # None: allocated before the session -> not new
                if got is None:
                    continue
                cur -= got
            peak = max(peak, cur)
            times.append(t)
            running.append(cur)
        self.peak, self.retained, self.allocations, self.total_allocated = peak, cur, n, total
        self.windows = {}
        for name, t0, t1 in marks:
            lo = bisect.bisect_left(times, t0)
            hi = bisect.bisect_right(times, t1)
            before = running[lo - 1] if lo else 0
            inside = running[lo:hi]
            self.windows[name] = (max(inside, default=before) - before, (inside[-1] if inside else before) - before)


def track_peak(device="cpu", allocator: bool = False):
    """Context manager; ``.peak`` holds the peak bytes allocated inside the block on exit: live
    tensor storage (:class:`CpuPeakTracker`), or with ``allocator=True`` what the allocator handed
    out, kernel scratch included (:class:`AllocatorPeakTracker`; on CUDA both are the caching
    allocator's figure).

    >>> with track_peak() as t:
    ...     x = torch.empty(1000, dtype=torch.uint8)
    ...     y = torch.empty(500, dtype=torch.uint8)
    >>> t.peak
    1500
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _CudaPeak(device)
    if device.type != "cpu":
        raise ValueError(f"measure_peak: unsupported device {device}")
    return AllocatorPeakTracker() if allocator else CpuPeakTracker()


def _device_of(args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    for t in flat:
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            return t.device
    for t in flat:  # a module or bound method of one (e.g. a TrainStep holds .model)
        mod = t if isinstance(t, torch.nn.Module) else getattr(t, "model", None)
        if isinstance(mod, torch.nn.Module):
            for p in mod.parameters():
                if p.device.type == "cuda":
                    return p.device
    return torch.device("cpu")


def measure_peak(fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)``; return ``(result, peak_bytes)``.

    ``peak_bytes``: the peak of live tensor storage *allocated during the call* (see the module
    docstring); pre-existing tensors (arguments, parameters) are excluded. The device is CUDA
    when a tensor argument, or a parameter of a module passed as ``fn`` or an argument (or of
    the ``.model`` of one, e.g. a pockc TrainStep), is on CUDA, otherwise CPU; for
    closures over CUDA tensors use ``with track_peak("cuda") as t: ...`` instead.

    >>> _, peak = measure_peak(lambda: torch.zeros(256, dtype=torch.float32) + 1)
    >>> peak   # the zeros (1 KiB) and the sum (1 KiB) are alive together
    2048
    """
    with track_peak(_device_of((fn,) + args, kwargs)) as t:
        result = fn(*args, **kwargs)
    return result, t.peak


def measure_peak_total(fn, *args, tensors=(), **kwargs):
    """Like :func:`measure_peak`, plus the bytes of the pre-existing ``tensors`` (e.g.
    ``list(model.parameters()) + list(model.buffers())``), deduplicated by storage.

    ``tensors`` may hold tensors, modules (their parameters and buffers count) and pytrees.
    Returns ``(result, baseline_bytes + peak_bytes)``.
    """
    flat = []
    for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors]):
        if isinstance(t, torch.nn.Module):
            flat += list(t.parameters()) + list(t.buffers())
        else:
            flat.append(t)
    baseline = storage_bytes(flat)
    result, peak = measure_peak(fn, *args, **kwargs)
    return result, baseline + peak


def measure_allocator_peak(fn, *args, **kwargs):
    """Like :func:`measure_peak`, at the allocator: ``(result, peak_bytes)`` with ``peak_bytes``
    the peak of new allocations during the call as the allocator saw them, scratch that kernels
    allocate and free inside themselves included (CPU: :class:`AllocatorPeakTracker`; CUDA:
    ``max_memory_allocated``).

    >>> _, peak = measure_allocator_peak(lambda: torch.zeros(256, dtype=torch.float32) + 1)
    >>> peak >= 2048
    True
    """
    with track_peak(_device_of((fn,) + args, kwargs), allocator=True) as t:
        result = fn(*args, **kwargs)
    return result, t.peak
