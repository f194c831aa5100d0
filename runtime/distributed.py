"""Data parallelism on torch.distributed: what a compiled step needs when it runs on several ranks.

A distributed step's program all-reduces its trained gradients itself, with torch's traceable
collectives (``torch.ops._c10d_functional``: ``all_reduce_`` issues, ``wait_tensor`` waits; see
passes/allreduce.py). Around the program, each call of the step (runtime/train_step.py):

* broadcasts the module's buffers (batch-norm running statistics) from rank 0 before it runs, as
  torch's DDP does with ``broadcast_buffers=True`` (``Comm.broadcast_buffers``; off: each rank
  keeps its own);
* with gradient accumulation, sums the item counts of the cycle over the ranks on its last call,
  so the update divides the summed gradients by the items of the global batch;
* turns an error of a collective (a peer rank crashed, left or timed out) into a :class:`CommError`
  that says so, and refuses further calls: once one rank's step failed, the ranks are out of step.

This module imports torch only; it is part of pockc's runtime.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from .errors import StepError

# The traceable collectives a step's program calls: the issuing ops (asynchronous on a real
# process group) and the wait that makes their result available.
def _functional():
    return torch.ops._c10d_functional


@functools.cache
def issue_ops() -> frozenset:
    c = _functional()
    return frozenset({c.all_reduce_.default, c.all_reduce.default})


def wait_op():
    return _functional().wait_tensor.default


def is_issue(node) -> bool:
    return node.op == "call_function" and node.target in issue_ops()


def is_wait(node) -> bool:
    return node.op == "call_function" and (node.target is wait or node.target is wait_op())


def wait(t):
    """The program's wait for the collective that writes ``t`` (``wait_tensor``), and then for the
    collective's work object to let go of ``t``: gloo's worker thread marks a work done before it
    drops its own reference to the tensors (measured: 1 in 8 calls on a loaded 2-core machine),
    so a bucket the program frees right after its update would stay allocated a little longer
    than the memory plan says. ``t`` is referenced only by the program once its use count is 1;
    the wait for that is bounded (1 s), it is usually not needed at all."""
    out = wait_op()(t)
    # CPU only (gloo): NCCL's watchdog keeps its works until the GPU is done, and CUDA memory is the
    # caching allocator's; not for fake tensors (tracing)
    if type(out) is torch.Tensor and out.device.type == "cpu" and out._use_count() > 1:
        deadline = time.monotonic() + 1.0
        while out._use_count() > 1 and time.monotonic() < deadline:
            time.sleep(0)
    return out


class CommError(StepError):
    """A collective of a distributed step failed: another rank crashed, left or timed out."""


@dataclass(eq=False)
class Comm:
    """How a step's gradients cross the ranks. ``group_name``: the process group's name (the
    collectives in the program name it); ``world_size``; ``bucket_bytes`` / ``first_bucket_bytes``:
    the most bytes of gradients reduced in one collective (DDP's defaults: 25 MiB, the first 1 MiB);
    ``broadcast_buffers``: buffers from rank 0 before each call. ``buckets`` (set by the pass that
    inserts the collectives): per collective, in issue order, the trained tensors it reduces and its
    bytes; ``ddp_bytes``: what torch's DDP would reduce per update for the same trainable set (the
    whole of every tensor with a trained part)."""
    group_name: str
    world_size: int
    bucket_bytes: int = 25 * 1024 * 1024
    first_bucket_bytes: int = 1024 * 1024
    broadcast_buffers: bool = True
    buckets: list = field(default_factory=list)     # [{"tensors": [names], "bytes": int, "inplace": bool}]
    ddp_bytes: int = 0
    group: object = field(default=None, repr=False, compare=False)   # the ProcessGroup (not saved)
    rank: int = 0
    failed: str | None = None   # set when a step failed on this rank: the ranks are out of step

    @property
    def bytes_per_step(self) -> int:
        """Bytes of gradients this rank all-reduces per optimizer update (the collectives' sizes)."""
        return sum(b["bytes"] for b in self.buckets)

    def to_json(self) -> dict:
        return {"group_name": self.group_name, "world_size": self.world_size, "bucket_bytes": self.bucket_bytes,
                "first_bucket_bytes": self.first_bucket_bytes, "broadcast_buffers": self.broadcast_buffers,
                "buckets": self.buckets, "ddp_bytes": self.ddp_bytes}

    @classmethod
    def from_json(cls, d: dict) -> "Comm":
        return cls(**{k: d[k] for k in ("group_name", "world_size", "bucket_bytes", "first_bucket_bytes",
                                         "broadcast_buffers", "buckets", "ddp_bytes")})

    def table(self) -> str:
        """One row per collective: the tensors it reduces and its bytes; then the total next to DDP's."""
        from tabulate import tabulate
        rows = []
        for i, b in enumerate(self.buckets):
            names = b["tensors"]
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} tensors)" if len(names) > 3 else "")
            rows.append([i, shown, f"{b['bytes']:,}", "in place" if b.get("inplace") else "copy"])
        ratio = f"{self.ddp_bytes / self.bytes_per_step:.2f}x fewer" if self.bytes_per_step else "-"
        return (tabulate(rows, headers=["all-reduce", "trained tensors", "bytes", "buffer"], tablefmt="github")
                + f"\nper update: {self.bytes_per_step:,} B all-reduced by each of {self.world_size} ranks; "
                  f"torch DDP with the same trainable set: {self.ddp_bytes:,} B ({ratio})")

    # -- at run time ---------------------------------------------------------------------------
    def attach(self):
        """Bind to this process's group of the saved name (a loaded step); a StepError when this
        process is not part of a group like the one the step was compiled for."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise StepError(f"this step was compiled for {self.world_size} ranks of torch.distributed: call "
                            "torch.distributed.init_process_group (torchrun) on every rank before running it")
        from torch.distributed.distributed_c10d import _resolve_process_group
        try:
            group = _resolve_process_group(self.group_name)
        except (ValueError, RuntimeError, KeyError):
            raise StepError(f"this step all-reduces over process group {self.group_name!r}, which this process "
                            "does not have") from None
        if dist.get_world_size(group) != self.world_size:
            raise StepError(f"this step was compiled for {self.world_size} ranks, the process group has "
                            f"{dist.get_world_size(group)}: compile it again")
        self.group, self.rank = group, dist.get_rank(group)

    def check_usable(self):
        if self.failed is not None:
            raise CommError(f"rank {self.rank}: an earlier step failed on this rank ({self.failed}); the ranks are "
                            "out of step: restart every rank (from a checkpoint: step.save / pockc.load)")
        if self.group is None:
            self.attach()

    def sync_buffers(self, buffers):
        """Rank 0's values of ``buffers`` on every rank, as DDP's broadcast_buffers."""
        if self.broadcast_buffers and buffers:
            self.broadcast_from_rank0(buffers)

    def broadcast_from_rank0(self, tensors):
        """Overwrite ``tensors`` (the same list on every rank) in place with rank 0's values,
        coalesced per device as DDP's constructor and its broadcast_buffers do."""
        import torch.distributed as dist
        by_device = {}
        for t in tensors:
            by_device.setdefault(t.device, []).append(t.detach())
        with torch.no_grad():
            for dev_tensors in by_device.values():
                dist._broadcast_coalesced(self.group, dev_tensors, 256 * 1024 * 1024, 0)

    def global_items(self, items: int) -> int:
        """The sum over ranks of ``items`` (the micro-batches' items of one accumulation cycle)."""
        import torch.distributed as dist
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl"
                  else torch.device("cpu"))        # NCCL reduces CUDA tensors only
        t = torch.tensor([items], dtype=torch.int64, device=device)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def failure(self, e: BaseException) -> BaseException:
        """The error to raise for ``e``, raised while this rank ran a step; marks the step failed."""
        self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if isinstance(e, RuntimeError) and _is_comm_failure(e):
            return CommError(f"rank {self.rank}: the all-reduce of the trained gradients failed: another rank "
                             f"crashed, left or timed out ({str(e).splitlines()[0][:300]})")
        return e


