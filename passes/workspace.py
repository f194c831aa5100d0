"""workspace: the scratch memory a kernel allocates inside itself, measured once per call.

The live tensors of a step are what plan_memory counts node by node; the allocator hands out more.
On CPU, oneDNN's ``mkldnn_convolution`` and ``convolution_backward`` allocate their scratchpad and
reorder buffers (output-sized for a 3x3 convolution) through c10's allocator and free them
before they return, ``native_batch_norm_backward`` allocates per-thread reduction buffers, the
fused attention kernels their softmax statistics, and every aten op called with a Python number
where its schema takes a Tensor wraps that number in a fresh 0-dim tensor. None of it is a tensor
of the graph, so neither fake values nor the storage tracker see it: measured on the zoo at a
budget equal to the plan, the allocator's peak was up to 1.5x the plan.

So each distinct call -- (op, the shapes, strides, dtypes and devices of its tensor arguments,
its other arguments, the intra-op thread count) -- is run once on real tensors of those shapes
(floating point filled with ones, integer and bool with zeros: valid indices) under an
allocator-level measurement (runtime/memory.py :class:`AllocatorPeakTracker` on CPU, one
profiler session for all new calls of a graph with one ``record_function`` window per call;
``max_memory_allocated`` per call on CUDA), and the high-water mark of its new allocations is
cached process-wide in :data:`_CACHE`. plan_memory turns that into a ``workspace`` storage of
``max(0, peak - bytes of the node's own outputs)``, alive only at its node.

What is measured: every ``call_function`` node whose target is an overload in the ``aten``
namespace (never a collective such as ``_c10d_functional.all_reduce``, a custom op or a pockc
runtime call), except views (they allocate nothing), ops that read an opaque buffer another
kernel wrote (``mkldnn_rnn_layer_backward``'s workspace, cuDNN's reserve space: synthetic
contents could crash them; their scratch is not modelled) and calls with an argument that cannot be rebuilt (a
Generator, a symbolic size); random ops run with the generator's state saved and restored, so
the step's random stream is not moved. The call runs through the binding the step itself uses
(runtime/backends.py ``FAST_BINDINGS``). A call that fails on the synthetic inputs counts 0 and
is listed in :data:`STATS`. Cost: one op call per distinct signature -- about one forward and
backward pass of the model, once per process -- plus ~1.5 ms per graph for the profiler session;
``STATS["seconds"]`` accumulates it (pockc's zoo models: 0.05-0.4 s on 2 cores, measured).

Where scratch depends on the thread count (oneDNN's depthwise convolution allocates per thread),
the figure holds for the thread count at compile time: running the step with more threads than
it was compiled with may exceed it. ``POCKC_WORKSPACE=0`` in the environment turns measurement
off (every workspace 0, the plan as before).
"""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.fx as fx

from .fx_utils import is_aten, is_view

_CACHE: dict = {}      # signature -> peak bytes of new allocations during the call (0 if unmeasurable)
# signature -> bytes of the storage behind a single-tensor output as the kernel really allocates it,
# where that exceeds what its shape needs: aten.mse_loss returns a 0-d loss inside a storage of the
# input's size, so the loss tensor the step returns holds that much memory for the whole step
_OUT_STORAGE: dict = {}
STATS = {"measured": 0, "failed": [], "seconds": 0.0, "sessions": 0}
_PREFIX = "pockc.workspace:"
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def enabled() -> bool:
    return os.environ.get("POCKC_WORKSPACE", "1") != "0"


class _Unmeasurable(Exception):
    pass


def _tensor_sig(v):
    if v.device.type == "meta" or v.layout != torch.strided or v.is_quantized:
        raise _Unmeasurable
    shape, stride = tuple(v.shape), tuple(v.stride())
    if not all(type(x) is int for x in shape + stride):
        raise _Unmeasurable    # symbolic sizes
    return ("T", shape, stride, v.dtype, str(v.device))


def _arg_sig(a, memo):
    if isinstance(a, fx.Node):
        got = memo.get(a)
        if got is None:
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor):
                got = _tensor_sig(v)
            elif type(v) in (int, float, bool):
                got = ("N", v)
            else:
                raise _Unmeasurable
            memo[a] = got
        return got
    if isinstance(a, (list, tuple)):
        return tuple(_arg_sig(x, memo) for x in a)
    if isinstance(a, _SCALARS):
        return (type(a).__name__, a)
    raise _Unmeasurable


# Arguments holding an opaque buffer another kernel wrote (an RNN's workspace, cuDNN's reserve
# space, a saved generator state): a kernel reading synthetic contents there may crash, so ops
# that take one are not run (their scratch counts 0).
_OPAQUE = ("workspace", "reserve", "reservedspace", "reservespace", "weight_buf", "dropout_state", "rng_state")
_SAFE: dict = {}     # OpOverload -> may run on synthetic inputs


def _safe(op) -> bool:
    ok = _SAFE.get(op)
    if ok is None:
        ok = _SAFE[op] = not any(a.name.lower() in _OPAQUE for a in op._schema.arguments
                                 if "Tensor" in str(a.type))
    return ok


def signature(node: fx.Node, memo=None, threads=None):
    """The cache key of ``node``'s call, or None when it is not measured (``memo``: node ->
    signature of its value, shared over one graph)."""
    if not is_aten(node) or node.target.namespace != "aten" or is_view(node) or not _safe(node.target):
        return None     # only aten ops run at compile time: never a collective or a custom op
    if not isinstance(node.meta.get("val"), (torch.Tensor, tuple, list)):
        return None
    memo = {} if memo is None else memo
    try:
        return (node.target, _arg_sig(node.args, memo),
                tuple((k, _arg_sig(v, memo)) for k, v in sorted(node.kwargs.items())),
                torch.get_num_threads() if threads is None else threads)
    except (_Unmeasurable, TypeError):
        return None


