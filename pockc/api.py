"""pockc.compile: model + loss + example batch + update policy -> TrainStep."""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping

import torch
import torch.fx as fx

from pockc.budget import batch_size_of, select_under_budget
from pockc.errors import CompileError
from pockc.memory import BudgetError, StepMemory, format_bytes, parse_bytes
from pockc.passes.activation_output import activation_output
from pockc.passes.allreduce import overlap_collectives
from pockc.passes.channels_last import channels_last
from pockc.passes.defer_writes import defer_writes
from pockc.passes.fold_batchnorm import fold_batchnorm
from pockc.passes.fx_utils import PassResult
from pockc.passes.inplace_ops import inplace_ops
from pockc.passes.insert_optimizer import insert_optimizer
from pockc.passes.plan_memory import plan_memory, plan_memory_then
from pockc.passes.pointwise_conv import pointwise_conv
from pockc.passes.fuse_ce_backward import fuse_ce_backward
from pockc.passes.fuse_linear_ce import fuse_linear_ce
from pockc.passes.prune_backward import prune_backward
from pockc.passes.schedule_memory import schedule_memory
from pockc.passes.schedule_updates import schedule_updates
from pockc.plan import UpdatePlan, resolve_update
from pockc.precision import apply_precision, autocast_loss, check_precision
from pockc.runtime import backends as _backends
from pockc.runtime.batch import batch_tensors
from pockc.runtime.optim import SGD, Optimizer
from pockc.runtime.train_step import TrainStep
from pockc.trace import analyze_forward, trace_joint


