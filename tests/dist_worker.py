"""Ranks of the data-parallel tests (tests/test_distributed.py): each case compiles a pockc step with
``distributed=`` and trains it, then trains torch's DDP with the same trainable set on the same
shards, in the same process; the test compares both, and single-process eager on the global batch.

Cases are built by :func:`make_case` from seeds alone, so the test process builds the same models
and batches for its eager reference. Run as ``spawn`` processes over gloo on 127.0.0.1."""
from __future__ import annotations

import os
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2
LOCAL = 4      # samples per rank and step
STEPS = 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def ce(model, x, y):
    return F.cross_entropy(model(x), y)


def hf_loss(model, batch):
    return model(**batch).loss


def make_case(name):
    """(model, loss_fn, [global batch per step], options) -- the same on every rank and in the test."""
    import pockc
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calls = STEPS
    opts = {"optimizer": pockc.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), "update": "full",
            "dist": {"first_bucket_mb": 256 / 2**20, "bucket_mb": 2048 / 2**20}}   # several small buckets
    if name == "lora":
        from tests.hf_models import hf_llama
        model = hf_llama()
        ids = torch.randint(0, 128, (STEPS, WORLD * 2, 8), generator=g)
        batches = [({"input_ids": ids[t], "labels": ids[t]},) for t in range(STEPS)]
        opts.update(optimizer=pockc.AdamW(lr=1e-2), update=None)
        return model, hf_loss, batches, opts
    if name == "bn_cnn":
        model = CNN().double()
        x = torch.randn(STEPS, WORLD * LOCAL, 3, 8, 8, generator=g, dtype=torch.float64)
    else:
        model = MLP().double()
        if name == "accum":
            calls = 2 * STEPS
        x = torch.randn(calls, WORLD * LOCAL, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (x.shape[0], WORLD * LOCAL), generator=g)
    batches = [(x[t], y[t]) for t in range(x.shape[0])]
    if name == "last_adamw":
        opts.update(update="last:2", optimizer=pockc.AdamW(lr=1e-2, weight_decay=0.1))
    elif name == "channels":
        opts.update(update={"net.2.*": "channels:0.125"})
    elif name == "accum":
        opts.update(accumulate=2)
    elif name == "clip":
        opts.update(max_grad_norm=0.05, update="last:2")
    elif name == "inductor":          # the same program lowered by Inductor (functional collectives)
        opts.update(backend="inductor")
    return model, ce, batches, opts


def shard(batch, rank):
    """This rank's part of a global batch (a contiguous slice of the first dimension)."""
    def cut(t):
        n = t.shape[0] // WORLD
        return t[rank * n:(rank + 1) * n].clone()     # its own storage, as a loader's batch
    return tuple({k: cut(v) for k, v in b.items()} if isinstance(b, dict) else cut(b) for b in batch)


def _pockc_case(name, rank):
    import pockc
    model, loss_fn, batches, opts = make_case(name)
    if rank == 1:                      # another initialization: compiling must give every rank rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
    dist_opts = pockc.Distributed(**opts["dist"])
    kw = {k: opts[k] for k in ("accumulate", "max_grad_norm", "backend") if k in opts}
    if name == "lora":
        step = pockc.finetune(model, loss_fn, shard(batches[0], rank),
                              lora=pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                              optimizer=opts["optimizer"], distributed=dist_opts)
    else:
        step = pockc.compile(model, loss_fn, shard(batches[0], rank), update=opts["update"],
                             optimizer=opts["optimizer"], distributed=dist_opts, **kw)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"init": init, "bytes": step.comm.bytes_per_step, "ddp_bytes": step.comm.ddp_bytes,
           "buckets": step.comm.buckets, "table": step.comm.table(),
           "trained": step.update_plan.trainable_names(), "grads": list(step.layout.grads)}
    losses = []
    for t, b in enumerate(batches):
        if t == 0 and name == "full_sgd":    # the first step under the allocator-level tracker
            out["measured"] = step.memory.measure(*shard(b, rank))
            out["planned"] = step.memory.peak_bytes
            losses.append(step.memory.last_loss)
        else:
            losses.append(step(*shard(b, rank)))
    out["losses"] = [float(v) for v in losses]
    out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["issue_order"] = [n.name for n in step.graph.graph.nodes
                          if n.op == "call_function" and "all_reduce" in str(n.target)]
    return out, init


