"""schedule_updates: each update runs right after its gradient is final and after every read."""
import torch

import pockc
from pockc import zoo
from pockc.passes.fx_utils import mutated_args
from pockc.passes.schedule_updates import storage_roots


def _groups(gm):
    out = {}
    for n in gm.graph.nodes:
        if n.meta.get("pockc.role") == "update":
            out.setdefault(n.meta["pockc.param"], []).append(n)
    return out


def test_updates_follow_every_read_and_precede_nothing_that_reads():
    ex = zoo.llama()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.AdamW())
    gm = step.graph
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    roots = storage_roots(gm.graph)
    for name, members in _groups(gm).items():
        inside = set(members)
        written = {roots[w] for m in members for w in mutated_args(m)}
        first = pos[members[0]]
        for n in nodes:
            if n in inside:
                continue
            if any(roots[a] in written for a in n.all_input_nodes):
                assert pos[n] < first, f"{n.name} reads {name} after its update"


def test_update_is_placed_as_soon_as_its_gradient_is_final():
    ex = zoo.mlp()
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(lr=0.1))
    nodes = list(step.graph.graph.nodes)
    groups = _groups(step.graph)
    head = nodes.index(groups["head.weight"][0])
    first_body_grad = min(i for i, n in enumerate(nodes) if n.meta.get("pockc.role") == "backward"
                          and any(u.meta.get("pockc.param") == "body.0.weight" for u in n.users))
    assert head < first_body_grad, "the head is updated only after the gradients of the first layer"
    # And immediately: each group is contiguous and runs right after the last of its dependencies
    # (its inputs and every reader of the storage it writes), or after other update groups placed
    # at that same point.
    pos = {n: i for i, n in enumerate(nodes)}
    roots = storage_roots(step.graph.graph)
    for name, members in groups.items():
        start = pos[members[0]]
        assert [pos[m] for m in members] == list(range(start, start + len(members))), f"{name} is split"
        inside = set(members)
        written = {roots[w] for m in members for w in mutated_args(m)}
        deps = {a for m in members for a in m.all_input_nodes if a not in inside}
        deps |= {n for n in nodes if n not in inside and any(roots[a] in written for a in n.all_input_nodes)}
        last = max(deps, key=pos.__getitem__)
        assert pos[last] < start, f"{name} runs before its dependency {last.name}"
        between = nodes[pos[last] + 1:start]
        assert all(n.meta.get("pockc.role") == "update" for n in between), \
            f"{name} waits after its last dependency {last.name} for {[n.name for n in between]}"


