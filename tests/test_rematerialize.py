"""Rematerialization (passes/rematerialize.py, pockc.compile(..., remat=...)): full fine-tuning
under a budget below the no-recompute peak fits, the plan bounds the measured peak, parameters
equal eager autograd + torch.optim, recomputed nodes are in the graph; remat="off" and impossible
budgets are errors that name the numbers; greedy and MILP both give verified plans."""
import copy
import operator

import pytest
import torch

import pockc
from pockc import zoo
from pockc.passes.fx_utils import is_view, mutated_args
from pockc.passes.plan_memory import plan_memory
from pockc.passes.rematerialize import _Graph, _greedy, _milp, rematerialize
from pockc.remat_cost import CostModel, flops
from tests.oracle import assert_match, eager_steps

OPT = dict(lr=0.01, momentum=0.9)
_BASE = {}


def _baseline(name):
    """(no-remat planned memory, persistent bytes) of full fine-tuning, compiled once per model."""
    if name not in _BASE:
        ex = zoo.ZOO[name]()
        step = pockc.compile(copy.deepcopy(ex.model), ex.loss_fn, ex.example_batch, update="full",
                             optimizer=pockc.SGD(**OPT))
        m = step.memory.plan
        _BASE[name] = (m.required_bytes, m.persistent_bytes, step)
    return _BASE[name]


def _budget(name, frac):
    """``frac`` of the transient memory (activations, gradients, temporaries) on top of the
    persistent state: weights + momentum alone are most of a full fine-tuning step's peak."""
    req, persist, _ = _baseline(name)
    return int(persist + frac * (req - persist))


def _remat_nodes(gm):
    return [n for n in gm.graph.nodes if "pockc.remat" in n.meta]


def _page_nodes(gm):
    return [n for n in gm.graph.nodes if "pockc.page" in n.meta]


def _added_nodes(gm):
    """Every node rematerialize added: clones, page calls and saved generator states."""
    return [n for n in gm.graph.nodes if {"pockc.remat", "pockc.page", "pockc.rng_state"} & set(n.meta)]


@pytest.mark.parametrize("name,frac,mode", [("resnet", 0.6, "recompute"), ("bert", 0.6, "recompute"),
                                            ("llama", 0.6, "recompute"), ("small_cnn", 0.85, "recompute"),
                                            ("resnet", 0.6, "auto"), ("bert", 0.6, "auto")])
def test_full_finetune_fits_and_matches_eager(name, frac, mode):
    ex = zoo.ZOO[name]()
    budget = _budget(name, frac)
    assert budget < _baseline(name)[0]
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    opt = pockc.SGD(**OPT)
    step = pockc.compile(m_c, ex.loss_fn, ex.example_batch, update="full", optimizer=opt, budget=budget,
                         remat=mode)
    rep = step.remat
    assert rep is not None and rep.fits and (rep.recomputed or rep.paged or rep.paged_state)
    if mode == "recompute":
        assert not rep.paged and not rep.paged_state
    else:                                       # the default CPU model pages here
        assert rep.paged or rep.paged_state
    assert step.memory.peak_bytes <= step.memory.plan.required_bytes <= budget
    assert rep.peak_after == step.memory.peak_bytes and rep.bytes_saved > 0
    clones = _remat_nodes(step.graph)
    assert len(_added_nodes(step.graph)) == rep.nodes_added > 0
    for n in clones:            # clones are pure: no RNG, nothing written in place
        assert torch.Tag.nondeterministic_seeded not in n.target.tags if hasattr(n.target, "tags") else True
        assert not getattr(getattr(n.target, "_schema", None), "is_mutable", False)
    assert "recomputed" in rep.table()
    by_name = {n.name: n for n in step.graph.graph.nodes}
    for name_ in rep.recomputed + rep.paged:   # the original is read by the forward pass only now
        node = by_name[name_.split("[")[0]]
        late = [u for u in node.users if u.meta.get("pockc.role") in ("backward", "update")
                and "pockc.remat" not in u.meta and u.target is not operator.getitem]
        assert not late, (name_, late)

    batches = [ex.example_batch] * 2
    torch.manual_seed(0)
    measured = step.memory.measure(*batches[0])
    planned = step.memory.peak_bytes
    assert measured == planned, (measured, planned)   # equal to the byte
    lc = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    torch.manual_seed(0)
    le = eager_steps(m_e, ex.loss_fn, batches, step.update_plan, opt)
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_match(m_c, m_e, ex.model, step.update_plan, rtol=1e-4, atol=1e-5)


def test_remat_off_is_a_budget_error():
    ex = zoo.bert()
    with pytest.raises(pockc.BudgetError, match="over the budget"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(**OPT),
                      budget=_budget("bert", 0.6), remat="off")
    with pytest.raises(pockc.CompileError, match="remat"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, remat="always")


