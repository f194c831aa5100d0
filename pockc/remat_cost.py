"""Cost model for rematerialization: what re-running one aten op, or paging a tensor, costs.

``CostModel.seconds(node)`` is a roofline estimate from the node's fake values: the larger of FLOPs over a
compute rate and bytes moved (inputs read + outputs written) over a memory bandwidth, plus a fixed
per-op dispatch overhead. FLOPs come from shapes for the ops that dominate training graphs
(``mm``/``addmm``/``bmm``/``convolution``/attention: 2 x multiply-adds; normalizations: a few per
element) and are one per output element for everything else; views cost only the dispatch.

The rates are CPU defaults (``CostModel()``, fixed so that compiles are reproducible);
``CostModel.calibrate()`` times a matmul, a copy and a tiny op on the current machine
(``POCKC_REMAT_CALIBRATE=1`` makes the pass use it). The pass only compares costs with each
other, so the absolute scale matters only for the report (seconds of added work per step).

Device profiles (``pockc/profiles/*.json``, ``CostModel.from_profile``, ``pockc compile
--device-profile``) describe a device one is *not* running on -- its compute rate, its RAM and
the slower tier it can page to, with energy per FLOP and per byte -- so a plan can be made for a
microcontroller, a Raspberry Pi or a Jetson from a workstation, minimizing time or energy.
"""
from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

aten = torch.ops.aten

_MATMUL = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
_NORM = {aten.native_batch_norm.default, aten.native_layer_norm.default, aten.native_group_norm.default}
_FREE = {aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
         aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
         aten.select.int, aten.slice.Tensor, aten.alias.default, aten.detach.default, aten.split.Tensor}


def _tensors(x):
    return [v for v in torch.utils._pytree.tree_leaves(x) if isinstance(v, torch.Tensor)]


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def flops(node: fx.Node) -> float:
    """Floating-point operations of one run of ``node`` (multiply-add = 2)."""
    if node.op != "call_function" or node.target is operator.getitem or node.target in _FREE:
        return 0.0
    outs = _tensors(node.meta.get("val"))
    out_numel = sum(t.numel() for t in outs)
    t = node.target
    try:
        if t in _MATMUL:
            a = _val(node.args[1] if t in (aten.addmm.default, aten.baddbmm.default) else node.args[0])
            k = a.shape[-1]
            return 2.0 * outs[0].numel() * k
        if t is aten.convolution.default:
            w = _val(node.args[1])
            per_out = math.prod(w.shape[1:])     # (Cin / groups) * kernel elements
            return 2.0 * outs[0].numel() * per_out
        if "scaled_dot_product" in str(t):
            q, k = _val(node.args[0]), _val(node.args[1])
            return 4.0 * q.numel() * k.shape[-2]
        if t in _NORM:
            return 8.0 * outs[0].numel()
    except (AttributeError, IndexError, TypeError):
        pass
    return float(out_numel)


def bytes_moved(node: fx.Node) -> float:
    """Bytes read (tensor inputs) plus bytes written (tensor outputs)."""
    if node.op != "call_function" or node.target is operator.getitem or node.target in _FREE:
        return 0.0
    ins = [t for a in node.all_input_nodes for t in _tensors(a.meta.get("val"))]
    outs = _tensors(node.meta.get("val"))
    return float(sum(t.numel() * t.element_size() for t in ins + outs))


