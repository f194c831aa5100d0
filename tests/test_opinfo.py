"""PyTorch's OpInfo database through one-parameter training steps.

For every op in ``torch.testing._internal.common_methods_invocations.op_db`` that supports
autograd: a module with one parameter ``p`` (the sample's input; the first element for ops that
take a list of tensors, e.g. ``cat``) whose forward applies the op with the sample's arguments,
and a loss ``sum((out * w).sum())`` over the op's floating outputs with fixed random weights ``w``.
The sample's other tensors and the weights are the batch (graph inputs). One compiled step
(``update="full"``, ``pockc.SGD(lr=0.1)``) must leave ``p`` where eager autograd +
``torch.optim.SGD(lr=0.1)`` puts it, or pockc must refuse the op at compile time with a clear
one-line error that names a reason other than "check that it runs in eager" (it does). A
mismatch, a crash, a raw exception or a "pockc bug" message fails the test. Ops whose outputs are
not floating or do not depend on ``p``, ops without autograd and sparse inputs are skipped; no op
is skipped by name.

Random ops (dropout, bernoulli, rrelu, ...): OpInfo seeds them inside the op; here they run
unwrapped and eager and compiled steps start from the same seed (pockc draws from the same
generator stream as eager).

Run as a script (``python tests/test_opinfo.py [NAME ...]``) for a table of every op's outcome.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
import traceback
import warnings

import pytest
import torch
from torch.utils import _pytree as pytree

import pockc
from pockc.runtime.errors import BatchError, StepError

try:
    import expecttest  # noqa: F401  -- torch.testing._internal imports it
    from torch.testing._internal import common_methods_invocations as _cmi
    from torch.testing._internal.common_methods_invocations import op_db
except Exception:  # noqa: BLE001
    _cmi = op_db = None

SAMPLES = int(os.environ.get("OPINFO_SAMPLES", "2"))          # samples per op
RTOL = {torch.float64: 1e-7, torch.float32: 1e-5}
ATOL = {torch.float64: 1e-9, torch.float32: 1e-6}


class OneParam(torch.nn.Module):
    """``forward(*tensors)`` = ``op(p, *args, **kwargs)``, the sample's tensor leaves (other than
    the input) filled in from ``tensors``, everything else a constant."""

    def __init__(self, op, p0, rest, args, kwargs, process):
        super().__init__()
        self.p = torch.nn.Parameter(p0)
        self.op, self.process = op, process
        self.listed = rest is not None
        leaves, spec = pytree.tree_flatten((rest, args, kwargs))
        self.unflatten = lambda xs: pytree.tree_unflatten(xs, spec)   # a function: deepcopy shares it
        self.is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        self.consts = [None if t else x for x, t in zip(leaves, self.is_tensor)]

    def forward(self, *tensors):
        it = iter(tensors)
        leaves = [next(it) if t else c for c, t in zip(self.consts, self.is_tensor)]
        rest, args, kwargs = self.unflatten(leaves)
        first = [self.p, *rest] if self.listed else self.p
        return self.process(self.op(first, *args, **kwargs))


def floating_outputs(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def make_loss(n_inputs):
    def loss_fn(model, *batch):
        outs = floating_outputs(model(*batch[:n_inputs]))
        return sum((o * w).sum() for o, w in zip(outs, batch[n_inputs:]))
    return loss_fn


def op_dtype(op):
    supported = op.supported_dtypes("cpu")
    backward = op.supported_backward_dtypes("cpu")
    for dt in (torch.float64, torch.float32):
        if dt in supported and dt in backward:
            return dt
    return None


_FALLBACK = "check that loss_fn(model, *example_batch) runs in eager PyTorch"   # pockc/trace.py's _explain


def _clear_refusal(e):
    """One line, not a pockc bug, and not the generic fallback (eager ran the same loss)."""
    msg = str(e)
    return "\n" not in msg.strip() and "pockc bug" not in msg and _FALLBACK not in msg


def run_sample(op, sample, dtype, seed):
    """One sample as a one-parameter step. Returns (category, detail)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_sample(op, sample, dtype, seed)


def _run_sample(op, sample, dtype, seed):
    inp = sample.input
    if isinstance(inp, (list, tuple)):
        if not inp or not isinstance(inp[0], torch.Tensor):
            return "skip", "input list without a tensor first"
        p0, rest = inp[0], list(inp[1:])
    else:
        p0, rest = inp, None
    if not isinstance(p0, torch.Tensor) or not p0.is_floating_point():
        return "skip", "input is not a floating tensor"
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in pytree.tree_leaves(
            (inp, sample.args, sample.kwargs))):
        return "skip", "sparse tensors"
    args, kwargs = list(sample.args), dict(sample.kwargs)
    tensors = [x for x in pytree.tree_leaves((rest, args, kwargs)) if isinstance(x, torch.Tensor)]
    # inf / nan in the input: a few autograd formulas differ between dense and traced tensors
    # there (prod's backward divides by the input on dense tensors, takes its zero-safe form on
    # traced ones: nan vs inf); a mismatch on such a sample is reported as a skip
    nonfinite = any(x.is_floating_point() and not torch.isfinite(x).all() for x in [p0, *tensors])
    process = sample.output_process_fn_grad or (lambda x: x)

    def make():
        return OneParam(op.op, p0.detach().clone(), rest, args, kwargs, process)

    module = make()
    inputs = tuple(t.detach().clone() for t in tensors)

    # eager: the outputs' shapes for the weights, then one autograd + torch.optim.SGD step
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            outs = floating_outputs(module(*inputs))
    except Exception as e:  # noqa: BLE001
        return "eager-fails", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if not outs:
        return "skip", "no floating output"
    g = torch.Generator().manual_seed(1234)
    weights = tuple(torch.randn(o.shape, dtype=o.dtype, generator=g) for o in outs)
    batch = inputs + weights
    loss_fn = make_loss(len(inputs))
    m_e, m_c = make(), make()
    try:
        torch.manual_seed(seed)
        loss_e = loss_fn(m_e, *batch)
        if not isinstance(loss_e, torch.Tensor) or not loss_e.requires_grad:
            return "skip", "output does not depend on p"
        loss_e.backward()
        if m_e.p.grad is None:
            return "skip", "output does not depend on p"
        opt = torch.optim.SGD(m_e.parameters(), lr=0.1)
        opt.step()
    except Exception as e:  # noqa: BLE001
        return "eager-fails", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"

    # compiled
    try:
        step = pockc.compile(m_c, loss_fn, example_batch=batch, update="full", optimizer=pockc.SGD(lr=0.1))
        torch.manual_seed(seed)
        loss_c = step(*batch)
    except (pockc.CompileError, BatchError, StepError) as e:
        if _clear_refusal(e):
            return "refused", f"{type(e).__name__}: {e}"
        return "crash", f"unclear {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc().strip().splitlines()
        return "crash", f"{type(e).__name__}: {str(e).strip()[:300]} [{tb[-3].strip() if len(tb) > 2 else ''}]"

    category, detail = _compare(m_c, m_e, loss_c, loss_e, dtype)
    if category == "mismatch" and nonfinite:
        return "skip", f"non-finite input ({detail})"
    return category, detail