def test_gradients_die_early():
    """With updates interleaved, at most a few gradients are alive at once."""
    ex = zoo.mlp(depth=8)
    step = pockc.compile(ex.model, ex.loss_fn, ex.example_batch, update="full", optimizer=pockc.SGD(lr=0.1))
    nodes = list(step.graph.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    grads = [n for n in nodes if n.meta.get("pockc.role") == "backward"
             and any(u.meta.get("pockc.role") == "update" for u in n.users)]
    last_use = {g: max(pos[u] for u in g.users) for g in grads}
    most = max(sum(1 for g in grads if pos[g] <= i <= last_use[g]) for i in range(len(nodes)))
    assert most <= 3, most
    assert torch.isfinite(step(*ex.example_batch))


# --------------------------------------------------------------------------- a weight read twice, vs eager
# An update writes its weight in place, so it must wait for every op that reads the weight, not
# only for its gradient. In autograd's order a backward op that reads W (``grad_x = grad_y @ W``)
# always precedes the last contribution to W's own gradient *when that op also differentiates W*;
# a read of W after its gradient is final needs a use of W the gradient does not flow through: a
# layer applied twice, once behind a stop-gradient (target / siamese branches). These models run
# several steps against eager autograd + torch.optim (float64, a new batch every step).
import copy  # noqa: E402

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OPTIMIZERS = {
    "sgd": pockc.SGD(lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": pockc.AdamW(lr=0.01, weight_decay=0.05),
}
D, VOCAB = 8, 20


def _torch_optimizer(opt, leaves):
    cfg = {k: v for k, v in opt.to_dict().items() if k != "type"}
    return {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}[type(opt).__name__](leaves, foreach=False, **cfg)


def _assert_no_read_after_update(gm):
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    roots = storage_roots(gm.graph)
    for name, members in _groups(gm).items():
        inside = set(members)
        first_write = {}          # storage -> position of the group's first in-place write of it
        for m in members:         # (schedule_memory may hoist a state-only op such as buf.mul_)
            for w in mutated_args(m):
                first_write.setdefault(roots[w], pos[m])
        late = [n.name for n in nodes if n not in inside
                and any(pos[n] > first_write.get(roots[a], len(nodes)) for a in n.all_input_nodes)]
        assert not late, f"{late} read storage written by the update of {name} after that write"


def _compare_with_eager(model, loss_fn, batches, update, opt, rtol=1e-9, atol=1e-12):
    m_c, m_e, original = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    step = pockc.compile(m_c, loss_fn, batches[0], update=update, optimizer=opt)
    plan = step.update_plan
    lc = [step(*b) for b in batches]
    params = dict(m_e.named_parameters())          # tied tensors appear once
    for p in params.values():
        p.requires_grad_(False)
    leaves = [params[n].requires_grad_(True) for n in plan.trainable_names() if n in params]
    optim = _torch_optimizer(opt, leaves)
    le = []
    for b in batches:
        optim.zero_grad(set_to_none=True)
        loss = loss_fn(m_e, *b)
        loss.backward()
        optim.step()
        le.append(loss.detach())
    torch.testing.assert_close(torch.stack(lc), torch.stack(le), rtol=rtol, atol=atol)
    pc, po = dict(m_c.named_parameters()), dict(original.named_parameters())
    for name, p in params.items():
        torch.testing.assert_close(pc[name], p, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        assert torch.equal(pc[name], po[name]) == (plan.rule(name).kind == "frozen"), name
    _assert_no_read_after_update(step.graph)
    return step, m_c


class _Twice(nn.Module):
    """``lin`` (square) applied twice: y = head(lin(tanh(lin(tanh(pre(x))))))."""

    def __init__(self, stop_gradient=False):
        super().__init__()
        self.stop_gradient = stop_gradient
        self.pre = nn.Linear(6, D)
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.pre(x))
        if self.stop_gradient:   # the inner application does not train lin; the gradient flows to pre
            h = F.linear(h, self.lin.weight.detach(), self.lin.bias.detach())
        else:
            h = self.lin(h)
        return self.head(self.lin(torch.tanh(h)))


class _TiedLM(nn.Module):
    """Embedding tied to the output head (one tensor, two uses)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.mid = nn.Linear(D, D)
        self.out = nn.Linear(D, VOCAB, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(torch.tanh(self.mid(self.emb(t))))


def _ce(m, x, y):
    return F.cross_entropy(m(x), y)


def _lm_loss(m, t):
    return F.cross_entropy(m(t[:, :-1]).reshape(-1, VOCAB), t[:, 1:].reshape(-1))


def _model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).double()


def _batches(steps=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g))
            for _ in range(steps)]


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("update", ["full", {"lin.*": "full"}, {"lin.*": "full", "pre.*": "full"}])
def test_layer_applied_twice_matches_eager(update, opt):
    step, _ = _compare_with_eager(_model(_Twice), _ce, _batches(), update, OPTIMIZERS[opt])
    readers = [n for n in step.graph.graph.nodes if n.meta.get("pockc.role") == "forward"
               and n.target is torch.ops.aten.t.default and "lin_weight" in n.args[0].name]
    assert len(readers) == 2   # the trace really reads lin.weight twice


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("update", ["full", {"lin.*": "full", "pre.*": "full"}])
def test_layer_reused_behind_a_stop_gradient_matches_eager(update, opt):
    """The inner read of lin.weight (grad_h = grad @ W, for pre's gradient) comes after lin's
    gradient is final: the update must still wait for it."""
    step, _ = _compare_with_eager(_model(_Twice, True), _ce, _batches(), update, OPTIMIZERS[opt])
    # the case this test is about: in the traced program, lin.weight is read (grad_h = grad @ W,
    # for pre's gradient) after its own gradient is final
    from pockc.trace import trace_joint
    model = _model(_Twice, True)
    gm, layout = trace_joint(model, _ce, _batches()[0], step.update_plan)
    nodes = list(gm.graph.nodes)
    roots = storage_roots(gm.graph)
    w = next(n for n in nodes if n.op == "placeholder" and n.name == "p_lin_weight")
    grads = dict(zip([name for name, _ in layout.grads], nodes[-1].args[0][1:]))
    last_read = max(i for i, n in enumerate(nodes) if n.meta.get("pockc.role") == "backward"
                    and any(roots[a] is w for a in n.all_input_nodes))
    assert nodes.index(grads["lin.weight"]) < last_read


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("update", ["full", {"emb.*": "full"}])
def test_tied_embedding_and_head_match_eager(update, opt):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (2, 6), generator=g),) for _ in range(3)]
    step, m_c = _compare_with_eager(_model(_TiedLM), _lm_loss, batches, update, OPTIMIZERS[opt])
    assert "emb.weight" in step.update_plan.trainable_names()
    assert m_c.out.weight is m_c.emb.weight   # still one tensor, updated once per step
    assert len([m for m in _groups(step.graph) if "emb.weight" in m]) == 1
