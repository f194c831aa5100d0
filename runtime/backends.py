"""Backends: how a compiled step's FX program is executed.

* ``"aten"`` -- the emitted torch.fx GraphModule runs op by op on ATen kernels (what
  ``step.code`` shows). No extra compile time. It runs from a copy of the graph in which the most
  frequent ops call torch's own Python bindings (``Tensor.view``, ``torch.mm``, ...) instead of
  ``torch.ops.aten`` overload objects (:func:`fast_aten`): the same kernels with the same
  arguments, minus 2-5 us of argument handling per call -- about 2.8 ms per step for a
  MobileNetV2 graph of ~1,000 ops, measured.
* ``"inductor"`` -- the pruned, scheduled joint graph (forward, the needed backward, the in-place
  optimizer update) is lowered once per batch shape through ``torch._inductor.compile_fx``:
  AOTAutograd functionalizes the graph (the in-place writes to parameters, optimizer state and
  batch-norm buffers become input mutations that the compiled function applies before it
  returns), and Inductor fuses the element-wise work (batch norm, activations, the update
  arithmetic of every trained tensor) into generated C++/OpenMP kernels on CPU or Triton kernels
  on CUDA. Compile time is tens of seconds for a MobileNetV2-sized graph on a small CPU.

OpenMP threads and Inductor on CPU
----------------------------------
Inductor's C++ kernels open their own ``#pragma omp parallel`` regions (sized from
``torch.get_num_threads()`` when the kernel is generated) in the same libgomp as ATen. After each
region libgomp's worker threads keep spinning for a while (``OMP_WAIT_POLICY`` unset = spin, then
sleep); a step made of many short Inductor kernels interleaved with ATen's convolutions keeps
every core busy spinning, and when the cores are shared with other processes (or the spinning
pool of another parallel region), each barrier waits for a descheduled thread: the step and any
eager work in the same process slow down by an order of magnitude. Mitigations, in order of
preference: one intra-op thread per process (``torch.set_num_threads(1)``: Inductor then emits
no OpenMP regions at all); ``OMP_WAIT_POLICY=PASSIVE`` in the environment *before* torch is
imported (workers sleep at once; costs ATen's own short parallel regions some speed), which
``pockc bench`` sets for Inductor runs with more than one thread. The Python API cannot change
the OpenMP policy after import; :func:`lower` warns when it sees the risky combination.

This module imports torch only; it is part of pockc's runtime.
"""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("aten", "inductor")

# Default per device type, chosen by measurement (benchmarks/results/bench_cpu.md): on CPU the
# Inductor step is faster per step for convolutional nets but costs 30-80 s of compile time per
# batch shape on a 2-core machine, so "aten" stays the default there; "inductor" is opt-in.
# CUDA and MPS have not been measured by this project yet: "aten" until they are.
DEFAULT_BACKEND = {"cpu": "aten", "cuda": "aten", "mps": "aten"}


def check_backend(name) -> str:
    """Validate a backend name (``None`` means the per-device default)."""
    if name is None or name in BACKENDS:
        return name
    raise ValueError(f"unknown backend {name!r}; use one of: {', '.join(BACKENDS)}")


def default_backend(device_type: str) -> str:
    return DEFAULT_BACKEND.get(device_type, "aten")


def device_of(tensors) -> str:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device.type
    return "cpu"


_T = torch.Tensor
aten = torch.ops.aten
# aten overload -> the Python binding that dispatches to it with the same positional and keyword
# arguments (each checked: same schema, same kernel; a Python number where the aten op takes a
# Tensor is wrapped the same way by both).
FAST_BINDINGS = {
    aten.view.default: _T.view, aten.permute.default: _T.permute, aten.t.default: _T.t,
    aten.as_strided.default: _T.as_strided, aten.detach.default: _T.detach,
    aten.mm.default: torch.mm, aten.addmm.default: torch.addmm, aten.add.Tensor: torch.add,
    aten.add_.Tensor: _T.add_, aten.mul_.Tensor: _T.mul_, aten.addcmul_.default: _T.addcmul_,
    aten.hardtanh_.default: torch._C._nn.hardtanh_, aten.native_batch_norm.default: torch.native_batch_norm,
    aten.convolution.default: torch.convolution,
}


def _detached(a):
    return a.detach() if isinstance(a, torch.Tensor) else a


def _rnn_layer_for_training(*args, **kwargs):
    """``mkldnn_rnn_layer`` (the CPU LSTM kernel) returns the workspace its backward needs only
    when grad mode is on; the step runs under no_grad (it updates parameters in place), so this
    call turns grad mode on around it, over detached operands (no autograd graph is recorded)."""
    with torch.enable_grad():
        return aten.mkldnn_rnn_layer.default(*map(_detached, args), **{k: _detached(v) for k, v in kwargs.items()})


# Ops whose forward saves what their backward needs only in grad mode: -> a call that does so.
GRAD_MODE_OPS = {aten.mkldnn_rnn_layer.default: _rnn_layer_for_training} if hasattr(aten, "mkldnn_rnn_layer") else {}
FAST_BINDINGS.update(GRAD_MODE_OPS)


def fast_aten(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` that calls :data:`FAST_BINDINGS` where ``gm`` calls their aten overloads
    (``gm`` itself is left as it is: ``step.graph`` and ``step.code`` show the aten program)."""
    graph, env = torch.fx.Graph(), {}
    for n in gm.graph.nodes:
        new = graph.node_copy(n, lambda a: env[a])
        if new.op == "call_function" and new.target in FAST_BINDINGS:
            new.target = FAST_BINDINGS[new.target]
        env[n] = new
    return torch.fx.GraphModule(gm, graph)


def lower(gm: torch.fx.GraphModule, backend: str, example_inputs: list):
    """A callable running ``gm``'s step with ``backend``; ``example_inputs`` are the real inputs
    of one call (used for shapes, strides and devices; not modified)."""
    check_backend(backend)
    if backend == "aten":
        return gm
    return _lower_inductor(gm, example_inputs)


def _lower_inductor(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    if (device_of(example_inputs) == "cpu" and torch.get_num_threads() > 1
            and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"):
        warnings.warn("pockc: the inductor backend on CPU with more than one intra-op thread can slow "
                      "down badly when cores are shared (OpenMP threads spin between kernels); use "
                      "torch.set_num_threads(1) or set OMP_WAIT_POLICY=PASSIVE before importing torch",
                      stacklevel=4)
    # Functionalize and compile an inference (no autograd) program: the graph already contains
    # its backward. The graph mutates trained parameters that require grad; under no_grad that
    # is allowed, as in optimizer.step().
    from .distributed import functional_program
    with torch.no_grad():
        return compile_fx(functional_program(gm), list(example_inputs))