def _materialize(a):
    """Real tensors for the fake values behind ``a`` (nodes, lists of nodes, constants)."""
    if isinstance(a, fx.Node):
        v = a.meta["val"]
        if not isinstance(v, torch.Tensor):
            return v
        span = 1 + sum((s - 1) * st for s, st in zip(v.shape, v.stride()) if s > 0) if v.numel() else 0
        fill = torch.ones if (v.dtype.is_floating_point or v.dtype.is_complex) else torch.zeros
        try:
            base = fill(span, dtype=v.dtype, device=v.device)
        except (RuntimeError, NotImplementedError):   # dtypes without fill kernels (float8)
            base = torch.zeros(span, dtype=v.dtype, device=v.device)
        return base.as_strided(tuple(v.shape), tuple(v.stride()))
    if isinstance(a, (list, tuple)):
        return type(a)(_materialize(x) for x in a)
    return a


def _binding(target):
    from pockc.runtime.backends import FAST_BINDINGS    # what the step calls for this overload
    return FAST_BINDINGS.get(target, target)


def _measure_cpu(todo) -> dict:
    from pockc.runtime.memory import AllocatorPeakTracker
    found, keep = {}, []
    with AllocatorPeakTracker(window_prefix=_PREFIX) as tr:
        for k, (sig, node) in enumerate(todo):
            try:
                args = _materialize(tuple(node.args))
                kwargs = {kk: _materialize(v) for kk, v in node.kwargs.items()}
                with torch.autograd.profiler.record_function(f"{_PREFIX}{k}"):
                    out = _binding(node.target)(*args, **kwargs)
                _note_storage(sig, out)
                keep.append(out)     # outputs outlive the window: what is left is scratch
                del args, kwargs, out
            except Exception as e:  # noqa: BLE001 -- a synthetic input the op rejects
                found[sig] = 0
                STATS["failed"].append(f"{node.target}: {type(e).__name__}: {str(e)[:120]}")
            if len(keep) > 8:
                keep.clear()
    for k, (sig, _) in enumerate(todo):
        if sig not in found:
            found[sig] = max(0, tr.windows.get(f"{_PREFIX}{k}", (0, 0))[0])
    return found


def _measure_cuda(todo) -> dict:
    found = {}
    for sig, node in todo:
        dev = _device(node)
        try:
            args = _materialize(tuple(node.args))
            kwargs = {k: _materialize(v) for k, v in node.kwargs.items()}
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = _binding(node.target)(*args, **kwargs)
            torch.cuda.synchronize(dev)
            found[sig] = max(0, torch.cuda.max_memory_allocated(dev) - base)
            _note_storage(sig, out)
            del out, args, kwargs
        except Exception as e:  # noqa: BLE001
            found[sig] = 0
            STATS["failed"].append(f"{node.target}: {type(e).__name__}: {str(e)[:120]}")
    return found


def _note_storage(sig, out):
    if isinstance(out, torch.Tensor) and out.layout == torch.strided:
        real = out.untyped_storage().nbytes()
        if real > out.numel() * out.element_size():
            _OUT_STORAGE[sig] = real


def output_storage_bytes(nodes) -> dict:
    """node -> the bytes its single-tensor output's storage really takes, for the nodes whose
    kernel allocates more than the output's shape needs (measured by :func:`call_peaks`, which
    must run first on the same nodes)."""
    if not enabled() or not _OUT_STORAGE:
        return {}
    memo, threads = {}, torch.get_num_threads()
    out = {}
    for n in nodes:
        if n.op == "call_function":
            s = signature(n, memo, threads)
            if s is not None and s in _OUT_STORAGE:
                out[n] = _OUT_STORAGE[s]
    return out


def _rng_states(devices):
    states = [("cpu", torch.get_rng_state())]
    for d in devices:
        if d.type == "cuda":
            states.append((d, torch.cuda.get_rng_state(d)))
    return states


def _restore(states):
    for d, s in states:
        torch.set_rng_state(s) if d == "cpu" else torch.cuda.set_rng_state(s, d)


def _device(node):
    for v in torch.utils._pytree.tree_leaves(node.meta.get("val")):
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def call_peaks(nodes) -> dict:
    """node -> peak bytes of new allocations during its call (measured once per signature)."""
    if not enabled():
        return {}
    sigs, memo, threads = {}, {}, torch.get_num_threads()
    for n in nodes:
        if n.op == "call_function":
            s = signature(n, memo, threads)
            if s is not None:
                sigs[n] = s
    todo, seen = [], set()
    for n, s in sigs.items():
        if s not in _CACHE and s not in seen:
            seen.add(s)
            todo.append((s, n))
    if todo:
        t0 = time.perf_counter()
        cpu = [(s, n) for s, n in todo if _device(n).type == "cpu"]
        cuda = [(s, n) for s, n in todo if _device(n).type == "cuda"]
        states = _rng_states({_device(n) for _, n in cuda})
        try:
            with torch.no_grad():
                if cpu:
                    try:
                        _CACHE.update(_measure_cpu(cpu))
                        STATS["sessions"] += 1
                    except RuntimeError as e:     # another profiler is running: not cached
                        warnings.warn(f"pockc: kernel workspaces not measured ({e}); the plan leaves them out",
                                      stacklevel=3)
                if cuda:
                    _CACHE.update(_measure_cuda(cuda))
        finally:
            _restore(states)
        STATS["measured"] += len(todo)
        STATS["seconds"] += time.perf_counter() - t0
    return {n: _CACHE[s] for n, s in sigs.items() if _CACHE.get(s)}