def _check_inputs(model, loss_fn, example_batch, optimizer):
    if not isinstance(model, torch.nn.Module):
        raise CompileError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise CompileError("loss_fn must be a callable loss_fn(model, *batch) -> scalar tensor")
    if isinstance(example_batch, (torch.Tensor, Mapping)):
        example_batch = (example_batch,)       # one argument: loss_fn(model, x) / loss_fn(model, batch)
    if not isinstance(example_batch, (tuple, list)) or not batch_tensors(example_batch):
        raise CompileError("example_batch must be a tuple of the arguments loss_fn takes after the model, with at "
                           "least one tensor, e.g. (x, y) or (batch,) for a dict batch; got "
                           f"{type(example_batch).__name__}")
    if optimizer is None:
        optimizer = SGD(lr=1e-3)
    if isinstance(optimizer, torch.optim.Optimizer):
        raise CompileError(f"pass a pockc optimizer (pockc.SGD / pockc.AdamW with torch.optim's arguments), "
                           f"not torch.optim.{type(optimizer).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise CompileError(f"optimizer must be pockc.SGD(...) or pockc.AdamW(...), got {type(optimizer).__name__}")
    return tuple(example_batch), optimizer


def run_passes(gm, stages):
    """Run ``(name, fn)`` stages in order; a failure names the stage and those that ran before."""
    done = []
    for name, fn in stages:
        try:
            gm = fn(gm).graph_module
        except CompileError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CompileError(f"pass {name} failed ({type(e).__name__}: {e}); passes run before it: "
                               f"{', '.join(done) or 'none'}. This is a pockc bug: please report it") from e
        done.append(name)
    return gm


def build_graph(model, loss_fn, batch, plan: UpdatePlan, optimizer, *, schedule: bool = True,
                accumulate: int = 1, max_grad_norm=None, head_chunk_rows=None, comm=None, portable: bool = False):
    """The pipeline: trace the joint graph, prune it, add the optimizer, schedule. With
    ``accumulate`` > 1 the graph accumulates gradients and ``gm.meta["pockc.apply"]`` is the
    program that applies them (passes/insert_optimizer.py). ``head_chunk_rows``: tokens per chunk
    of the fused output layer + cross-entropy (passes/fuse_linear_ce.py); None: about 16 MiB of
    float32 logits per chunk; 0: no fusion. ``comm`` (runtime/distributed.Comm): data parallel, the
    trained gradients all-reduced in the graph (passes/allreduce.py). ``portable``: a graph of
    plain contiguous ATen ops for another runtime (runtime/executorch.py): no channels-last layout,
    no oneDNN 1x1 convolutions, no ``_foreach_*`` updates."""
    gm, layout = trace_joint(model, loss_fn, batch, plan)                 # forward + needed backward
    fuse_head = [] if head_chunk_rows == 0 else [
        ("fuse_linear_ce", lambda g: fuse_linear_ce(g, min_classes=1024, chunk_rows=head_chunk_rows))]
    gm = run_passes(gm, [
        ("prune_backward", lambda g: prune_backward(g, layout)),         # channel slices, masks, DCE
    ] + fuse_head + [                                                    # head + loss in chunks, no logits
        ("fuse_ce_backward", lambda g: fuse_ce_backward(g, min_classes=1024)),                           # CE grad in place over log-probs
        ("fold_batchnorm", lambda g: fold_batchnorm(g, layout)),        # frozen eval BN into its conv
    ] + ([] if portable else [
        ("channels_last", lambda g: channels_last(g, layout)),          # NHWC activations on CPU
        ("pointwise_conv", lambda g: pointwise_conv(g, layout)),        # NHWC 1x1 convs as one GEMM
    ]) + [
        ("activation_output", lambda g: activation_output(g, layout)),  # ReLU6 backward from its output
        ("insert_optimizer", lambda g: insert_optimizer(g, layout, optimizer, accumulate=accumulate,
                                                        max_grad_norm=max_grad_norm, comm=comm,
                                                        foreach_min_tensors=_NO_FOREACH if portable else None)),
        ("plan_memory(before)", lambda g: _record_peak_before(g, layout)),  # for the report
        ("schedule_updates", schedule_updates),                           # update right after grad
    ] + ([("schedule_memory", lambda g: schedule_memory(g, layout)),   # reorder for a lower peak
          ("inplace_ops", lambda g: inplace_ops(g, layout, batch_norm=False if portable else None))]
         if schedule else [])
        + [("defer_writes", lambda g: defer_writes(g, layout))]          # no state written before the loss
        + ([("overlap_collectives", lambda g: overlap_collectives(g, layout))] if comm is not None else []))
    return gm, layout


PATCH_TILES = 4        # H-wise tiles of a frozen high-resolution stage run patch by patch (passes/patch_stages.py)
_NO_FOREACH = 1 << 62   # foreach_min_tensors that no group reaches: one update per tensor

_PROBE_CACHE: dict = {}   # planned peaks of single-layer probe plans, reused by later compiles


def _probe_key(model, loss_fn, batch, optimizer):
    from pockc.runtime.train_step import batch_signature
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    modes = tuple(m.training for m in model.modules())
    user_fn = loss_fn.__wrapped__ if hasattr(loss_fn, "pockc_precision") else loss_fn   # precision="bf16"
    return (type(model), repr(model), modes, id(user_fn), getattr(loss_fn, "pockc_precision", None), shapes,
            batch_signature(batch), repr(optimizer))


def _record_peak_before(gm, layout):
    gm.meta["pockc.peak_before"] = plan_step_memory(gm, layout).peak_bytes
    return PassResult(gm, False)


def plan_step_memory(gm, layout):
    """The step's memory plan: ``gm``'s, or with gradient accumulation that of its K-th call (the
    micro-batch program, then the update program), the call of the highest peak."""
    apply = gm.meta.get("pockc.apply")
    return plan_memory(gm, layout) if apply is None else plan_memory_then(gm, apply, layout)


def check_backend_option(backend):
    """CompileError for a backend pockc does not have (None: the device's default)."""
    if backend is not None and backend not in _backends.BACKENDS:
        raise CompileError(f"unknown backend {backend!r}; use one of: {', '.join(_backends.BACKENDS)}")


def step_backend_for(backend, gm, batch) -> str:
    """The backend a step running ``gm`` uses: ``backend`` (checked by check_backend_option), else
    the default of the batch's device; a CompileError where ``gm`` cannot run on it."""
    name = backend or _backends.default_backend(_backends.device_of(batch_tensors(batch)))
    if name != "aten" and any(n.target in _backends.GRAD_MODE_OPS for n in gm.graph.nodes):
        raise CompileError(f"the model has a recurrent layer (nn.LSTM) whose CPU kernel saves its backward's "
                           f"workspace only in grad mode; backend {name!r} cannot run it: use backend='aten'")
    return name


def check_training_options(accumulate, max_grad_norm, num_items, head_chunk_rows=None):
    """CompileError for a bad ``accumulate`` / ``max_grad_norm`` / ``num_items`` /
    ``head_chunk_rows``."""
    if head_chunk_rows is not None and (isinstance(head_chunk_rows, bool) or not isinstance(head_chunk_rows, int)
                                        or head_chunk_rows < 0):
        raise CompileError(f"head_chunk_rows must be a whole number of tokens >= 1, 0 (no fusion) or None "
                           f"(chosen by pockc), got {head_chunk_rows!r}")
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise CompileError(f"accumulate must be a whole number of micro-batches >= 1, got {accumulate!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not math.isfinite(max_grad_norm) or max_grad_norm <= 0):
        raise CompileError(f"max_grad_norm must be a positive finite number (HF Trainer's default is 1.0) or None, "
                           f"got {max_grad_norm!r}")
    if num_items is not None and not callable(num_items):
        raise CompileError(f"num_items must be a callable num_items(*batch) -> int, got {type(num_items).__name__}")
    if num_items is not None and accumulate == 1:
        raise CompileError("num_items= weights the micro-batches of gradient accumulation: pass accumulate=K "
                           "(K >= 2) with it, or drop it")


def compile(model: torch.nn.Module, loss_fn, example_batch, update=None, optimizer: Optimizer | None = None,
            *, budget=None, verbose: bool = False, backend: str | None = None, scores=None,
            max_layers: int = 12, remat: str = "auto", device_profile=None,
            objective: str | None = None, accumulate: int = 1, max_grad_norm: float | None = None,
            num_items=None, head_chunk_rows: int | None = None, precision: str = "fp32",
            distributed="auto", max_overhead: float = 0.15) -> TrainStep:
    """Compile one training step of ``model``.

    ``update`` is a preset (``"full"``, ``"bias"``, ``"last:K"``, ``"head"``; join with ``+``), a
    dict of glob patterns over parameter names to ``"full"`` / ``"frozen"`` / ``"channels:R"``, an
    UpdatePlan, or a list of these (later entries override earlier ones). Without ``update`` and
    ``budget`` the whole model is fine-tuned.

    ``budget`` (``"256KB"``, ``"1.5MB"``, bytes as an int; KB/MB/GB are 1024-based) bounds the step's
    writable memory (trained weights, optimizer state, batch, activations, gradients,
    temporaries; frozen weights are read-only). With no ``update``, pockc chooses the plan of most
    expected benefit whose planned peak fits (pockc/budget.py: contribution ``scores`` when
    given, else the prior "later layers and biases first"; the last ``max_layers`` layers are
    candidates; scores measured on top of a base update, ``score_layers(base=...)``, make every
    plan train that base). With an ``update``, that plan must fit. Raises ``pockc.BudgetError`` otherwise.
    ``step.memory`` holds the plan: ``peak_bytes``, ``breakdown``, ``arena_bytes``, ``measure()``.

    ``remat``: ``"auto"`` (default) -- when the plan (an explicit ``update``, or ``"full"``) does not
    fit ``budget``, recompute saved activations in the backward pass, or page them out to a slower
    tier and back (a memory-mapped file on CPU, pinned host memory on CUDA; aten backend only),
    at the least estimated extra cost until it fits (passes/rematerialize.py; ``step.remat``
    reports what was recomputed and paged, with a ``table()``; None when nothing was). Without
    ``accumulate``, optimizer state (momentum, Adam moments) may be kept in that tier too, copied in
    right before its tensor's update and back right after, chosen by the same solver; the memory
    plan counts those bytes in its ``paged`` row, not against the budget;
    ``"recompute"`` -- recompute only, never page; ``"off"`` -- neither. The budget-driven choice
    of an update plan (no ``update``) also considers plans that fit only that way, when the
    solver's estimated added time is at most ``max_overhead`` (default 0.15) of the step's own
    estimated time; it picks the plan of most expected benefit (``step.selection.table()`` lists
    the plans tried; ``max_overhead=0``: only plans that fit as they are). Over the budget with a
    peak in the forward of frozen high-resolution stages (a CNN whose first blocks are frozen), those
    stages run tile by tile first (passes/patch_stages.py, MCUNetV2's patch-based inference; exact,
    train-mode batch norms included; several times slower; ``step.patch`` reports the stage).
    ``device_profile``: plan the trade for another device -- a bundled profile name
    (``pockc.remat_cost.profiles()``: ``"mcu-cortex-m7"``, ``"raspberry-pi-4"``,
    ``"jetson-nano"``, ...), a JSON file or a dict (pockc/profiles/README.md); default: this
    device's built-in rates. ``objective``: ``"time"`` or ``"energy"`` (needs a profile with
    energy figures); default: the profile's, else time.

    ``accumulate=K`` (gradient accumulation): each call runs one micro-batch and adds its gradient
    of the trained tensors (trained rows only) into buffers the memory plan counts (kind
    ``accumulated gradient``); the K-th call applies the optimizer update with their sum, then
    clears them. The loss is normalized over the items of all K micro-batches, not averaged per
    micro-batch: ``loss_fn`` returns the mean over a micro-batch's n_i items, its gradient is
    weighted by n_i and the sum divided by N = sum n_i. n_i is ``num_items(*batch)`` when given,
    else the number of labels != -100 of a ``labels`` leaf of the batch (``labels[..., 1:]`` for
    labels of 2 or more dims: shifted, as Hugging Face's causal LM loss shifts them), else the
    batch size (the first dimension of the first tensor). Each call returns its micro-batch's
    loss; ``step.optimizer.lr`` is read when the update runs (a change takes effect at the next
    K-th call); ``step.step_count`` counts calls, ``step.update_count`` optimizer updates,
    ``step.micro_step`` the calls since the last update.
    ``max_grad_norm``: clip the global L2 norm of the trained gradients (trained rows only; with
    accumulation, of the accumulated gradient) to it before the update, as
    ``torch.nn.utils.clip_grad_norm_``; the updates then wait until every gradient is final, and
    the memory plan holds the gradients until then. ``step.last_grad_norm`` is the norm before
    clipping of the latest update.

    ``head_chunk_rows``: tokens per chunk of the fused output layer + cross-entropy
    (passes/fuse_linear_ce.py: the full logits never exist; ``step.fused_head`` reports it);
    default: about 16 MiB of float32 logits per chunk, halved while the step is over ``budget``;
    0: no fusion.
    ``precision``: ``"fp32"`` (default: the model's own dtypes) or ``"bf16"`` (pockc/precision.py):
    the frozen weights are converted to bfloat16 in the model, trained tensors stay float32 master
    copies with float32 optimizer state, and the loss is traced under bfloat16 autocast.

    ``distributed``: data parallel on torch.distributed (pockc/distributed.py): ``"auto"`` (default)
    -- on when torch.distributed is initialized with more than one rank; ``True`` / ``False``; or
    ``pockc.Distributed(group=, bucket_mb=, first_bucket_mb=, broadcast_buffers=)``. The step
    all-reduces exactly its trained gradients (the trained rows of a channel-sparse tensor) in its
    program, bucketed, overlapped with the rest of the backward, and averaged as DDP averages;
    every rank must compile the same step (compiling is collective) and then holds rank 0's
    weights. ``step.comm`` reports the buckets and the bytes per update beside DDP's (``table()``).

    ``backend``: ``"aten"`` runs the emitted FX program op by op (the default on every device,
    see runtime/backends.py); ``"inductor"`` lowers it through torch._inductor on the first call
    (tens of seconds of compile time, fused kernels after). On CPU with several threads, set
    ``OMP_WAIT_POLICY=PASSIVE`` before importing torch, or call ``torch.set_num_threads(1)``:
    spinning OpenMP threads otherwise slow Inductor steps down on shared cores.

    >>> import torch, torch.nn.functional as F, pockc
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    >>> def loss_fn(model, x, y):
    ...     return F.cross_entropy(model(x), y)
    >>> step = pockc.compile(model, loss_fn, (x, y), update="last:1", optimizer=pockc.SGD(lr=0.1, momentum=0.9))
    >>> loss = step(x, y)          # updates model[2] in place; model[0] stays as it was
    >>> step.update_plan.trainable_names()
    ['2.bias', '2.weight']
    """
    from pockc.distributed import compile_collectively, resolve_distributed
    comm = resolve_distributed(distributed)
    args = (model, loss_fn, example_batch, update, optimizer)
    kw = dict(budget=budget, verbose=verbose, backend=backend, scores=scores, max_layers=max_layers, remat=remat,
              device_profile=device_profile, objective=objective, accumulate=accumulate, max_grad_norm=max_grad_norm,
              num_items=num_items, head_chunk_rows=head_chunk_rows, precision=precision, max_overhead=max_overhead)
    if comm is None:
        return _compile_local(*args, **kw)
    return compile_collectively(comm, lambda: _compile_local(*args, **kw, comm=comm), model)


def _compile_local(model, loss_fn, example_batch, update, optimizer, *, budget, verbose, backend, scores, max_layers,
                   remat, device_profile, objective, accumulate, max_grad_norm, num_items, head_chunk_rows, precision,
                   max_overhead=0.15, comm=None) -> TrainStep:
    """compile on this process (``comm``: with the gradients all-reduced in the program)."""
    batch, optimizer = _check_inputs(model, loss_fn, example_batch, optimizer)
    check_training_options(accumulate, max_grad_norm, num_items, head_chunk_rows)
    if num_items is not None:
        check_num_items(num_items, batch)
    precision = check_precision(precision)
    loss_fn = autocast_loss(loss_fn, precision, batch)
    opts = {"accumulate": accumulate, "max_grad_norm": max_grad_norm}
    gopts = dict(opts, head_chunk_rows=head_chunk_rows, comm=comm)
    if scores is not None:
        from pockc.scoring import check_scores_match
        check_scores_match(scores, model)          # scores measured on another model are an error
    if remat not in ("auto", "recompute", "off"):
        raise CompileError(f"remat must be 'auto', 'recompute' or 'off', not {remat!r}")
    if (isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float))
            or not 0 <= max_overhead < float("inf")):
        raise CompileError(f"max_overhead must be a number >= 0 (a fraction of the step's time), not {max_overhead!r}")
    cost_model = None
    if device_profile is not None or objective is not None:
        from pockc.remat_cost import CostModel, default_cost_model
        try:
            cost_model = (CostModel.from_profile(device_profile, objective) if device_profile is not None
                          else dataclasses.replace(default_cost_model(_backends.device_of(example_batch)),
                                                   objective=objective))
        except ValueError as e:
            raise CompileError(str(e)) from None
    check_backend_option(backend)
    budget_bytes = parse_bytes(budget) if budget is not None else None
    t0 = time.perf_counter()
    order = analyze_forward(model, loss_fn, batch)
    selection, built = None, {}
    if update is None and budget_bytes is not None:
        def plan_peak(p, final=True):
            key = (_probe_key(model, loss_fn, batch, optimizer), p.to_json(), tuple(gopts.items()))
            if not final and key in _PROBE_CACHE:
                return _PROBE_CACHE[key]
            g, lay = build_graph(model, loss_fn, batch, p, optimizer, schedule=final, **gopts)
            mem = plan_step_memory(g, lay)
            peak = mem.required_bytes   # peak, or the arena if larger
            if final:
                built[p.to_json()] = (g, lay, mem)
            else:
                if len(_PROBE_CACHE) > 4096:
                    _PROBE_CACHE.clear()
                _PROBE_CACHE[key] = peak
            return peak

        def fit_with_remat(p):
            """The bytes plan ``p`` needs rematerialized under the budget within ``max_overhead``."""
            key = p.to_json()
            if key not in built:
                plan_peak(p)
            g, lay, _ = built.pop(key)
            g, rep, mem = _rematerialize(g, lay, batch, budget_bytes, remat, backend, cost_model, accumulate)
            if not rep.fits or rep.overhead > max_overhead or mem.required_bytes > budget_bytes:
                return None, rep
            built[key] = (g, lay, mem)       # _compile_plan takes it as it is
            return mem.required_bytes, rep

        base = getattr(scores, "base", None)        # LayerScores measured on top of a base update
        required = resolve_update(base, model, order).rules if base is not None else None
        selection = select_under_budget(model, budget_bytes, order, plan_peak, scores=scores, required=required,
                                        max_layers=max_layers, batch_size=batch_size_of(batch),
                                        progress=True if verbose else None,
                                        state_tensors=len(optimizer.state_names) + (accumulate > 1),
                                        fit_with_remat=fit_with_remat if remat != "off" and max_overhead > 0 else None,
                                        max_overhead=max_overhead)
        plan = selection.plan
    else:
        plan = resolve_update("full" if update is None else update, model, order)
    restore = apply_precision(model, set(plan.trainable_names()), precision)
    try:
        step = _compile_plan(model, loss_fn, batch, plan, optimizer, built, gopts, opts, budget_bytes, update, remat,
                             cost_model, backend, example_batch, num_items, precision)
    except BaseException:
        restore()      # the model as it was
        raise
    step.selection = selection
    step.compile_seconds = time.perf_counter() - t0
    if verbose:
        print(plan.table())
        if step.remat is not None:
            print(step.remat.table())
        print(f"compiled in {step.compile_seconds:.2f}s, {len(step.graph.graph.nodes)} graph nodes")
    return step