def _save_load_case(rank, outdir):
    """Two steps, save, load (a fresh process's view: pockc.load builds its own module), then one
    more step with each: the loaded step continues exactly as the original."""
    import pockc
    model, loss_fn, batches, opts = make_case("full_sgd")
    step = pockc.compile(model, loss_fn, shard(batches[0], rank), optimizer=opts["optimizer"],
                         distributed=pockc.Distributed(**opts["dist"]))
    for b in batches[:2]:
        step(*shard(b, rank))
    path = os.path.join(outdir, f"step_rank{rank}")
    step.save(path)
    loaded = pockc.load(path)
    step(*shard(batches[2], rank))
    loaded(*shard(batches[2], rank))
    return {"original": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "loaded": {k: v.detach().clone() for k, v in loaded.model.state_dict().items()},
            "comm": loaded.comm.to_json()}


def _ddp_case(name, rank, init):
    """torch DDP from the same initial state (pockc's, after its broadcast), same trainable set."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tests.reference import torch_optim
    model, loss_fn, batches, opts = make_case(name)
    if name == "lora":
        return None
    model.load_state_dict(init)
    trained = set(_trained_names(name, model, opts))
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    ddp = DDP(model, bucket_cap_mb=opts["dist"]["bucket_mb"], broadcast_buffers=True)
    opt = torch_optim(opts["optimizer"], [p for p in model.parameters() if p.requires_grad])
    rows = _frozen_rows(name, model)
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp, *shard(b, rank)).backward()
        if opts.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], opts["max_grad_norm"])
        saved = {n: model.get_parameter(n).detach()[r].clone() for n, r in rows.items()}
        opt.step()
        with torch.no_grad():           # DDP trains whole tensors: put the frozen rows back
            for n, r in rows.items():
                model.get_parameter(n)[r] = saved[n]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained_names(name, model, opts):
    if name == "channels":
        return ["net.2.weight", "net.2.bias"]
    if name in ("last_adamw", "clip"):
        return ["net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"]
    return [n for n, _ in model.named_parameters()]


def _frozen_rows(name, model):
    if name != "channels":
        return {}
    return {"net.2.weight": slice(8, None), "net.2.bias": slice(8, None)}   # channels:0.125 of 64 rows: 0..7


def _init(rank, port, timeout=60):
    from benchmarks.bench_ddp import init_rank
    return init_rank(rank, port, WORLD, timeout_s=timeout)


def run_cases(rank, port, outdir, cases):
    """A rank: every case of ``cases``, results to ``outdir/rank<r>.pt`` (errors as text)."""
    dist = _init(rank, port)
    results = {}
    for name in cases:
        try:
            if name == "save_load":
                results[name] = _save_load_case(rank, outdir)
                continue
            out, init = _pockc_case(name, rank)
            if name not in ("accum",):
                out["ddp"] = _ddp_case(name, rank, init)
            results[name] = out
        except Exception:  # noqa: BLE001 -- reported to the test
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    from benchmarks.bench_ddp import finish_rank
    finish_rank(dist)


def run_failures(rank, port, outdir, kind):
    """A rank of a failure test: ``compile``: rank 1's loss raises while compiling; ``dies``: rank 1
    exits after its first step. Writes what this rank raised and how long it took."""
    _init(rank, port, timeout=20)
    import pockc
    model, _, batches, opts = make_case("full_sgd")

    def bad_loss(m, x, y):
        if rank == 1:
            raise ValueError("labels out of range on this rank")
        return ce(m, x, y)

    out = {}
    t0 = time.perf_counter()
    try:
        step = pockc.compile(model, bad_loss if kind == "compile" else ce, shard(batches[0], rank),
                             optimizer=opts["optimizer"], distributed=True)
        step(*shard(batches[0], rank))
        if kind == "dies" and rank == 1:
            os._exit(3)
        t0 = time.perf_counter()
        step(*shard(batches[1], rank))
        out["error"] = None
        try:
            step(*shard(batches[2], rank))
        except Exception as e:  # noqa: BLE001
            out["after"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001
        out["error"] = (type(e).__name__, str(e))
        if kind == "dies":
            try:
                step(*shard(batches[2], rank))
            except Exception as e2:  # noqa: BLE001
                out["after"] = (type(e2).__name__, str(e2))
    out["seconds"] = time.perf_counter() - t0
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    os._exit(0)   # without waiting for a peer that is gone


def spawn(target, args, timeout=240):
    """Run ``target(rank, port, *args)`` on WORLD spawned processes (killed after ``timeout`` s)."""
    from benchmarks.bench_ddp import spawn_ranks
    return spawn_ranks(target, args, WORLD, timeout)
