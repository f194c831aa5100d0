"""Kernel workspaces (passes/workspace.py, plan_memory's ``workspace`` kind): the planned peak
bounds the peak at the allocator -- kernel scratch (oneDNN's reorders in convolutions, batch-norm
backward's buffers, wrapped Python numbers) included -- on budgeted zoo configurations; a
workspace storage is alive at its node only; measurement is cached per call signature and does
not move the random stream. Deterministic: byte counts only, no timing."""
import copy

import numpy as np
import pytest
import torch

import pockc
from pockc.passes import workspace
from pockc.passes.plan_memory import check_arena, plan_memory, storages_of
from pockc.passes.rematerialize import _liveness
from pockc.zoo import ZOO

SGD = dict(lr=0.01, momentum=0.9)
CHANNELS = {"features.*": "channels:0.5", "fc.*": "full"}

CONFIGS = [
    ("mlp", "full"), ("mlp", "last:1"),
    ("small_cnn", "full"), ("small_cnn", "bias"), ("small_cnn", CHANNELS), ("small_cnn", "head"),
    ("mobilenet_v2", "bias"), ("mobilenet_v2", "last:1"), ("mobilenet_v2", "head"),
    ("resnet", "full"), ("resnet", "bias"), ("resnet", "head"),
    ("bert", "full"), ("bert", "last:1"),
]


def _compile(name, update, budget=None, **kw):
    ex = ZOO[name]()
    opt = pockc.AdamW(lr=1e-3) if name in ("bert", "llama") else pockc.SGD(**SGD)
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update=update, optimizer=opt,
                         budget=budget, **kw)
    return ex, step


@pytest.mark.parametrize("name,update", CONFIGS, ids=[f"{n}-{u if isinstance(u, str) else 'channels'}"
                                                      for n, u in CONFIGS])
def test_planned_bounds_allocator_peak_at_a_tight_budget(name, update):
    ex, free = _compile(name, update)
    budget = free.memory.plan.required_bytes            # the tightest budget this plan meets
    _, step = _compile(name, update, budget=budget)
    planned = step.memory.peak_bytes
    assert planned <= budget
    for _ in range(2):                                  # first and later steps alike
        measured = step.memory.measure(*ex.example_batch)
        assert step.memory.last_measured_at == "allocator"
        assert measured == planned, (measured, planned, step.memory.breakdown)   # equal to the byte
    storage = step.memory.measure(*ex.example_batch, allocator=False)   # live tensors only
    assert step.memory.last_measured_at == "storage"
    assert storage <= measured


def test_budget_driven_selection_bounds_allocator_peak():
    ex = ZOO["small_cnn"]()
    _, full = _compile("small_cnn", "full")
    budget = (full.memory.peak_bytes + full.memory.plan.persistent_bytes) // 2
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, optimizer=pockc.SGD(**SGD),
                         budget=budget)
    assert step.selection is not None and step.memory.plan.required_bytes <= budget
    assert step.selection.peak == step.memory.plan.required_bytes          # selection priced with workspaces
    assert step.memory.measure(*ex.example_batch) <= step.memory.peak_bytes <= budget


def test_rematerialized_step_bounds_allocator_peak():
    ex, full = _compile("resnet", "full")
    m = full.memory.plan
    budget = int(m.persistent_bytes + 0.8 * (m.required_bytes - m.persistent_bytes))
    _, step = _compile("resnet", "full", budget=budget, remat="recompute")
    assert step.remat is not None and step.remat.fits
    assert step.memory.plan.required_bytes <= budget
    assert step.memory.plan.by_kind("workspace")          # remat's plan carries the workspaces too
    assert step.memory.measure(*ex.example_batch) <= step.memory.peak_bytes


def test_small_cnn_has_convolution_workspace():
    _, step = _compile("small_cnn", "full")
    plan = step.memory.plan
    assert plan.breakdown.get("workspace", 0) > 0
    assert step.memory.workspace_bytes == plan.breakdown["workspace"]
    assert sum(plan.breakdown.values()) == plan.peak_bytes
    targets = {n.name: n.target for n in step.graph.graph.nodes}
    ws_ops = {targets[s.name.removesuffix(" (workspace)")] for s in plan.by_kind("workspace")}
    aten = torch.ops.aten
    assert ws_ops & {aten.convolution.default, aten.convolution_backward.default}
    assert "workspace" in plan.table()


