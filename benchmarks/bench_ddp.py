"""Data-parallel benchmark: pockc's distributed step against torch DDP, same trainable set, same
global batch, 2 ranks on this machine (gloo on 127.0.0.1, one intra-op thread per rank).

    python -m benchmarks.bench_ddp            # writes benchmarks/results/ddp_cpu.{json,md}
    python -m benchmarks.bench_ddp --quick    # small sizes, a smoke test (writes ddp_cpu_quick.*)

Workloads (pockc.zoo models, the batch per rank):

* ``mobilenet_v2 last:4`` -- MobileNetV2-style (width 1.0, 64x64, batch 8), SGD momentum 0.9;
* ``mobilenet_v2 last:4 channels:0.25`` -- the same tensors, a quarter of their rows trained;
  DDP is given the whole tensors (what it can reduce) and the frozen rows are put back after
  each step;
* ``llama last:2`` -- Llama-style decoder (d=256, 4 layers, seq 128, batch 2, vocab 8000), AdamW;
* ``llama LoRA`` -- r=8 on q_proj and v_proj of every layer, AdamW; DDP drives the same model
  with PEFT's LoRA layers (``peft.inject_adapter_in_model``), only the adapters requiring grad.

Each variant (pockc / DDP) runs in its own pair of processes; the variants alternate over
``--rounds`` rounds (each a fresh pair), ``--steps`` timed steps per round after ``--warmup``.
A step's time is the slower rank's (both start from a barrier), reported as the median over all
rounds; the ratio is DDP's median over pockc's. Bytes per step are *measured*: for pockc, the
sizes of the all-reduces its program issues in one step (a dispatch mode counts them); for DDP,
the sizes of the buckets its communication hook receives. Both are the bytes each rank
all-reduces (a ring all-reduce sends about twice that over the wire, for both alike).
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2


# ----------------------------------------------------------------------------- processes
def spawn_ranks(target, args, world=WORLD, timeout=600):
    """Run ``target(rank, port, *args)`` in ``world`` spawned processes (a free loopback port for
    the rendezvous); a process still running after ``timeout`` seconds is killed. Returns the exit
    codes ("timeout" for a killed one)."""
    import multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append("timeout")
        else:
            codes.append(p.exitcode)
    return codes


def init_rank(rank, port, world=WORLD, timeout_s=120, threads=1):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return dist


# ----------------------------------------------------------------------------- workloads
def workloads(quick: bool) -> list[dict]:
    if quick:
        mnv2 = {"batch": 2, "image": 32, "width": 0.35}
        llama = {"batch": 1, "seq": 32, "vocab": 512, "d": 64, "heads": 4, "layers": 2}
    else:
        mnv2 = {"batch": 8, "image": 64, "width": 1.0}
        llama = {"batch": 2, "seq": 128, "vocab": 8000, "d": 256, "heads": 4, "layers": 4}
    return [
        {"name": "mobilenet_v2 last:4", "model": "mobilenet_v2", "size": mnv2, "update": "last:4", "opt": "sgd"},
        {"name": "mobilenet_v2 last:4 channels:0.25", "model": "mobilenet_v2", "size": mnv2, "update": "last:4",
         "channels": 0.25, "opt": "sgd"},
        {"name": "llama last:2", "model": "llama", "size": llama, "update": "last:2", "opt": "adamw"},
        {"name": "llama LoRA r=8 q,v", "model": "llama", "size": llama, "lora": 8, "opt": "adamw"},
    ]


LORA_TARGETS = ["q_proj", "v_proj"]


def _build(w, rank):
    """(model, loss_fn, this rank's batches, pockc optimizer) of workload ``w``; every rank builds
    the same model (seed 0); rank r's batches are the r-th slices of the global batches."""
    import pockc
    from pockc import zoo
    ex = getattr(zoo, w["model"])(**w["size"], seed=0)
    g = torch.Generator().manual_seed(1 + rank)      # each rank its own data
    batches = []
    for _ in range(4):
        batches.append(tuple(_like(t, g) for t in ex.example_batch))
    opt = pockc.SGD(lr=0.01, momentum=0.9) if w["opt"] == "sgd" else pockc.AdamW(lr=1e-4)
    return ex.model, ex.loss_fn, batches, opt


def _like(t, g):
    if t.is_floating_point():
        return torch.randn(t.shape, generator=g, dtype=t.dtype)
    return torch.randint(0, int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)


def _policy(w, model):
    if w.get("channels") is None:
        return w["update"]
    from pockc.plan import resolve_update
    return {n: f"channels:{w['channels']}" for n in resolve_update(w["update"], model).trainable_names()}


class _CountCollectives(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensors the program all-reduces while active."""

    def __init__(self):
        super().__init__()
        self.bytes = self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops._c10d_functional.all_reduce_.default, torch.ops._c10d_functional.all_reduce.default):
            self.bytes += args[0].numel() * args[0].element_size()
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _pockc_runner(w, rank):
    import pockc
    model, loss_fn, batches, opt = _build(w, rank)
    t0 = time.perf_counter()
    if w.get("lora"):
        step = pockc.finetune(model, loss_fn, batches[0], optimizer=opt, distributed=True,
                              lora=pockc.LoraConfig(r=w["lora"], lora_alpha=2 * w["lora"], target_modules=LORA_TARGETS))
    else:
        step = pockc.compile(model, loss_fn, batches[0], update=_policy(w, model), optimizer=opt, distributed=True)
    compile_s = time.perf_counter() - t0
    info = {"compile_s": compile_s, "planned_peak": step.memory.peak_bytes, "buckets": len(step.comm.buckets),
            "planned_bytes": step.comm.bytes_per_step, "ddp_bytes_for_same_set": step.comm.ddp_bytes,
            "trained_tensors": len(step.layout.grads)}

    def one(b):
        return step(*b)

    def count(b):
        with _CountCollectives() as c:
            step(*b)
        return c.bytes, c.calls
    return one, count, info


def _ddp_runner(w, rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pockc.bench import torch_optimizer
    model, loss_fn, batches, opt = _build(w, rank)
    if w.get("lora"):
        from peft import LoraConfig, inject_adapter_in_model
        for p in model.parameters():
            p.requires_grad_(False)
        model = inject_adapter_in_model(LoraConfig(r=w["lora"], lora_alpha=2 * w["lora"], target_modules=LORA_TARGETS,
                                                   lora_dropout=0.0), model)
        trained = {n for n, p in model.named_parameters() if "lora_" in n}
    else:
        from pockc.plan import resolve_update
        trained = set(resolve_update(_policy(w, model), model).trainable_names())
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    params = dict(model.named_parameters())
    t0 = time.perf_counter()
    ddp = DDP(model, broadcast_buffers=True)
    counter = {"bytes": 0, "calls": 0, "on": False}

    def hook(state, bucket):
        if counter["on"]:
            buf = bucket.buffer()
            counter["bytes"] += buf.numel() * buf.element_size()
            counter["calls"] += 1
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        return allreduce_hook(state, bucket)

    import torch.distributed as dist
    ddp.register_comm_hook(dist.group.WORLD, hook)
    optimizer = torch_optimizer(opt, [p for p in model.parameters() if p.requires_grad])
    frozen_rows = ({n: _frozen_slice(params[n], w["channels"]) for n in trained}
                   if w.get("channels") is not None else {})
    info = {"compile_s": time.perf_counter() - t0, "trained_tensors": len(trained)}

    def one(b):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp, *b)
        loss.backward()
        keep = {n: params[n].detach()[s].clone() for n, s in frozen_rows.items()}
        optimizer.step()
        with torch.no_grad():          # DDP trains whole tensors: the frozen rows go back
            for n, s in frozen_rows.items():
                params[n][s] = keep[n]
        return loss.detach()

    def count(b):
        counter.update(bytes=0, calls=0, on=True)
        one(b)
        counter["on"] = False
        return counter["bytes"], counter["calls"]
    return one, count, info


def _frozen_slice(p, ratio):
    import math
    return slice(max(1, math.ceil(ratio * p.shape[0])), None)   # pockc's channels:R trains rows [0, ceil(R*C))


def rank_main(rank, port, w, variant, steps, warmup, out):
    """One rank of one round: build, warm up, count one step's all-reduced bytes, time ``steps``."""
    dist = init_rank(rank, port)
    one, count, info = (_pockc_runner if variant == "pockc" else _ddp_runner)(w, rank)
    _, _, batches, _ = _build(w, rank)
    for i in range(warmup):
        one(batches[i % len(batches)])
    nbytes, calls = count(batches[0])
    times = []
    for i in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        one(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, times)
    if rank == 0:
        step_s = [max(ts) for ts in zip(*gathered)]      # the slower rank's
        torch.save({"step_s": step_s, "bytes": nbytes, "collectives": calls, **info}, out)
    finish_rank(dist)


def finish_rank(dist):
    """End a rank: a barrier, then destroy the process group. A process that exits with its gloo
    group alive aborts now and then ("terminate called without an active exception": 1 in 12
    exits measured, torch 2.13), and destroying it while a peer is still in a collective as well."""
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the run
def run(quick=False, steps=None, warmup=None, rounds=None, out_dir=RESULTS, only=None):
    from pockc.bench import git_commit, load_average, machine_info, require_committed
    require_committed(out_dir)
    steps = steps or (3 if quick else 10)
    warmup = warmup or (1 if quick else 3)
    rounds = rounds or (1 if quick else 2)
    specs = [w for w in workloads(quick) if only is None or any(o in w["name"] for o in only)]
    res = {"benchmark": "ddp_cpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": git_commit(), "machine": machine_info("cpu"),
           "settings": {"quick": quick, "steps": steps, "warmup": warmup, "rounds": rounds, "world": WORLD,
                        "threads_per_rank": 1, "backend": "gloo (127.0.0.1)"},
           "workloads": []}
    res["machine"]["load_average_start"] = load_average()
    from tqdm import tqdm
    t_start = time.perf_counter()
    bar = tqdm(total=len(specs) * rounds * 2, desc="bench_ddp", unit="round")
    with tempfile.TemporaryDirectory() as tmp:
        for w in specs:
            got = {"pockc": [], "ddp": []}
            for r in range(rounds):
                for variant in (("pockc", "ddp") if r % 2 == 0 else ("ddp", "pockc")):
                    bar.set_postfix_str(f"{w['name']} {variant}")
                    out = os.path.join(tmp, f"{variant}.pt")
                    codes = spawn_ranks(rank_main, (w, variant, steps, warmup, out))
                    if codes != [0] * WORLD:
                        raise RuntimeError(f"{w['name']} {variant}: rank exit codes {codes}")
                    got[variant].append(torch.load(out, weights_only=False))
                    bar.update()
            entry = {"name": w["name"], "workload": w}
            for variant, rs in got.items():
                times = [t for r in rs for t in r["step_s"]]
                entry[variant] = {k: v for k, v in rs[0].items() if k != "step_s"}
                entry[variant].update(step_s_median=statistics.median(times), step_s_min=min(times),
                                      step_s_max=max(times), step_s=times)
            p, d = entry["pockc"], entry["ddp"]
            entry["ddp_over_pockc_time"] = d["step_s_median"] / p["step_s_median"]
            entry["ddp_over_pockc_bytes"] = d["bytes"] / p["bytes"] if p["bytes"] else None
            res["workloads"].append(entry)
    bar.close()
    res["machine"]["load_average_end"] = load_average()
    res["wall_s"] = time.perf_counter() - t_start
    res["claims"] = claims(res)
    return res


def claims(res):
    out = []
    for e in res["workloads"]:
        p = e["pockc"]
        out.append({"claim": "pockc all-reduces exactly its trained rows' bytes", "workload": e["name"],
                    "measured": p["bytes"], "expected": p["planned_bytes"], "pass": p["bytes"] == p["planned_bytes"]})
        if e["workload"].get("channels") is not None:
            r = e["ddp_over_pockc_bytes"]
            out.append({"claim": "channel-sparse: >= 4x fewer bytes than DDP", "workload": e["name"],
                        "measured": r, "expected": 4.0, "pass": r is not None and r >= 4.0})
        r = e["ddp_over_pockc_time"]
        out.append({"claim": "step >= 1.2x faster than DDP with the same trainable set", "workload": e["name"],
                    "measured": r, "expected": 1.2, "pass": r >= 1.2})
    return out


def markdown(res) -> str:
    mi, st = res["machine"], res["settings"]
    lines = [f"# Data-parallel CPU benchmark: pockc vs torch DDP{' (quick mode)' if st['quick'] else ''}", "",
             f"{res['date']}, commit {res['git_commit']}; {mi.get('cpu_model')}, {mi.get('cpu_cores')} cores, torch "
             f"{mi.get('torch')}; {st['world']} ranks, gloo on 127.0.0.1, 1 thread per rank; load average "
             f"{mi.get('load_average_start')} at start, {mi.get('load_average_end')} at end; "
             f"{res.get('wall_s', 0) / 60:.1f} min.", "",
             f"Step: median (min-max) ms of {st['steps']} timed steps x {st['rounds']} rounds after {st['warmup']} "
             "warm-up steps, the slower rank's time of each step; each variant in its own pair of processes, "
             "rounds alternating. Bytes: measured all-reduce sizes per step per rank (pockc: its program's "
             "collectives; DDP: its buckets, through a communication hook).", ""]
    rows = []
    for e in res["workloads"]:
        p, d = e["pockc"], e["ddp"]
        rows.append([e["name"], p["trained_tensors"],
                     f"{p['step_s_median'] * 1e3:.1f} ({p['step_s_min'] * 1e3:.1f}-{p['step_s_max'] * 1e3:.1f})",
                     f"{d['step_s_median'] * 1e3:.1f} ({d['step_s_min'] * 1e3:.1f}-{d['step_s_max'] * 1e3:.1f})",
                     f"{e['ddp_over_pockc_time']:.2f}x", f"{p['bytes']:,} ({p['collectives']})",
                     f"{d['bytes']:,} ({d['collectives']})",
                     f"{e['ddp_over_pockc_bytes']:.2f}x" if e["ddp_over_pockc_bytes"] else "-",
                     f"{p['planned_peak'] / 2**20:.2f}"])
    lines.append(tabulate(rows, headers=["workload", "trained tensors", "pockc step ms", "DDP step ms",
                                         "DDP/pockc time", "pockc bytes (all-reduces)", "DDP bytes (buckets)",
                                         "DDP/pockc bytes", "pockc planned peak MiB"], tablefmt="github"))
    lines += ["", "| claim | workload | measured | target | result |", "|---|---|---|---|---|"]
    for c in res["claims"]:
        m = c["measured"]
        shown = f"{m:,}" if isinstance(m, int) else (f"{m:.2f}x" if m is not None else "-")
        want = f"{c['expected']:,}" if isinstance(c["expected"], int) else f">= {c['expected']:.1f}x"
        lines.append(f"| {c['claim']} | {c['workload']} | {shown} | {want} | {'PASS' if c['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description="pockc's distributed step vs torch DDP, 2 ranks on this machine")
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="workloads whose name contains one of these")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    from pockc.bench import BenchError, write_results
    try:
        res = run(a.quick, a.steps, a.warmup, a.rounds, a.out, a.only)
        md = markdown(res)
        write_results(a.out, "ddp_cpu_quick" if a.quick else "ddp_cpu", res, md)
    except BenchError as e:
        print(f"bench_ddp: {e}", file=sys.stderr)
        return 2
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