def test_impossible_budget_names_smallest_peak():
    ex = zoo.llama()
    weights = sum(p.numel() * p.element_size() for p in ex.model.parameters())
    with pytest.raises(pockc.BudgetError, match=r"recomputing or paging activations and paging optimizer state "
                                                r"brings it down only to .*smallest peak"):
        pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(**OPT),
                      budget=weights + 1024)   # the trained weights alone nearly fill it


def test_fitting_budget_recomputes_nothing():
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(**OPT),
                         budget="1MB")
    assert step.remat is None and not _remat_nodes(step.graph)


@pytest.mark.parametrize("solver", ["greedy", "milp"])
def test_solvers_give_verified_plans(solver):
    if solver == "milp":
        pytest.importorskip("scipy")
    _, _, base = _baseline("llama")
    budget = _budget("llama", 0.6)
    gm = copy.deepcopy(base.graph)
    res = rematerialize(gm, base.layout, budget, solver=solver)
    rep = res.graph_module.meta["pockc.remat"]
    assert res.modified and rep.fits and rep.solver == solver
    mp = plan_memory(res.graph_module, base.layout)
    assert mp.required_bytes <= budget and mp.required_bytes == rep.required_after
    res.graph_module.graph.lint()


def test_milp_cost_at_most_greedy():
    pytest.importorskip("scipy")
    _, _, base = _baseline("llama")
    G = _Graph(base.graph.graph, base.layout, CostModel())
    cands, _ = G.candidates()
    target = _budget("llama", 0.6)
    g_sel, g_ok = _greedy(G, cands, target)
    m_sel, m_ok = _milp(G, cands, target, time_limit=5.0)
    assert g_ok and m_ok
    cost = lambda sel: sum(c.cost for c in sel)  # noqa: E731  (the linear model both optimize)
    assert cost(m_sel) <= cost(g_sel) * (1 + 1e-6) + 1e-12


def test_new_batch_shape_replays_recomputation():
    ex = zoo.llama()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(**OPT),
                         budget=_budget("llama", 0.6))
    ids, labels = ex.example_batch
    with pytest.warns(UserWarning, match="batch shapes or constants differ"):
        loss = step(ids[:1], labels[:1])
    assert torch.isfinite(loss)
    gm = step._graph_for((ids[:1], labels[:1]))
    assert len(_added_nodes(gm)) == step.remat.nodes_added


def test_cost_model_counts_matmul_flops():
    _, _, base = _baseline("mlp")
    mm = next(n for n in base.graph.graph.nodes if n.target is torch.ops.aten.addmm.default)
    a, w = mm.args[1].meta["val"], mm.args[2].meta["val"]
    assert flops(mm) == 2 * a.shape[0] * a.shape[1] * w.shape[1]
    assert CostModel()(mm) > CostModel()(next(n for n in base.graph.graph.nodes if n.op == "placeholder"))


def test_cli_remat_option():
    from pockc.cli import build_parser
    args = build_parser().parse_args(["compile", "model.py", "--budget", "1MB", "--remat", "off"])
    assert args.remat == "off"
    assert build_parser().parse_args(["compile", "model.py"]).remat == "auto"


def test_dropout_masks_are_recomputed_by_replaying_the_generator():
    """Every recomputable storage of BERT recomputed, dropout masks included: the masks are drawn
    again from the saved generator state, the generator is restored (the second step's masks and
    a draw after the steps are eager's), and the step matches eager."""
    from pockc.runtime import rng
    ex = zoo.bert()
    opt = pockc.SGD(**OPT)
    m_c, m_e = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    step = pockc.compile(m_c, ex.loss_fn, ex.example_batch, update="full", optimizer=opt)
    G = _Graph(step.graph.graph, step.layout, CostModel())
    cands, _ = G.candidates()
    masks = [c for c in cands if any(G.spec(m) and G.spec(m)[0] is rng.replay
                                     for m in G.chain(c.targets, c.p, {c.sid})[0])]
    assert masks                                  # dropout masks are recomputable now
    gm = rematerialize(step.graph, step.layout, None, recompute=[c.name for c in cands]).graph_module
    replays = [n for n in gm.graph.nodes if n.target is rng.replay]
    states = [n for n in gm.graph.nodes if n.target is rng.rng_state]
    assert replays and states and all(n.meta["pockc.role"] == "forward" for n in states)
    for st in states:    # saved right before the original random op
        assert st.next.target is torch.ops.aten.bernoulli_.float
    batches = [ex.example_batch] * 2
    torch.manual_seed(0)
    measured = step.memory.measure(*batches[0])
    assert measured == plan_memory(gm, step.layout).peak_bytes
    lc = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    after_c = torch.rand(3)
    torch.manual_seed(0)
    le = eager_steps(m_e, ex.loss_fn, batches, step.update_plan, opt)
    after_e = torch.rand(3)
    assert torch.equal(after_c, after_e)
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_match(m_c, m_e, ex.model, step.update_plan, rtol=1e-4, atol=1e-5)


