"""Paging saved activations (runtime/paging.py, passes/rematerialize.py's third choice) and device
profiles (pockc/remat_cost.py, pockc/profiles/): the paged step matches eager PyTorch, the plan
bounds the measured peak, the page calls sit where the plan says, and profiles steer the choice."""
import copy
import json

import pytest
import torch

import pockc
from pockc import zoo
from pockc.passes.rematerialize import _Graph, _milp
from pockc.remat_cost import CostModel, load_profile, profiles
from pockc.runtime import paging
from tests.oracle import assert_match, eager_steps

OPT = dict(lr=0.01, momentum=0.9)
PLAIN = dict(lr=0.01)

# A device whose page tier is as fast as its compute is slow: the planner should page first.
FAST_PAGE = {"name": "fast-page", "compute": {"flop_rate": 1e8, "overhead": 1e-5},
             "memory": {"ram": {"bandwidth": 1e9},
                        "page": {"write_bandwidth": 1e12, "read_bandwidth": 1e12, "overlap": 1.0}}}
NO_PAGE = {"name": "no-tier", "compute": {"flop_rate": 1e10}, "memory": {"ram": {"bandwidth": 1e10}}}


def _p0(ex, opt=OPT):
    step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full",
                         optimizer=pockc.SGD(**opt))
    m = step.memory.plan
    return m.required_bytes, m.persistent_bytes


def _page_nodes(gm, fn=None):
    return [n for n in gm.graph.nodes if "pockc.page" in n.meta and (fn is None or n.target is fn)]


def test_runtime_roundtrip_cpu():
    xs = [torch.randn(1000), torch.arange(24, dtype=torch.int64).view(4, 6).t(), torch.randn(3, 5)[:, 1:]]
    key, offs, total = "test-roundtrip", [0, 4096, 8192], 16384
    sizes = [x.untyped_storage().nbytes() for x in xs]
    slots = [paging.page_out(x, key, o, n, total) for x, o, n in zip(xs, offs, sizes)]
    for s, x in zip(slots, xs):
        paging.page_out_wait(s, x, key)
    bufs = [paging.page_in(s, key, o, n, total, "cpu") for s, o, n in zip(slots, offs, sizes)]
    for b, x, o in zip(bufs, xs, offs):
        b = paging.page_in_wait(b, key, o)
        y = b.view(x.dtype).as_strided(x.shape, x.stride(), x.storage_offset())
        assert torch.equal(y, x)
    paging.release(key)
    assert key not in paging._POOLS


@pytest.mark.parametrize("name", ["bert", "mobilenet_v2", "llama"])
def test_paged_step_matches_eager(name):
    """Dropout masks (bert), in-place BN + ReLU storages (mobilenet_v2), RoPE and attention (llama).
    Plain SGD: no optimizer state the solver could page instead (tests/test_paged_state.py pages that)."""
    ex = zoo.ZOO[name]()
    p0, persist = _p0(ex, PLAIN)
    budget = int(persist + 0.75 * (p0 - persist))
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    opt = pockc.SGD(**PLAIN)
    step = pockc.compile(m_c, ex.loss_fn, ex.example_batch, update="full", optimizer=opt, budget=budget,
                         device_profile=FAST_PAGE)
    rep = step.remat
    assert rep.fits and rep.paged and not rep.recomputed, rep.table()
    assert "fast-page" in rep.table() and "tensors paged" in rep.table()
    gm = step.graph
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    outs, waits = _page_nodes(gm, paging.page_out), _page_nodes(gm, paging.page_out_wait)
    ins, in_waits = _page_nodes(gm, paging.page_in), _page_nodes(gm, paging.page_in_wait)
    assert len(outs) == len(waits) == len(ins) == len(in_waits) == len(rep.paged)
    for o in outs:          # out, its wait, in, its wait: in this order
        (w,) = [u for u in o.users if u.target is paging.page_out_wait]
        (i,) = [u for u in o.users if u.target is paging.page_in]
        (iw,) = list(i.users)
        assert pos[o] < pos[w] <= pos[i] < pos[iw]
        src = o.args[0]     # the forward is done with the paged storage before it is paged out
        fwd_readers = [u for u in src.users if u.meta.get("pockc.role") == "forward" and "pockc.page" not in u.meta]
        assert all(pos[u] < pos[o] for u in fwd_readers)
        first_bwd = min(pos[u] for u in iw.users)
        assert pos[iw] < first_bwd

    batches = [ex.example_batch] * 2
    torch.manual_seed(0)
    measured = step.memory.measure(*batches[0])
    planned = step.memory.peak_bytes
    assert measured == planned, (measured, planned)   # equal to the byte
    assert planned <= budget
    lc = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    torch.manual_seed(0)
    le = eager_steps(m_e, ex.loss_fn, batches, step.update_plan, opt)
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_match(m_c, m_e, ex.model, step.update_plan, rtol=1e-4, atol=1e-5)


