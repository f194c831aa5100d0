"""Data-parallel compiling on torch.distributed: ``pockc.compile(..., distributed=...)``.

Every rank compiles the same step (the same model, update policy, budget and batch shapes); the
step all-reduces exactly its trained gradients inside its own program (passes/allreduce.py) and
runs them as runtime/distributed.py says. Semantics are torch DDP's defaults:

* the same initial weights: after compiling, every rank holds rank 0's parameters and buffers
  (broadcast, as DDP's constructor does);
* gradients are averaged over the ranks (each rank's loss is the mean over its own micro-batch);
  with ``accumulate=K`` the ranks' gradients are summed once per update and divided by the items
  of the global batch (every rank's K micro-batches), so the update is that of one process on the
  concatenated batch;
* buffers (batch-norm running statistics) are broadcast from rank 0 before each call
  (``broadcast_buffers=True``, DDP's default) or kept per rank; batch norm normalizes each rank's
  micro-batch with its own statistics (as DDP without SyncBatchNorm); dropout draws from each
  rank's own generator;
* ``budget`` is per rank (the gradient buckets are in each rank's memory plan).

Compiling is collective: the ranks exchange, once, whether they compiled and what (a fingerprint
of the plan and the buckets), so a rank whose compile failed makes the others raise a
CompileError naming it, rather than leaving them waiting in a collective.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pockc.errors import CompileError
from pockc.runtime.distributed import Comm

MiB = 1024 * 1024


@dataclass
class Distributed:
    """Options of ``distributed=`` (``True`` means all defaults). ``group``: the process group
    (default: the world); ``bucket_mb`` / ``first_bucket_mb``: gradient bucket sizes in MiB
    (DDP's ``bucket_cap_mb`` = 25 and its 1 MiB first bucket); ``broadcast_buffers``: rank 0's
    buffers before each call (DDP's default), else each rank keeps its own."""
    group: object = None
    bucket_mb: float = 25
    first_bucket_mb: float = 1
    broadcast_buffers: bool = True


def resolve_distributed(distributed) -> Comm | None:
    """The Comm of ``distributed=`` (``"auto"``: on when torch.distributed is initialized with more
    than one rank), or None; a CompileError for a bad value or a missing process group."""
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, Comm):         # resolved already (finetune compiling on this rank)
        return None
    if isinstance(distributed, str) and distributed == "auto":
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        distributed = Distributed()
    elif distributed is True:
        distributed = Distributed()
    elif not isinstance(distributed, Distributed):
        raise CompileError(f"distributed must be 'auto', True, False or pockc.Distributed(...), got {distributed!r}")
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise CompileError("distributed=True needs torch.distributed initialized on every rank: run under torchrun "
                           "and call torch.distributed.init_process_group() before pockc.compile")
    for name in ("bucket_mb", "first_bucket_mb"):
        v = getattr(distributed, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise CompileError(f"Distributed.{name} must be a positive number of MiB, got {v!r}")
    group = distributed.group or dist.group.WORLD
    return Comm(group_name=group.group_name, world_size=dist.get_world_size(group),
                bucket_bytes=int(distributed.bucket_mb * MiB),
                first_bucket_bytes=int(distributed.first_bucket_mb * MiB),
                broadcast_buffers=bool(distributed.broadcast_buffers), group=group, rank=dist.get_rank(group))


def ddp_bytes(model, trained_names) -> int:
    """Bytes torch's DDP all-reduces per step for this trainable set: every parameter with a
    trained part (requires_grad), whole, once per storage (tied weights are one parameter)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    seen, total = set(), 0
    for n in trained_names:
        p = params.get(n)
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _fingerprint(step) -> str:
    doc = {"grads": [[n, repr(s)] for n, s in step.layout.grads], "buckets": step.graph.meta.get("pockc.buckets"),
           "inputs": step.layout.to_dict()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compile_collectively(comm: Comm, build, model):
    """Run ``build()`` (compile on this rank) as one collective step of every rank: on success
    everywhere, the ranks agree on the step and take rank 0's weights; where any rank failed, every
    rank raises (the failing one its own error)."""
    import torch.distributed as dist
    error = None
    try:
        step = build()
    except BaseException as e:  # noqa: BLE001 -- told to the other ranks, then raised
        error, step = e, None
    mine = ("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", _fingerprint(step))
    outcomes = [None] * comm.world_size
    try:
        dist.all_gather_object(outcomes, mine, group=comm.group)
    except RuntimeError as e:
        if error is not None:
            raise error
        raise CompileError(f"rank {comm.rank}: another rank crashed or left while the ranks compiled "
                           f"({str(e).splitlines()[0][:300]})") from None
    if error is not None:
        raise error
    failed = [(r, o[1]) for r, o in enumerate(outcomes) if o[0] == "error"]
    if failed:
        r, msg = failed[0]
        raise CompileError(f"rank {r} failed to compile its step ({msg}); every rank must compile the same step")
    prints = sorted({o[1] for o in outcomes})
    if len(prints) > 1:
        raise CompileError("the ranks compiled different steps (other trained tensors or gradient buckets): give "
                           "every rank the same model, update policy, budget and example batch shapes")
    _broadcast_model(comm, model)
    step.comm = comm
    comm.buckets = step.graph.meta.get("pockc.buckets", [])
    comm.ddp_bytes = ddp_bytes(model, step.update_plan.trainable_names())
    return step


def _broadcast_model(comm: Comm, model):
    """Rank 0's parameters and buffers on every rank (DDP's constructor does the same)."""
    comm.broadcast_from_rank0([*model.parameters(), *model.buffers()])