def test_without_workspaces_the_plan_is_below_the_allocator(monkeypatch):
    """The bug this fixes: live tensors alone undercount what the allocator hands out."""
    ex, step = _compile("small_cnn", "full")
    gm = step._graph_for(ex.example_batch)
    monkeypatch.setenv("POCKC_WORKSPACE", "0")
    without = plan_memory(gm, step.layout).peak_bytes
    monkeypatch.delenv("POCKC_WORKSPACE")
    measured = step.memory.measure(*ex.example_batch)
    assert without < measured <= step.memory.peak_bytes
    assert without == step.memory.measure(*ex.example_batch, allocator=False)


def test_workspace_storage_is_alive_at_its_node_only():
    _, step = _compile("resnet", "bias")
    gm, layout = step.graph, step.layout
    nodes = list(gm.graph.nodes)
    storages, root, made = storages_of(gm.graph, layout)
    ws = [s for s in storages if s.kind == "workspace"]
    assert ws
    in_root = {id(s) for r in root.values() for s in (r if isinstance(r, list) else [r]) if s is not None}
    in_made = {id(s) for ss in made.values() for s in ss}
    for s in ws:
        node = nodes[s.start]
        assert s.end == s.start and not s.persistent and s.nbytes > 0
        assert s.name == f"{node.name} (workspace)" and node.op == "call_function"
        assert id(s) not in in_root and id(s) not in in_made        # nothing reads a workspace
    # the plan's timeline is the one without workspaces plus each node's workspace, at that node only
    plan = plan_memory(gm, layout)
    base, _, _ = storages_of(gm.graph, layout, workspaces=False)
    assert len(base) == len(storages) - len(ws)
    by_pos = {s.start: s.nbytes for s in ws}
    live0, _ = _liveness(nodes, *storages_of(gm.graph, layout, workspaces=False)[:2])
    diff = np.asarray(plan.timeline) - live0
    assert all(int(d) == by_pos.get(i, 0) for i, d in enumerate(diff))
    check_arena(plan)                                     # placed in the arena, overlapping nothing
    assert all(s.offset is not None for s in plan.by_kind("workspace"))


def test_measurement_is_cached_per_signature_and_keeps_the_rng():
    ex, step = _compile("bert", "full")                   # dropout: random ops in the graph
    nodes = list(step.graph.graph.nodes)
    assert any(torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())
               for n in nodes if n.op == "call_function")
    sigs = {workspace.signature(n) for n in nodes if n.op == "call_function"} - {None}
    for s in sigs:
        workspace._CACHE.pop(s, None)
    before, state = workspace.STATS["measured"], torch.get_rng_state()
    first = workspace.call_peaks(nodes)
    assert workspace.STATS["measured"] - before == len(sigs)  # one call per distinct signature
    assert torch.equal(torch.get_rng_state(), state)         # random ops did not move the stream
    again = workspace.call_peaks(nodes)
    assert workspace.STATS["measured"] - before == len(sigs)  # cached: nothing measured again
    assert again == first


def test_views_and_getitem_are_not_measured():
    _, step = _compile("mlp", "full")
    for n in step.graph.graph.nodes:
        if n.op == "call_function" and (str(n.target).startswith(("aten.t.", "aten.view.")) or
                                        n.target.__name__ == "getitem"):
            assert workspace.signature(n) is None, n


def test_measure_under_a_running_profiler_falls_back_to_storage():
    ex, step = _compile("mlp", "last:1")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        with pytest.warns(UserWarning, match="torch.profiler session is active"):
            measured = step.memory.measure(*ex.example_batch)
    assert step.memory.last_measured_at == "storage" and measured <= step.memory.peak_bytes


def test_ops_reading_opaque_buffers_are_not_run():
    aten = torch.ops.aten
    if hasattr(aten, "mkldnn_rnn_layer_backward"):       # reads the forward's oneDNN workspace
        assert not workspace._safe(aten.mkldnn_rnn_layer_backward.default)
    assert workspace._safe(aten.convolution_backward.default) and workspace._safe(aten.mm.default)


@pytest.mark.parametrize("batch", [4, 32])
def test_an_output_storage_larger_than_its_tensor_is_planned(batch):
    """aten.mse_loss returns its 0-d loss inside a storage of the input's size; the loss lives for
    the whole step, so the plan must count that storage, not 4 bytes (it was 60 bytes short)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    x, y = torch.randn(batch, 8), torch.randn(batch, 4)
    step = pockc.compile(m, lambda m, x, y: F.mse_loss(m(x), y), (x, y), update="full", optimizer=pockc.SGD(lr=0.01))
    assert step.memory.measure(x, y) == step.memory.peak_bytes
    assert step.memory.measure(x, y, allocator=False) <= step.memory.peak_bytes
