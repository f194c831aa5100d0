"""passes/patch_stages.py: the frozen high-resolution prefix runs tile by tile, exactly.

Structure (the stage is replaced by T unrolled tiles, one statistics pass per train-mode batch
norm), numbers (3 steps against the untiled step and eager PyTorch, batch-norm running statistics
included, frozen parameters bit-identical; float64 to 1e-10 for the halo arithmetic), memory
(the planned peak drops and equals the measured one), refusals with their reasons."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pockc
from pockc import zoo
from pockc.memory import StepMemory
from pockc.passes.patch_stages import find_stage, patch_stages
from pockc.passes.plan_memory import plan_memory
from pockc.runtime.program import graph_from_json, graph_to_json
from tests import oracle, reference

OPT = pockc.SGD(lr=0.01, momentum=0.9)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _compile(model, ex, update, batch=None):
    return pockc.compile(model, ex.loss_fn, batch or ex.example_batch, update=update, optimizer=OPT)


def _patch(step, **kw):
    """patch_stages on ``step``'s graph, the step's memory plan made again (as _compile_plan would)."""
    res = patch_stages(step.graph, step.layout, **kw)
    step.memory = StepMemory(step, plan_memory(step.graph, step.layout))
    return res, step.graph.meta["pockc.patch"]


def _last_cut(step, tiles):
    _, stage, cuts, _, _ = find_stage(step.graph, step.layout, tiles)
    return stage[cuts[-1] - 1].name


def _run(step, batches, seed=0):
    torch.manual_seed(seed)
    return [float(step(*b)) for b in batches]


def test_peak_driven_stage_structure_and_memory():
    ex = zoo.mobilenet_v2(batch=2, image=128, width=0.35)
    step = _compile(copy.deepcopy(ex.model), ex, "last:4+head")
    before = step.memory.peak_bytes
    stage_names = set()
    res, rep = None, None
    _, stage, _, info, _ = find_stage(step.graph, step.layout, 4)
    stage_names = {n.name for n in stage}
    res, rep = _patch(step, tiles=4)
    assert res.modified and rep["stage"] is not None, rep
    assert rep["stage"]["start"] == stage[0].name
    tiled = rep["stage"]["ops"]
    names = {n.name for n in step.graph.graph.nodes}
    assert not set(tiled) & names                       # every stage node replaced
    assert set(tiled) <= stage_names
    tags = [n.meta.get("pockc.patch_tile") for n in step.graph.graph.nodes if n.meta.get("pockc.patch_tile")]
    assert {t[1] for t in tags if t[0] == "final"} == {0, 1, 2, 3}          # T = 4 tiles
    copies = [n for n in step.graph.graph.nodes if n.target is torch.ops.aten.copy_.default
              and (n.meta.get("pockc.patch_tile") or ("",))[0] == "final"]
    assert len(copies) == 4
    n_bn = sum(1 for name in tiled for n in stage if n.name == name and info[n][0] == "bn")
    assert rep["stats_passes"] == n_bn > 0              # one statistics pass per train-mode BN
    assert {t[1] for t in tags if t[0] == "stats"} == set(range(n_bn))
    # memory: the peak drops, the plan is the measured peak to the byte
    assert rep["peak_before"] == before
    assert rep["peak_after"] == step.memory.peak_bytes < before
    torch.manual_seed(0)
    assert step.memory.measure(*ex.example_batch) == step.memory.peak_bytes
    # the saved program needs nothing new
    d, consts = graph_to_json(step.graph)
    assert len(graph_from_json(d, consts).graph.nodes) == len(step.graph.graph.nodes)


def _three_steps(dtype, tiles, cut):
    """Tiled, untiled and eager models after 3 steps (dropout: one seed before each run)."""
    ex = zoo.mobilenet_v2(batch=2, image=64, width=0.5)
    original = ex.model.to(dtype)
    batches = [(x.to(dtype), y) for x, y in reference.varied_batches(ex.example_batch, 3, 0)]
    m_t, m_u, m_e = (copy.deepcopy(original) for _ in range(3))
    s_t, s_u = (pockc.compile(m, ex.loss_fn, batches[0], update="last:4+head", optimizer=OPT) for m in (m_t, m_u))
    res, rep = _patch(s_t, tiles=tiles, cut=cut)
    assert res.modified and rep["stage"]["end"] == cut, rep
    torch.manual_seed(0)
    assert s_t.memory.measure(*batches[0]) == s_t.memory.peak_bytes
    first = [{k: v.clone() for k, v in m_t.named_buffers()}]     # the buffers after step 1
    lt = [s_t.memory.last_loss] + [float(s_t(*b)) for b in batches[1:]]
    torch.manual_seed(0)
    lu = [float(s_u(*batches[0]))]
    first.append({k: v.clone() for k, v in m_u.named_buffers()})
    lu += [float(s_u(*b)) for b in batches[1:]]
    expected = reference.resolve("last:4+head", original, ex.loss_fn, batches[0])
    torch.manual_seed(0)
    le = [float(x) for x in oracle.eager_steps(m_e, ex.loss_fn, batches, expected, OPT)]
    _three_steps.first = first
    return original, s_t, rep, (m_t, m_u, m_e), tuple(torch.tensor(v, dtype=torch.float64) for v in (lt, lu, le))


@pytest.mark.parametrize("tiles", [3])
def test_three_steps_match_eager_in_float64(tiles):
    """A stage with stride-2 convolutions, a residual add and nine train-mode BNs (cut after the
    first residual block; uneven tiles with 3): float64, so that what is compared is the tiling,
    not float32 rounding (see the next test)."""
    original, s_t, rep, (m_t, m_u, m_e), (lt, lu, le) = _three_steps(torch.float64, tiles, "add")
    assert rep["stats_passes"] == 9
    torch.testing.assert_close(lt, le, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lt, lu, rtol=1e-12, atol=1e-12)
    for other in (m_e, m_u):    # parameters and BN running statistics; frozen ones bit-identical
        oracle.assert_match(m_t, other, original, s_t.update_plan, rtol=1e-9, atol=1e-11)


def test_three_steps_float32():
    """float32: this model is sensitive to rounding (BN over near-constant channels amplifies
    it): after 3 steps the untiled step's loss is 1.5e-5 (relative) from the float64 steps and
    2e-4 from eager float32, and trained weights differ by up to 4e-4 between any two float32
    runs. So: the stage's running statistics after one step (the batch statistics themselves,
    before training amplifies their rounding) within 1e-5; the losses within that rounding;
    frozen parameters bit-identical. (The float64 test checks parameters tightly.)"""
    original, s_t, rep, (m_t, m_u, m_e), (lt, lu, le) = _three_steps(torch.float32, 4, "add")
    torch.testing.assert_close(lt, lu, rtol=5e-5, atol=1e-6)
    torch.testing.assert_close(lt, le, rtol=5e-4, atol=1e-6)
    for name, p in original.named_parameters():
        if name.startswith("features.") and int(name.split(".")[1]) < 15:
            assert torch.equal(dict(m_t.named_parameters())[name], p), name
    # after one step: the stage's batch statistics as the kernel's, to float rounding
    b1, b2 = _three_steps.first
    stage_bufs = [k for k in b1 if k.startswith(tuple(f"features.{i}." for i in range(4))) and "running" in k]
    assert len(stage_bufs) == 18                       # the nine BNs of the stage
    for k in stage_bufs:
        torch.testing.assert_close(b1[k], b2[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


def test_mobilenet_exact_in_float64():
    """The whole frozen prefix (fifteen blocks, dozens of statistics passes) tiled."""
    ex = zoo.mobilenet_v2(batch=2, image=64, width=0.5)
    model = ex.model.double()
    batches = [(x.double(), y) for x, y in reference.varied_batches(ex.example_batch, 3, 0)]
    m_t, m_u = copy.deepcopy(model), copy.deepcopy(model)
    s_t = pockc.compile(m_t, ex.loss_fn, batches[0], update="last:4+head", optimizer=OPT)
    s_u = pockc.compile(m_u, ex.loss_fn, batches[0], update="last:4+head", optimizer=OPT)
    res, rep = _patch(s_t, tiles=2, cut=_last_cut(s_t, 2))
    assert res.modified and rep["stats_passes"] > 9
    torch.testing.assert_close(torch.tensor(_run(s_t, batches), dtype=torch.float64),
                               torch.tensor(_run(s_u, batches), dtype=torch.float64), rtol=1e-12, atol=1e-12)
    for (k, a), b in zip(m_t.state_dict().items(), m_u.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{k}: {m}")
        if k.startswith("features.1.") and "running" not in k and "num_batches" not in k:
            assert torch.equal(a, model.state_dict()[k]), f"frozen {k} changed"


class _Odd(nn.Module):
    """Odd sizes, 5x5 / dilated / depthwise / strided convolutions, eval- and train-mode BN, a
    residual add: every border case of the halo arithmetic."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=True)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=1, padding=2, dilation=2, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.c4 = nn.Conv2d(8, 8, 3, stride=1, padding=0, bias=False)     # no padding at all
        self.c5 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.b5 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu6(self.b2(self.c2(x))) + x
        x = self.c3(x)
        x = F.relu(self.c4(x))
        x = self.b5(self.c5(x))
        return self.fc(self.head(x).mean((2, 3)))