def test_paging_survives_a_new_batch_shape():
    ex = zoo.llama()
    p0, persist = _p0(ex)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(**OPT),
                         budget=int(persist + 0.75 * (p0 - persist)), device_profile=FAST_PAGE)
    ids, labels = ex.example_batch
    with pytest.warns(UserWarning, match="batch shapes or constants differ"):
        loss = step(ids[:1], labels[:1])
    assert torch.isfinite(loss)
    gm = step._graph_for((ids[:1], labels[:1]))
    assert len(_page_nodes(gm, paging.page_in)) == len(step.remat.paged)


def test_recompute_only_and_no_tier_do_not_page():
    ex = zoo.resnet()
    p0, persist = _p0(ex)
    budget = int(persist + 0.75 * (p0 - persist))
    for kw in (dict(remat="recompute", device_profile=FAST_PAGE), dict(device_profile=NO_PAGE)):
        step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full",
                             optimizer=pockc.SGD(**OPT), budget=budget, **kw)
        assert step.remat.fits and step.remat.recomputed and not step.remat.paged
        assert not _page_nodes(step.graph)


def test_milp_chooses_one_mode_per_storage():
    pytest.importorskip("scipy")
    ex = zoo.resnet()
    p0, persist = _p0(ex)
    base = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(**OPT))
    G = _Graph(base.graph.graph, base.layout, CostModel.from_profile(FAST_PAGE))
    cands, _ = G.candidates(page=True)
    both = {c.sid for c in cands if c.mode == "page"} & {c.sid for c in cands if c.mode == "recompute"}
    assert both
    chosen, ok = _milp(G, cands, persist + 0.55 * (p0 - persist), time_limit=5.0)
    assert ok
    sids = [c.sid for c in chosen]
    assert len(sids) == len(set(sids))


def test_bundled_profiles_load_and_order_sensibly():
    names = profiles()
    assert {"mcu-cortex-m7", "raspberry-pi-4", "jetson-nano", "cuda-h100", "x86-cpu"} <= set(names)
    models = {n: CostModel.from_profile(n) for n in names}
    assert models["mcu-cortex-m7"].flop_rate < models["raspberry-pi-4"].flop_rate < models["cuda-h100"].flop_rate
    for n, m in models.items():
        assert m.can_page and m.page_read_rate > 0 and m.energy_per_flop > 0, n
        assert CostModel.from_profile(n, objective="energy").objective == "energy"
    x86 = models["x86-cpu"]             # the JSON matches the built-in CPU defaults
    d = CostModel()
    assert (x86.flop_rate, x86.byte_rate, x86.page_write_rate, x86.page_overlap) == \
        (d.flop_rate, d.byte_rate, d.page_write_rate, d.page_overlap)


def test_profile_costs_follow_the_device():
    """A slow page tier (microSD) makes paging dear next to recomputation; a fast one cheap."""
    pi, fast = CostModel.from_profile("raspberry-pi-4"), CostModel.from_profile(FAST_PAGE)
    nbytes = 1 << 20
    assert pi.page_seconds(nbytes) > 0.05 > fast.page_seconds(nbytes)
    hidden, exposed = pi.page_seconds(nbytes, 1.0, 1.0), pi.page_seconds(nbytes)
    assert hidden < exposed                 # compute beside the copies hides part of them
    e = CostModel.from_profile("raspberry-pi-4", objective="energy")
    assert e.page_joules(nbytes) > 0 and e.page_cost(nbytes) == pytest.approx(e.page_joules(nbytes))


def test_bad_profiles_are_clear_errors(tmp_path):
    ex = zoo.mlp()
    with pytest.raises(pockc.CompileError, match="no device profile 'toaster'"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, budget="1MB", device_profile="toaster")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(pockc.CompileError, match="not valid JSON"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, budget="1MB", device_profile=str(bad))
    bad.write_text(json.dumps({"compute": {}}))
    with pytest.raises(pockc.CompileError, match="flop_rate"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, budget="1MB", device_profile=str(bad))
    with pytest.raises(pockc.CompileError, match="no energy figures"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, budget="1MB", device_profile=NO_PAGE,
                      objective="energy")
    with pytest.raises(ValueError, match="objective"):
        CostModel(objective="speed")
    assert load_profile("jetson-nano")["name"] == "jetson-nano"


def test_cli_device_profile(tmp_path):
    from tests.test_cli import EXAMPLE, run
    out = tmp_path / "b"
    r = run("compile", EXAMPLE, "--update", "full", "--budget", "3.2MB", "--device-profile", "x86-cpu",
            "--steps", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "x86-cpu, minimizing time" in r.stdout and "tensors paged" in r.stdout
    plan = json.loads((out / "plan.json").read_text())
    code = (out / "train_step.py").read_text()
    if plan["remat"]["paged"]:        # the emitted program imports the runtime calls it makes
        assert "from pockc.runtime.paging import page_out as" in code
    compile(code, "train_step.py", "exec")
    r = run("compile", EXAMPLE, "--budget", "3.2MB", "--device-profile", "toaster", "-o", str(out))
    assert r.returncode == 2 and "no device profile 'toaster'" in r.stderr and "Traceback" not in r.stderr
    r = run("compile", EXAMPLE, "--update", "full", "--budget", "3.2MB", "--objective", "energy",
            "--device-profile", "raspberry-pi-4", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "raspberry-pi-4, minimizing energy" in r.stdout and "added energy" in r.stdout