def _compile_plan(model, loss_fn, batch, plan, optimizer, built, gopts, opts, budget_bytes, update, remat, cost_model,
                  backend, example_batch, num_items, precision):
    """compile's second half: the step of the resolved ``plan`` (remat and head chunks to fit the budget)."""
    accumulate = opts["accumulate"]
    head_chunk_rows = gopts["head_chunk_rows"]
    if plan.to_json() in built and precision == "fp32":   # the selected plan, compiled and planned already
        gm, layout, mem = built[plan.to_json()]
    else:
        gm, layout = build_graph(model, loss_fn, batch, plan, optimizer, **gopts)
        mem = plan_step_memory(gm, layout)
    if budget_bytes is not None and mem.required_bytes > budget_bytes and head_chunk_rows is None:
        gm, layout, mem, gopts = _fit_head_chunks(model, loss_fn, batch, plan, optimizer, gopts, gm, layout, mem,
                                                  budget_bytes)
    patch_report = None
    if (budget_bytes is not None and mem.required_bytes > budget_bytes and remat != "off" and accumulate == 1
            and gopts.get("comm") is None and "pockc.remat" not in gm.meta):
        # a peak in the forward of frozen high-resolution stages: run them tile by tile
        from pockc.passes.patch_stages import patch_stages
        gm = run_passes(gm, [("patch_stages", lambda g: patch_stages(g, layout, tiles=PATCH_TILES))])
        if gm.meta["pockc.patch"]["stage"] is not None:
            patch_report = gm.meta["pockc.patch"]
            mem = plan_step_memory(gm, layout)
    remat_report = gm.meta.get("pockc.remat")       # rematerialized already by the budget selection
    step_backend = step_backend_for(backend, gm, batch)
    paging = remat == "auto" and step_backend == "aten"   # the page calls run in the FX program
    if budget_bytes is not None and mem.required_bytes > budget_bytes and remat != "off":
        gm, remat_report, remat_mem = _rematerialize(gm, layout, batch, budget_bytes, remat, backend, cost_model,
                                                     accumulate)
        if not remat_report.fits:
            how = ("recomputing activations" if not paging else "recomputing or paging activations" if accumulate > 1
                   else "recomputing or paging activations and paging optimizer state")
            err = BudgetError(f"update plan {update!r} needs {format_bytes(mem.required_bytes)}, over the budget "
                              f"of {format_bytes(budget_bytes)}, and {how} brings it down only "
                              f"to {format_bytes(remat_report.required_after)} (the smallest peak reached); "
                              f"train fewer parameters (a smaller update policy or "
                              f"none), use a smaller batch or a larger budget")
            err.smallest_bytes = remat_report.required_after
            raise err
        mem = remat_mem
    if budget_bytes is not None and mem.required_bytes > budget_bytes:
        raise BudgetError(f"update plan {update!r} needs {format_bytes(mem.required_bytes)} (planned peak "
                          f"{mem.peak_bytes:,} B, arena {mem.arena_bytes:,} B), over the "
                          f"budget of {format_bytes(budget_bytes)}; leave out the update policy to let pockc "
                          f"choose one that fits, or use a smaller batch or a larger budget")
    if layout.unused:
        import warnings
        warnings.warn(f"pockc: trained parameters with no path to the loss get no update: {layout.unused}",
                      stacklevel=2)

    def recompile(new_batch, opt, portable=False):
        g, lay = build_graph(model, loss_fn, tuple(new_batch), plan, opt, **gopts, portable=portable)
        if lay.to_dict() != layout.to_dict():
            raise CompileError("recompiling for a new batch, model mode or optimizer setting changed the step's "
                               "inputs (a submodule with other parameters?); compile again")
        if g.meta.get("pockc.buckets") != gm.meta.get("pockc.buckets"):   # every rank reduces the same buckets
            raise CompileError("recompiling for a new batch, model mode or optimizer setting changed the step's "
                               "gradient all-reduces; compile again on every rank")
        if patch_report is not None:   # the same stage, tiled again
            if portable:
                raise CompileError("this step runs its frozen high-resolution stages tile by tile to fit its budget; "
                                   "the exported program would not: export it with a larger budget")
            from pockc.passes.patch_stages import patch_stages
            g = patch_stages(g, lay, tiles=patch_report["tiles"], cut=patch_report["stage"]["end"]).graph_module
        if remat_report is not None:   # recompute the same tensors in the new shapes
            if portable and (remat_report.paged or remat_report.paged_state):
                raise CompileError("this step pages activations to a file between its forward and backward passes "
                                   "(remat='auto' under its budget); another runtime cannot run that: compile with "
                                   "remat='recompute' to export it")
            from pockc.passes.chunk_backward import chunk_backward
            from pockc.passes.rematerialize import rematerialize
            g = chunk_backward(g, lay).graph_module       # as _rematerialize rewrote the traced graph
            g = rematerialize(g, lay, None, recompute=remat_report.recomputed, page=remat_report.paged,
                              state=remat_report.paged_state).graph_module
        return g

    step = TrainStep(model, gm, layout, optimizer, plan, batch, recompile, num_items=num_items, **opts)
    step.backend = step_backend
    step.memory = StepMemory(step, mem, gm.meta.get("pockc.peak_before"), gm.meta.get("pockc.schedule"))
    step.budget = budget_bytes
    step.remat = remat_report
    step.patch = patch_report
    step.fused_head = gm.meta.get("pockc.fused_head", [])   # passes/fuse_linear_ce.py: rows, vocab, chunks
    step.precision = precision
    return step