def _odd_example(dtype, image=(45, 29), eval_b2=False):
    torch.manual_seed(0)
    m = _Odd().to(dtype).train()
    if eval_b2:
        m.b2.eval()
    x = torch.randn(2, 3, *image, dtype=dtype)
    y = torch.tensor([1, 3])

    class Ex:
        model = m
        example_batch = (x, y)

        @staticmethod
        def loss_fn(model, x, y):
            return F.cross_entropy(model(x), y)
    return Ex


@pytest.mark.parametrize("tiles,eval_b2", [(2, False), (3, True), (5, False)])
def test_halo_borders_exact_in_float64(tiles, eval_b2):
    ex = _odd_example(torch.float64, eval_b2=eval_b2)
    m_t, m_u = copy.deepcopy(ex.model), copy.deepcopy(ex.model)
    s_t, s_u = _compile(m_t, ex, {"head.*": "full", "fc.*": "full"}), _compile(m_u, ex, {"head.*": "full",
                                                                                     "fc.*": "full"})
    cut = _last_cut(s_t, tiles)
    res, rep = _patch(s_t, tiles=tiles, cut=cut)
    assert res.modified and rep["stats_passes"] == (3 if not eval_b2 else 2), rep
    x, y = ex.example_batch
    batches = [(x, y), (x * 0.5 + 0.1, y), (x.flip(2), y)]
    lt, lu = _run(s_t, batches), _run(s_u, batches)
    torch.testing.assert_close(torch.tensor(lt, dtype=torch.float64), torch.tensor(lu, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    for (k, a), b in zip(m_t.state_dict().items(), m_u.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")
        if k.startswith(("c", "b")) and "running" not in k and "num_batches" not in k:
            assert torch.equal(a, ex.model.state_dict()[k]), f"frozen {k} changed"


def test_eval_mode_needs_no_statistics_pass():
    ex = zoo.mobilenet_v2(batch=2, image=64, width=0.5)
    model = ex.model.eval()
    m_t, m_u = copy.deepcopy(model), copy.deepcopy(model)
    s_t, s_u = _compile(m_t, ex, "last:4+head"), _compile(m_u, ex, "last:4+head")
    res, rep = _patch(s_t, tiles=4, cut=_last_cut(s_t, 4))
    assert res.modified and rep["stats_passes"] == 0
    batches = reference.varied_batches(ex.example_batch, 3, 0)
    torch.testing.assert_close(torch.tensor(_run(s_t, batches)), torch.tensor(_run(s_u, batches)),
                               rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(m_t.state_dict().items(), m_u.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


class _GlobalFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = x - x.mean()                      # a reduction over the whole image: not tileable
        return self.fc(F.relu(self.c(x)).mean((2, 3)))


def test_refusal_names_the_op():
    torch.manual_seed(0)
    m = _GlobalFirst()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    step = pockc.compile(m, lambda mod, x, y: F.cross_entropy(mod(x), y), (x, y), update={"fc.*": "full"},
                         optimizer=OPT)
    n = len(step.graph.graph.nodes)
    res, rep = _patch(step, tiles=4)
    assert not res.modified and rep["stage"] is None and len(step.graph.graph.nodes) == n
    (r,) = rep["refused"]
    assert "no tileable stage" in r["reason"] and "mean" in r["reason"] and "not tileable" in r["reason"], r


def test_peak_outside_the_prefix_is_left_alone():
    ex = zoo.mobilenet_v2(batch=2, image=64, width=0.5)   # its peak lies in the trained blocks
    step = _compile(copy.deepcopy(ex.model), ex, "last:4+head")
    res, rep = _patch(step, tiles=4)
    assert not res.modified and rep["stage"] is None
    assert "outside the tileable frozen prefix" in rep["refused"][0]["reason"], rep
    assert rep["peak_after"] == rep["peak_before"]


def test_bad_arguments():
    ex = zoo.mobilenet_v2(batch=2, image=32, width=0.25)
    step = _compile(copy.deepcopy(ex.model), ex, "last:4+head")
    with pytest.raises(ValueError, match="tiles"):
        patch_stages(step.graph, step.layout, tiles=1)
    with pytest.raises(ValueError, match="not a valid cut"):
        patch_stages(step.graph, step.layout, tiles=2, cut="no_such_node")


def test_compile_tiles_a_frozen_stage_when_the_budget_needs_it():
    """pockc.compile under a budget the untiled step exceeds in its frozen forward: the stage is
    tiled (step.patch), the budget holds to the measured byte, the step trains what eager PyTorch
    trains (float64), and a new batch shape tiles the same stage again."""
    ex = zoo.mobilenet_v2(batch=2, image=128, width=0.35)
    model = ex.model.double()
    batches = [(x.double(), y) for x, y in reference.varied_batches(ex.example_batch, 2, 0)]
    untiled = pockc.compile(copy.deepcopy(model), ex.loss_fn, batches[0], update="last:4+head", optimizer=OPT)
    probe = pockc.compile(copy.deepcopy(model), ex.loss_fn, batches[0], update="last:4+head", optimizer=OPT)
    _, rep = _patch(probe, tiles=pockc.api.PATCH_TILES)
    assert rep["stage"] is not None
    budget = (untiled.memory.plan.required_bytes + probe.memory.plan.required_bytes) // 2
    m_c, m_e = copy.deepcopy(model), copy.deepcopy(model)
    step = pockc.compile(m_c, ex.loss_fn, batches[0], update="last:4+head", optimizer=OPT, budget=budget)
    assert step.patch is not None and step.patch["stage"]["end"] == rep["stage"]["end"]
    torch.manual_seed(0)
    assert step.memory.measure(*batches[0]) == step.memory.peak_bytes <= budget
    losses = [step.memory.last_loss] + [step(*b) for b in batches[1:]]
    torch.manual_seed(0)
    ref = oracle.eager_steps(m_e, ex.loss_fn, batches, step.update_plan, OPT)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref), rtol=1e-10, atol=1e-10)
    oracle.assert_match(m_c, m_e, model, step.update_plan, rtol=1e-9, atol=1e-11)
    x, y = batches[0]
    with pytest.warns(UserWarning, match="batch shapes or constants differ"):
        assert torch.isfinite(step(x[:1], y[:1]))
    g = step._graph_for((x[:1], y[:1]))
    assert g.meta["pockc.patch"]["stage"]["end"] == rep["stage"]["end"]
