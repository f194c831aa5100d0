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
        first, last = pos[members[0]], pos[members[-1]]
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
    # And immediately: the node right before each group is one of its dependencies' producers
    # or another update group.
    for name, members in groups.items():
        prev = members[0].prev
        assert prev.meta.get("pockc.role") in ("update", "backward", "forward", "input"), name


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