class _TanhThenInPlace(torch.nn.Module):
    """h = inp(x) is read by tanh, then transformed in place: inplace_ops turns relu(h * 2 + 1)
    into mul_ / add_ / relu_ on h's storage (h dies there), and the backward pass reads that
    storage (b's weight gradient, relu's mask). So at tanh's first backward reader the storage
    of h holds relu(2h + 1), not h."""

    def __init__(self, d=64):
        super().__init__()
        self.inp, self.a, self.b = torch.nn.Linear(8, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.c, self.head = torch.nn.Linear(d, d), torch.nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        z = self.a(torch.tanh(h)) + self.b(torch.relu(h * 2.0 + 1.0))
        return self.head(torch.relu(self.c(torch.relu(z))))


def test_recompute_does_not_read_a_storage_overwritten_in_place():
    """A clone reads an original value directly only if nothing wrote its storage in between
    (``_Graph.usable``): here tanh's input h is overwritten in place right after tanh reads it,
    so recomputing tanh(h) in the backward must recompute h as well (its addmm) instead of
    taking tanh of what the storage holds then (relu(2h + 1)). Float64, different batches,
    against eager autograd + torch.optim."""
    aten = torch.ops.aten
    torch.manual_seed(0)
    model = _TanhThenInPlace().double()
    loss_fn = lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    batches = [(torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 4, (32,))) for _ in range(3)]
    opt = pockc.SGD(**OPT)
    base = pockc.compile(copy.deepcopy(model), loss_fn, batches[0], update="full", optimizer=opt).memory.plan
    budget = int(base.persistent_bytes + 0.9 * (base.required_bytes - base.persistent_bytes))
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    step = pockc.compile(m_c, loss_fn, batches[0], update="full", optimizer=opt, budget=budget,
                         remat="recompute")
    rep = step.remat
    assert rep is not None and rep.fits and rep.recomputed and not rep.paged
    assert step.memory.plan.required_bytes <= budget < base.required_bytes

    nodes = list(step.graph.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    tanh = next(n for n in nodes if n.target is aten.tanh.default and "pockc.remat" not in n.meta)
    h = tanh.args[0]
    assert h.target is aten.addmm.default
    # the situation the guard is for: h's storage is written in place after tanh reads it, and
    # the backward pass reads it (so the storage is kept, and a clone could read it) ...
    aliases, writers = {h}, []
    for n in nodes:
        if "pockc.remat" in n.meta or not n.args or n.args[0] not in aliases:
            continue
        if n.args[0] in mutated_args(n):
            aliases.add(n)
            writers.append(n)
        elif is_view(n):
            aliases.add(n)
    assert writers and all(pos[w] > pos[tanh] for w in writers), writers
    assert any(u.meta.get("pockc.role") == "backward" for a in aliases for u in a.users)
    # ... and tanh is recomputed: its clone reads a clone of h, never h's storage (overwritten)
    clone = next((n for n in nodes if n.meta.get("pockc.remat") == tanh.name), None)
    assert clone is not None and "tanh" in rep.recomputed
    src = clone.args[0]
    assert src not in aliases and src.meta.get("pockc.remat") == h.name and src.target is aten.addmm.default
    assert pos[writers[-1]] < pos[src] < pos[clone]
    assert not [n for n in nodes if "pockc.remat" in n.meta and aliases & set(n.all_input_nodes)]

    torch.manual_seed(0)
    assert step.memory.measure(*batches[0]) == step.memory.peak_bytes
    lc = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    le = eager_steps(m_e, loss_fn, batches, step.update_plan, opt)
    for a, b in zip(lc, le):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert_match(m_c, m_e, model, step.update_plan, rtol=1e-10, atol=1e-12)


def test_a_paged_copy_of_a_storage_overwritten_in_place_is_not_read():
    """Paging h's storage out does not make it readable for a clone: the copy is taken after
    the in-place writes (relu(2h+1) over h), so recomputing tanh(h) must recompute h itself.
    Replayed decisions (a recompile for a new batch shape) reach this combination directly."""
    torch.manual_seed(0)
    model = _TanhThenInPlace().double()
    loss_fn = lambda m, x, y: torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    batch = (torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 4, (32,)))
    step = pockc.compile(copy.deepcopy(model), loss_fn, batch, update="full", optimizer=pockc.SGD(**OPT))
    gm = rematerialize(step.graph, step.layout, None, recompute=["tanh"], page=["addmm"]).graph_module
    [tanh] = [n for n in gm.graph.nodes if n.name == "tanh_remat"]
    src = tanh.args[0]
    while is_view(src):
        src = src.args[0]
    assert src.name == "addmm_remat", f"the tanh clone reads {src.name} ({src.target}), not a recomputed addmm"