def _is_comm_failure(e: BaseException) -> bool:
    """A collective's error (a peer gone or too slow), not one of the program's own ops."""
    text = str(e)
    return any(k in text for k in ("gloo/transport", "Connection closed", "Connection reset", "Connection refused",
                                   "Timed out", "timed out", "NCCL error", "ncclRemoteError", "Broken pipe",
                                   "ProcessGroupGloo", "ProcessGroupNCCL"))


def functional_program(gm):
    """A copy of ``gm`` for a compiler that functionalizes (Inductor): each ``all_reduce_`` as the
    out-of-place ``all_reduce`` and :func:`wait` as ``wait_tensor``. The same program: nothing
    reads a reduced buffer except through its wait (passes/allreduce.py)."""
    c = _functional()
    if not any(n.op == "call_function" and (n.target is c.all_reduce_.default or n.target is wait)
               for n in gm.graph.nodes):
        return gm
    graph, env = torch.fx.Graph(), {}
    for n in gm.graph.nodes:
        new = graph.node_copy(n, lambda a: env[a])
        if new.op == "call_function" and new.target is c.all_reduce_.default:
            new.target = c.all_reduce.default
        elif new.op == "call_function" and new.target is wait:
            new.target = wait_op()
        env[n] = new
    return torch.fx.GraphModule(gm, graph)
