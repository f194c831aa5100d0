"""Memory of a compiled step: the planned peak, its breakdown, and a measurement to check it.

``step.memory.peak_bytes`` is the planned peak of *writable* memory (DESIGN.md: trained weights,
optimizer state, buffers the step writes, the batch, saved activations, gradients and
temporaries); frozen weights are read-only and reported apart (``readonly_bytes``).
``step.memory.measure(*batch)`` runs one real training step and returns the same quantity
measured: the writable inputs' bytes plus the peak of the step's new allocations *at the
allocator*, the scratch kernels allocate inside themselves included (CPU: torch.profiler's
allocation events, runtime/memory.py AllocatorPeakTracker; CUDA: ``max_memory_allocated``) --
the figure the planned peak, with its ``workspace`` storages, bounds.
``measure(*batch, allocator=False)`` (``measure_storage``) tracks live tensor storage instead,
exactly (runtime/memory.py CpuPeakTracker): that equals the plan less its workspaces.
"""
from __future__ import annotations

import torch

from pockc.errors import BudgetError

from pockc.runtime.memory import format_bytes, parse_size  # noqa: F401  (format_bytes: used across pockc)


def parse_bytes(text) -> int:
    """``"256KB"`` -> 262144. B, KB/MB/GB (binary, 1024) and KiB/MiB/GiB, any case; an int is bytes.
    A BudgetError for anything else.

    >>> parse_bytes("256KB"), parse_bytes("1.5 MiB"), parse_bytes(4096)
    (262144, 1572864, 4096)
    """
    try:
        return parse_size(text)
    except ValueError as e:
        raise BudgetError(str(e)) from None


class StepMemory:
    """``step.memory``: the plan of the compiled step (for its example batch shapes)."""

    def __init__(self, step, plan, before=None, schedule=None):
        self._step = step
        self.plan = plan                        # passes.plan_memory.MemoryPlan
        self.peak_before_scheduling = before    # planned peak with updates at the end, traced order
        self.schedule = schedule or {}          # schedule_memory's choice and candidate peaks

    @property
    def peak_bytes(self) -> int:
        return self.plan.peak_bytes

    @property
    def breakdown(self) -> dict:
        return dict(self.plan.breakdown)

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def required_bytes(self) -> int:
        """What a static allocation needs: the peak, or the arena where fragmentation exceeds it."""
        return self.plan.required_bytes

    @property
    def readonly_bytes(self) -> int:
        return self.plan.readonly_bytes

    @property
    def paged_bytes(self) -> int:
        """Bytes held in the slow tier (paged optimizer state, paged activations' pools): not in
        ``peak_bytes`` or the budget."""
        return self.plan.paged_bytes

    @property
    def workspace_bytes(self) -> int:
        """Kernel scratch alive at the peak (part of ``peak_bytes``)."""
        return self.plan.breakdown.get("workspace", 0)

    def measure(self, *batch, allocator: bool = True) -> int:
        """Run one real training step on ``batch`` (parameters are updated, as by ``step(*batch)``)
        and return its measured peak of writable memory in bytes: the writable inputs plus the
        peak of the step's new allocations at the allocator, kernel scratch included (the figure
        ``peak_bytes``, workspaces included, bounds; DESIGN.md). ``allocator=False`` measures live
        tensor storage instead (runtime/memory.py CpuPeakTracker: exact, but blind to scratch a
        kernel allocates inside itself; it equals the plan without its workspaces). On CUDA both
        are ``max_memory_allocated``. Where the allocator cannot be measured (another
        torch.profiler session is active) this warns and measures tensor storage. Sets
        ``last_loss``, ``last_measured``, ``last_measured_transient`` (the step's part) and
        ``last_measured_at`` ("allocator" or "storage"). With gradient accumulation a call is one
        micro-batch, and the K-th call of a cycle also runs the update: the planned peak is that
        call's (the worst), so measure on it to compare (``step.micro_step == K - 1`` before)."""
        from pockc.runtime.memory import storage_bytes, track_peak

        step = self._step
        gm = step._graph_for(batch)
        items = step._items(batch)
        inputs = step.inputs(batch, items)
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor) and t.device.type != "cpu"),
                      torch.device("cpu"))
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        by_name = {s.name: s for s in self.plan.storages if s.persistent}
        whole, base = [], 0        # writable inputs, counted once per storage
        for ph, t in zip(phs, inputs):
            s = by_name.get(ph.name)
            if s is None or s.kind in ("frozen weight", "constant", "paged"):   # paged: in the slow tier
                continue
            rest = by_name.get(ph.name + " (frozen rows)")
            if rest is not None:   # channel-sparse: only the trained rows are writable
                base += t.untyped_storage().nbytes() - rest.nbytes
            else:
                whole.append(t)
        base += storage_bytes(whole)
        step._sync_buffers(inputs)            # data parallel: as a call does, before the program
        step._executable(gm, inputs)           # built (and a backend lowered) outside the measurement
        if getattr(step, "accumulate", 1) > 1 and step.micro_step + 1 >= step.accumulate:
            step._executable(gm.meta["pockc.apply"], inputs)
        if allocator and device.type == "cpu" and torch.autograd.profiler._is_profiler_enabled:
            import warnings
            warnings.warn("pockc: a torch.profiler session is active, so step.memory.measure() measures live "
                          "tensor storage (kernel scratch not included) instead of the allocator", stacklevel=2)
            allocator = False
        with torch.no_grad(), track_peak(device, allocator=allocator) as tracker:
            self.last_loss = step._run(gm, inputs, items)
        self.last_measured_transient = tracker.peak
        self.last_measured = base + tracker.peak
        self.last_measured_at = "allocator" if allocator or device.type != "cpu" else "storage"
        return self.last_measured

    def measure_allocator(self, *batch) -> int:
        """``measure(*batch, allocator=True)``: one real step, its peak at the allocator."""
        return self.measure(*batch, allocator=True)

    def measure_storage(self, *batch) -> int:
        """``measure(*batch, allocator=False)``: one real step, its peak of live tensor storage."""
        return self.measure(*batch, allocator=False)

    def table(self, budget: int | None = None) -> str:
        return self.plan.table(budget)

    def summary(self, budget: int | None = None) -> str:
        lines = [f"planned peak {format_bytes(self.peak_bytes)} of writable memory"
                 + (f" against a budget of {format_bytes(budget)}" if budget is not None else ""),
                 f"arena {format_bytes(self.arena_bytes)}; frozen weights (read-only) "
                 f"{format_bytes(self.readonly_bytes)}"]
        if self.peak_before_scheduling is not None:
            lines.append(f"peak before scheduling {format_bytes(self.peak_before_scheduling)} -> after "
                         f"{format_bytes(self.peak_bytes)} (order: {self.schedule.get('policy', 'traced')})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.plan.to_dict().items() if k != "storages"}
        d["peak_before_scheduling"] = self.peak_before_scheduling
        d["schedule"] = self.schedule
        d["storages"] = [s.to_dict() for s in self.plan.storages]
        return d

    def __repr__(self):
        return f"StepMemory(peak_bytes={self.peak_bytes:,}, arena_bytes={self.arena_bytes:,})"