@dataclass
class CostModel:
    """What it costs to recompute an op or to page a tensor out and back.

    Time: an op takes ``max(flops / flop_rate, bytes / byte_rate) + overhead`` seconds; a paged
    tensor's copies take ``nbytes / page_write_rate`` out and ``nbytes / page_read_rate`` back in,
    and run beside the compute between their start and their wait: ``page_overlap`` of a copy is
    hidden when that window's compute is at least as long as the copy (1.0 for a DMA engine, about
    0.5 for a CPU thread that shares the cores), the rest is added. Energy: ``energy_per_flop`` J
    per FLOP and ``energy_per_byte`` J per byte of memory traffic, ``page_energy_per_byte`` J per
    byte written to the slower tier plus the same read back. ``objective`` ("time" or "energy")
    says which of the two the planner minimizes; reports give both where known.
    """
    flop_rate: float = 20e9       # FLOP/s  (one or two x86 cores, fp32)
    byte_rate: float = 5e9        # B/s
    overhead: float = 10e-6       # s per op (dispatch + the generated Python code)
    page_write_rate: float = 2e9  # B/s into the page tier (here: a file mapping in the page cache)
    page_read_rate: float = 2e9   # B/s back
    page_overlap: float = 0.5     # fraction of a copy hidden behind compute (a thread on shared cores)
    energy_per_flop: float = 0.0  # J/FLOP (0: unknown)
    energy_per_byte: float = 0.0  # J per byte of RAM traffic
    page_energy_per_byte: float = 0.0
    objective: str = "time"
    name: str = "default"
    can_page: bool = True         # the device has a tier to page to

    def __post_init__(self):
        if self.objective not in ("time", "energy"):
            raise ValueError(f"objective must be 'time' or 'energy', not {self.objective!r}")
        if self.objective == "energy" and not (self.energy_per_flop or self.energy_per_byte):
            raise ValueError(f"device profile {self.name!r} has no energy figures (energy_per_flop, "
                             f"energy_per_byte): cannot minimize energy")

    def seconds(self, node: fx.Node) -> float:
        if node.op != "call_function" or node.target is operator.getitem:
            return 0.0
        return max(flops(node) / self.flop_rate, bytes_moved(node) / self.byte_rate) + self.overhead

    def joules(self, node: fx.Node) -> float:
        if node.op != "call_function" or node.target is operator.getitem:
            return 0.0
        return flops(node) * self.energy_per_flop + bytes_moved(node) * self.energy_per_byte

    def __call__(self, node: fx.Node) -> float:
        """The cost of re-running ``node`` in the objective's unit."""
        return self.joules(node) if self.objective == "energy" else self.seconds(node)

    def page_seconds(self, nbytes: int, window_out: float = 0.0, window_in: float = 0.0) -> float:
        """Time a page out + in adds to the step, given the compute seconds beside each copy."""
        t = 0.0
        for copy, window in ((nbytes / self.page_write_rate, window_out), (nbytes / self.page_read_rate, window_in)):
            hidden = self.page_overlap * min(copy, window)
            t += copy - hidden
        return t + 4 * self.overhead

    def page_joules(self, nbytes: int) -> float:
        return nbytes * (2 * self.page_energy_per_byte + 2 * self.energy_per_byte)

    def page_cost(self, nbytes: int, window_out: float = 0.0, window_in: float = 0.0) -> float:
        return self.page_joules(nbytes) if self.objective == "energy" else self.page_seconds(nbytes, window_out, window_in)

    @classmethod
    def from_profile(cls, profile, objective: str | None = None) -> "CostModel":
        """A cost model from a device profile: a bundled name (``pockc.remat_cost.PROFILES``), a
        path to a JSON file, or a dict (see pockc/profiles/README.md for the fields)."""
        d = load_profile(profile)
        c = d.get("compute", {})
        ram = d.get("memory", {}).get("ram", {})
        tier = d.get("memory", {}).get("page", {})
        kw = dict(name=d.get("name", "profile"), flop_rate=float(c["flop_rate"]),
                  overhead=float(c.get("overhead", 10e-6)),
                  energy_per_flop=float(c.get("energy_per_flop", 0.0)),
                  byte_rate=float(ram["bandwidth"]), energy_per_byte=float(ram.get("energy_per_byte", 0.0)),
                  objective=objective or d.get("objective", "time"))
        if tier:
            kw.update(page_write_rate=float(tier.get("write_bandwidth", tier.get("bandwidth"))),
                      page_read_rate=float(tier.get("read_bandwidth", tier.get("bandwidth"))),
                      page_overlap=float(tier.get("overlap", 0.5)),
                      page_energy_per_byte=float(tier.get("energy_per_byte", 0.0)))
        else:
            kw["can_page"] = False
        return cls(**kw)

    @classmethod
    def calibrate(cls, n: int = 256, repeat: int = 5) -> "CostModel":
        """Time a matmul, a large copy and a tiny op here to set the rates and the per-op
        overhead (about 20 ms)."""
        import time
        a, b = torch.randn(n, n), torch.randn(n, n)
        x = torch.randn(1 << 20)
        s = torch.randn(16)
        best_mm = best_cp = best_op = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.ops.aten.mm.default(a, b)
            best_mm = min(best_mm, time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.ops.aten.clone.default(x)
            best_cp = min(best_cp, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(100):
                torch.ops.aten.add.Tensor(s, s)
            best_op = min(best_op, (time.perf_counter() - t0) / 100)
        bw = 2.0 * x.numel() * 4 / best_cp
        return cls(flop_rate=2.0 * n ** 3 / best_mm, byte_rate=bw, overhead=best_op,
                   page_write_rate=bw / 2, page_read_rate=bw / 2, name="calibrated")


_DEFAULT = []
_PROFILE_DIR = Path(__file__).parent / "profiles"


def profiles() -> dict:
    """Bundled device profiles: name -> its description."""
    out = {}
    for f in sorted(_PROFILE_DIR.glob("*.json")):
        out[f.stem] = json.loads(f.read_text()).get("description", "")
    return out


def load_profile(profile) -> dict:
    """A device profile as a dict, from a bundled name, a JSON file path or a dict; ValueError
    (naming what is wrong) for anything else."""
    if isinstance(profile, dict):
        d = profile
    else:
        p = Path(profile)
        if not p.suffix and (_PROFILE_DIR / f"{profile}.json").exists():
            p = _PROFILE_DIR / f"{profile}.json"
        if not p.exists():
            raise ValueError(f"no device profile {str(profile)!r}: give a JSON file or one of "
                             f"{', '.join(profiles())}")
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"device profile {str(p)!r} is not valid JSON: {e}") from None
    try:
        float(d["compute"]["flop_rate"]), float(d["memory"]["ram"]["bandwidth"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("a device profile needs compute.flop_rate (FLOP/s) and memory.ram.bandwidth "
                         "(B/s); see pockc/profiles/README.md") from None
    return d


def default_cost_model(device_type: str = "cpu") -> CostModel:
    """The fixed defaults for the device type (compiles are reproducible: the same model and
    budget give the same graph on every machine), or, with ``POCKC_REMAT_CALIBRATE=1`` on CPU,
    rates timed on this machine once per process."""
    import os
    if device_type == "cuda":
        return CostModel.from_profile("cuda-h100")
    if os.environ.get("POCKC_REMAT_CALIBRATE") == "1":
        if not _DEFAULT:
            _DEFAULT.append(CostModel.calibrate())
        return _DEFAULT[0]
    return CostModel()