def _compare(m_c, m_e, loss_c, loss_e, dtype):
    rtol, atol = RTOL[dtype], ATOL[dtype]
    pc, pe = m_c.p.detach(), m_e.p.detach()
    if pc.shape != pe.shape or not torch.allclose(pc, pe, rtol=rtol, atol=atol, equal_nan=True):
        diff = (pc - pe).abs().max().item() if pc.shape == pe.shape and pc.numel() else float("nan")
        return "mismatch", f"parameter differs by {diff:.3g} (loss compiled {float(loss_c):.6g}, eager {float(loss_e):.6g})"
    if not torch.allclose(loss_c.to(loss_e.dtype), loss_e.detach(), rtol=rtol, atol=atol, equal_nan=True):
        return "mismatch", f"loss differs: compiled {float(loss_c):.10g}, eager {float(loss_e):.10g}"
    return "match", ""


_RANK = {"crash": 5, "mismatch": 4, "refused": 3, "match": 2, "eager-fails": 1, "skip": 0}


@contextlib.contextmanager
def _seeded_outside():
    """OpInfo's random ops (dropout, bernoulli, rrelu, ...) call ``torch.manual_seed(42)`` inside the
    op (``wrapper_set_seed``): a Python call on the generator, which a traced step does not replay.
    Here they run unwrapped, and the harness seeds eager and compiled steps identically instead."""
    saved = _cmi.wrapper_set_seed
    _cmi.wrapper_set_seed = lambda fn, *args, **kwargs: fn(*args, **kwargs)
    try:
        yield
    finally:
        _cmi.wrapper_set_seed = saved


def run_op(op, samples=SAMPLES):
    """The op's outcome over its first ``samples`` samples: the worst sample's (category,
    detail); 'skip' when none could run."""
    with _seeded_outside():
        return _run_op(op, samples)


def _run_op(op, n_samples):
    if not op.supports_autograd:
        return "skip", "supports_autograd=False"
    dtype = op_dtype(op)
    if dtype is None:
        return "skip", "no float64/float32 support on CPU"
    torch.manual_seed(0)
    results = []
    try:
        samples = list(itertools.islice(op.sample_inputs("cpu", dtype, requires_grad=False), n_samples))
    except Exception as e:  # noqa: BLE001
        return "skip", f"sample_inputs fails: {type(e).__name__}: {e}"
    for i, sample in enumerate(samples):
        results.append(run_sample(op, sample, dtype, seed=i))
    if not results:
        return "skip", "no samples"
    ran = [r for r in results if r[0] != "skip"]
    return max(ran or results, key=lambda r: _RANK[r[0]])


def _op_id(op):
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


OPS = {_op_id(op): op for op in op_db} if op_db is not None else {}


needs_op_db = pytest.mark.skipif(op_db is None, reason="torch's OpInfo database needs the expecttest package")


@needs_op_db
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_matches_eager_or_is_refused(name):
    category, detail = run_op(OPS[name])
    assert category not in ("mismatch", "crash"), f"{name}: {category}: {detail}"


@needs_op_db
def test_sweep_is_not_vacuous():
    """Ops of each kind really run a step and match (a list input, random ops, a view-returning
    split, an in-place write into a gradient's view, a multi-output decomposition), and a
    data-dependent shape is refused."""
    for name in ("add", "mm", "cat", "nn.functional.dropout", "bernoulli", "unsafe_split", "as_strided_scatter",
                 "nn.functional.conv2d", "nn.functional.layer_norm"):
        assert run_op(OPS[name]) == ("match", ""), name
    assert run_op(OPS["linalg.qr"], samples=4) == ("match", "")    # sample 3: sub_(x, x.mT) kept out of place
    category, detail = run_op(OPS["masked_select"])
    assert category == "refused" and "data-dependent" in detail


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    names = sys.argv[1:] or sorted(OPS)
    shard, shards = map(int, os.environ.get("OPINFO_SHARD", "0/1").split("/"))
    names = names[shard::shards]
    import time
    counts = {}
    for name in names:
        t0 = time.perf_counter()
        cat, detail = run_op(OPS[name])
        counts[cat] = counts.get(cat, 0) + 1
        print(f"{name}\t{cat}\t{time.perf_counter() - t0:.2f}s\t{detail}", flush=True)
    print(counts)