def _rematerialize(gm, layout, batch, budget_bytes, remat, backend, cost_model, accumulate):
    """Recompute / page saved activations (and page optimizer state) to fit ``budget_bytes``:
    the graph, its RematReport and its memory plan."""
    from pockc.passes.chunk_backward import chunk_backward
    from pockc.passes.rematerialize import rematerialize
    paging = remat == "auto" and step_backend_for(backend, gm, batch) == "aten"  # page calls run in the program
    gm = run_passes(gm, [("chunk_backward", lambda g: chunk_backward(g, layout)),   # large backward temporaries
                         ("rematerialize", lambda g: rematerialize(g, layout, budget_bytes, cost=cost_model,  # in place
                                                                  allow_paging=paging,
                                                                  page_state=accumulate == 1))])
    plan = gm.meta.pop("pockc.remat_plan", None)
    return gm, gm.meta["pockc.remat"], plan if plan is not None and accumulate == 1 else plan_step_memory(gm, layout)


def _fit_head_chunks(model, loss_fn, batch, plan, optimizer, gopts, gm, layout, mem, budget_bytes):
    """Over the budget with a fused output layer + loss (passes/fuse_linear_ce.py): halve its
    chunk of tokens until the step fits, or chunks of one token. Returns the graph, layout, plan
    and options of the largest chunk that fits (fewer, larger chunks are faster), else of the
    smallest peak."""
    best = (mem.required_bytes, gm, layout, mem, gopts)
    fused = gm.meta.get("pockc.fused_head")
    rows = min(f["chunk_rows"] for f in fused) if fused else 0
    while rows > 1 and best[0] > budget_bytes:
        rows //= 2
        opts = dict(gopts, head_chunk_rows=rows)
        g, lay = build_graph(model, loss_fn, batch, plan, optimizer, **opts)
        m = plan_step_memory(g, lay)
        if m.required_bytes < best[0]:
            best = (m.required_bytes, g, lay, m, opts)
    return best[1:]


def check_num_items(num_items, batch):
    """Call the user's ``num_items`` on the example batch: an error there is a CompileError now,
    not a traceback at the first step."""
    from pockc.runtime.train_step import count_items
    from pockc.runtime.errors import StepError
    try:
        count_items(batch, num_items)
    except StepError as e:
        raise CompileError(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- the user's function
        raise CompileError(f"num_items(*example_batch) raised {type(e).__name__}: {e}") from None


def graph_stats(gm: fx.GraphModule) -> dict:
    """Counts of nodes per role (forward / backward / update)."""
    out = {}
    for n in gm.graph.nodes:
        r = n.meta.get("pockc.role", "other")
        out[r] = out.get(r, 0) + 1
    return out
