"""Rematerialization benchmark (issue 6): full fine-tuning under budgets below the
no-recompute peak, against torch.utils.checkpoint and torch.compile's min-cut partitioner.

    python -m benchmarks.bench_remat            # writes benchmarks/results/remat_cpu.{json,md,png}
                                                # (~40 min on 2 cores, most of it Inductor compiling)
    python -m benchmarks.bench_remat --quick    # tiny sizes, two torch.compile budgets (smoke test,
                                                # ~15 min: MobileNetV2's graph is as large at any size)
    python -m benchmarks.bench_remat --quick --models resnet,bert    # ~5 min
    python -m benchmarks.bench_remat --replot   # redraw the plot and table from the saved JSON

Methods, each on the same model, batch and optimizer (SGD with momentum, full fine-tuning):

* **pockc** -- ``pockc.compile(update="full")`` once without a budget (its planned peak P0 and
  step time are the no-recompute reference), then with ``budget = f x P0`` for f in 75%, 50%,
  30% and ``remat="auto"`` (``--remat recompute``: no paging); per budget the planned and
  measured peak, the planner's time (step.remat.solve_seconds, both solvers), tensors recomputed
  and paged, ops added, the solver kept; or, when no plan fits, the smallest peak reached.
* **checkpoint** -- eager PyTorch (autograd + torch.optim), without and with
  ``torch.utils.checkpoint`` (non-reentrant) around every block (MobileNetV2 inverted residuals,
  ResNet basic blocks, BERT layers).
* **torch.compile** -- the loss (model forward, and through AOTAutograd its backward) under
  ``torch.compile`` (Inductor) with ``torch._functorch.config.activation_memory_budget`` swept
  over 1.0 (the default min-cut partition: the no-recompute reference), 0.75, 0.5, 0.3, 0.1; the
  knapsack in the min-cut partitioner recomputes activations to keep that fraction of the
  default partition's saved activations. torch.optim runs eagerly, as in the checkpoint
  baseline. Reported: the partitioner's time (every call of min_cut_rematerialization_partition,
  timed) and the whole set-up (dynamo + AOTAutograd + Inductor + C++ compilation).

Every configuration runs in **its own process** (one intra-op thread by default, the environment
of pockc.bench's workers: an Inductor step never shares a process or an OpenMP pool with an eager
or ATen one). All processes of one model are set up first, one after the other; step times are
then taken in interleaved rounds (each process one step per round, the first process rotated),
so that the machine's noise spreads over every method alike.

Peak memory, one metric for every method (see the notes written with the results):

* **allocator peak** -- the peak of live bytes allocated through PyTorch's CPU allocator during
  one step, from the profiler's memory events (``profile_memory=True``: every allocation and
  free of c10's CPU allocator, with the running total). It sees the buffers of Inductor's
  generated wrapper, which the dispatch-mode tracker of pockc.runtime.memory cannot; on eager
  and pockc's ATen steps it agrees with that tracker (checked per row, the tracker's figure is
  kept as its own column);
* **RSS peak** -- the process's resident-set high-water mark over one step (``VmHWM`` after
  ``echo 5 > /proc/self/clear_refs``) minus its resident set just before, measured in a second
  process per configuration started with glibc's mmap threshold at 64 KiB (every large block
  its own mapping, unmapped when freed; pockc's runtime/heap.py off: ``RSS_ENV``; not in the
  timed process, where it would slow the steps); it also sees memory kernels take outside PyTorch's allocator (oneDNN's
  reorders and scratch, Inductor's kernel-local buffers) and page rounding; median of 5 steps,
  Linux only.

Both are "allocated during the step"; the figures reported add the writable memory resident
across steps (trained weights, momentum, buffers, batch), as pockc's budget counts it.
Full fine-tuning with momentum keeps 2 x the weights resident, so a fraction f of the peak is
reachable only when activations are more than (1 - f) of it: the models' sizes are chosen so
activations dominate, as in fine-tuning on images / sequences of realistic size.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
FRACTIONS = (0.75, 0.5, 0.3)
AMBS = (1.0, 0.75, 0.5, 0.3, 0.1)          # torch._functorch.config.activation_memory_budget
QUICK_AMBS = (1.0, 0.3)
BLOCKS = {"mobilenet_v2": "InvertedResidual", "resnet": "BasicBlock", "bert": "BertLayer"}


def configs(quick):
    if quick:
        return [("mobilenet_v2", dict(batch=2, image=32, width=0.25)),
                ("resnet", dict(batch=2, image=32)),
                ("bert", dict(batch=2, seq=16))]
    return [("mobilenet_v2", dict(batch=4, image=96, width=1.0)),
            ("resnet", dict(batch=8, image=64, width=16)),
            ("bert", dict(batch=8, seq=128, d=128, heads=4, layers=4, ffn=512, vocab=1000))]


# --------------------------------------------------------------------------- peak memory of one step
def allocator_peak(fn, *args):
    """``(result, bytes)``: the peak of live bytes allocated through c10's CPU allocator during
    ``fn(*args)`` and not freed before that moment (allocations made before the call are not
    counted, even when freed during it).

    The profiler's memory events (``profile_memory=True``) report every allocation and free of
    the CPU allocator with the running total of the blocks allocated while profiling; that covers
    tensors an Inductor wrapper allocates outside the dispatcher, and tensors kernels allocate
    internally through PyTorch. Memory a kernel takes from malloc directly (oneDNN scratch) is
    not seen; see :func:`rss_peak`."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields))
    if not events:
        return out, 0
    events.sort(key=lambda e: e[0])
    # The running total carries blocks from earlier profiling sessions that were freed unseen:
    # measure from the total before the first event of this call.
    first = events[0][1]
    base = first.total_allocated - first.alloc_size
    return out, max(0, max(e.total_allocated for _, e in events) - base)


def _proc_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


# glibc settings of the processes that measure RSS (set before they start, so that every block
# from 64 KiB up is its own mapping, unmapped when freed, and the heap's top is given back at once);
# pockc's runtime would otherwise raise both thresholds at its first step (runtime/heap.py).
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_TOP_PAD_": "0",
           "POCKC_KEEP_HEAP": "0"}


def rss_peak(fn, *args, prepare=None, reps=5):
    """Peak resident-set growth of the process during ``fn(*args)``, in bytes: ``VmHWM`` (reset
    with ``echo 5 > /proc/self/clear_refs``) minus ``VmRSS`` just before the call, after
    ``prepare()``, a garbage collection and ``malloc_trim(0)``; ``reps`` calls, returns
    ``(median, samples)``, or ``(None, why)`` off Linux.

    Meaningful in a process started with :data:`RSS_ENV`: with glibc's default (dynamic) mmap
    threshold, blocks freed during the step stay in malloc's free lists and the resident set
    over-counts by up to 2.6x on these models; with it, the figure agrees with the exact tracker
    within a few percent where the tracker sees everything (checked in the results)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        return None, f"no /proc/self/clear_refs or glibc: {e}"
    samples = []
    for _ in range(reps):
        if prepare:
            prepare()
        gc.collect()
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status()["VmRSS"]
        fn(*args)
        samples.append(_proc_status()["VmHWM"] - before)
    return int(statistics.median(samples)), samples


# --------------------------------------------------------------------------- one configuration (worker)
def _checkpointed(model, block_type):
    """Wrap every ``block_type`` module's forward in torch.utils.checkpoint (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint
    for m in model.modules():
        if isinstance(m, block_type):
            fwd = m.forward
            m.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(fwd)
    return model


_PARTITION_S = []


def _time_partitioner():
    """Time every call of the min-cut partitioner Inductor makes (the name its partition function
    looks up in torch._inductor.compile_fx at call time); False where that name is missing."""
    try:
        import torch._inductor.compile_fx as cfx
        inner = cfx.min_cut_rematerialization_partition
    except (ImportError, AttributeError):
        return False

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            _PARTITION_S.append(time.perf_counter() - t0)

    cfx.min_cut_rematerialization_partition = timed
    return True


def _partitioner_seconds():
    """Seconds in the min-cut partitioner so far: the wrapper's, else Inductor's own
    ``dynamo_timed`` entry."""
    if _PARTITION_S:
        return sum(_PARTITION_S)
    try:
        from torch._dynamo.utils import compilation_time_metrics as m
    except ImportError:
        return None
    keys = [k for k in m if "min_cut_rematerialization_partition" in k]
    return sum(sum(m[k]) for k in keys) if keys else None


class _Worker:
    """Builds one configuration in this process; answers ``run N`` / ``memory`` / ``quit``."""

    def __init__(self, spec):
        import torch

        import pockc
        from pockc import zoo
        from pockc.bench import EagerStep
        torch.manual_seed(0)
        self.spec, method = spec, spec["method"]
        ex = zoo.ZOO[spec["model"]](**spec["sizes"])
        self.batch = ex.example_batch
        opt = pockc.SGD(lr=0.01, momentum=0.9)
        self.info = {}
        t0 = time.perf_counter()
        if method == "pockc":
            budget = spec.get("budget")
            try:
                step = pockc.compile(ex.model, ex.loss_fn, self.batch, update="full", optimizer=opt, budget=budget,
                                     remat=spec.get("remat", "auto"))
            except pockc.BudgetError as e:
                self.info.update(fits=False, smallest_bytes=getattr(e, "smallest_bytes", None), error=str(e),
                                 compile_s=time.perf_counter() - t0)
                self.runner = None
                return
            rep = step.remat
            self.info.update(fits=True, compile_s=time.perf_counter() - t0, graph_nodes=len(step.graph.graph.nodes),
                             planned=step.memory.peak_bytes, required=step.memory.plan.required_bytes,
                             persistent=step.memory.plan.persistent_bytes)
            if budget is not None:
                imp = rep.tries.get("scipy import", {}).get("seconds", 0.0) if rep else 0.0
                self.info.update(planner_s=rep.solve_seconds - imp if rep else 0.0, scipy_import_s=imp,
                                 solver=rep.solver if rep else "none", recomputed=len(rep.recomputed) if rep else 0,
                                 paged=len(getattr(rep, "paged", ())) if rep else 0,
                                 ops_added=rep.nodes_added if rep else 0,
                                 est_added_ms=rep.added_seconds * 1e3 if rep else 0.0,
                                 tries=rep.tries if rep else {})
            self.runner, self.prepare = step, None
        else:
            model, loss_fn = ex.model, ex.loss_fn
            if method == "checkpoint":
                model = _checkpointed(model, getattr(zoo, BLOCKS[spec["model"]]))
            elif method == "torch.compile":
                import torch._functorch.config as fconfig
                fconfig.activation_memory_budget = spec["amb"]
                _time_partitioner()
                loss_fn = torch.compile(loss_fn)
            self.runner = EagerStep(model, loss_fn, opt)
            self.prepare = self.runner.release_grads
        for _ in range(spec.get("warmup", 2)):  # the first calls compile (torch.compile: forward, then backward)
            self.runner(*self.batch)
        self.info["setup_s"] = time.perf_counter() - t0
        if method == "torch.compile":
            from torch._dynamo.utils import counters
            self.info.update(partitioner_s=_partitioner_seconds(), partitioner_calls=len(_PARTITION_S),
                             graphs=counters["stats"].get("unique_graphs", 0),
                             graph_breaks=sum(counters["graph_break"].values()))
        self.info["threads"] = torch.get_num_threads()
        self.info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")

    def run(self, n):
        from pockc.bench import time_calls
        return time_calls(self.runner, self.batch, n)

    def _resident(self):
        import torch

        from pockc.runtime.memory import storage_bytes
        r = self.runner
        state = [t for s in r.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return storage_bytes(list(r.leaves) + state + list(r.model.buffers())
                             + [b for b in self.batch if isinstance(b, torch.Tensor)])

    def rss(self):
        rss, samples = rss_peak(self.runner, *self.batch, prepare=self.prepare)
        return {"rss_transient": rss, "rss_samples": samples,
                "malloc_env": {k: os.environ.get(k) for k in RSS_ENV}}

    def memory(self):
        """Resident writable bytes and the transient peak of one step by the tracker (not for
        torch.compile) and the allocator."""
        from pockc.runtime.memory import measure_peak
        out = {}
        prep = self.prepare or (lambda: None)
        if self.spec["method"] == "pockc":
            total = self.runner.memory.measure(*self.batch)  # exact tracker, pockc's own accounting
            out["tracker_transient"] = self.runner.memory.last_measured_transient
            out["resident"] = total - out["tracker_transient"]
        elif self.spec["method"] != "torch.compile":  # the tracker cannot see Inductor's buffers
            prep()
            gc.collect()
            out["tracker_transient"] = measure_peak(self.runner, *self.batch)[1]
        if "resident" not in out:
            out["resident"] = self._resident()
        prep()
        gc.collect()
        out["allocator_transient"] = allocator_peak(self.runner, *self.batch)[1]
        for k in ("tracker", "allocator"):
            if out.get(f"{k}_transient") is not None:
                out[f"{k}_peak"] = out["resident"] + out[f"{k}_transient"]
        return out


def worker_main(spec_json):
    """The process side: one JSON line per command on stdout."""
    spec = json.loads(spec_json)
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out, sys.stdout = sys.stdout, sys.stderr  # keep library prints off the protocol channel
    try:
        w = _Worker(spec)
        ready = {"ready": w.runner is not None, **w.info}
    except Exception as e:  # noqa: BLE001 -- reported to the parent
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"[:800]}) + "\n")
        out.flush()
        return
    out.write(json.dumps(ready, default=str) + "\n")
    out.flush()
    if w.runner is None:
        return
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            out.write(json.dumps({"times": w.run(int(cmd[1]))}) + "\n")
        elif cmd[0] == "memory":
            out.write(json.dumps(w.memory(), default=str) + "\n")
        elif cmd[0] == "rss":
            out.write(json.dumps(w.rss(), default=str) + "\n")
        out.flush()


def _env(method, threads, cache_dir, rss=False):
    """pockc.bench's worker environment; torch.compile's caches in a directory of this run's own
    (each configuration compiles once per run: its timed process misses the caches and runs the
    partitioner, its RSS process then hits them); glibc's settings for RSS processes."""
    from pockc.bench import worker_env
    env = worker_env("compile_same" if method == "torch.compile" else "eager_full", threads)
    if method == "torch.compile":
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    if rss:
        env.update(RSS_ENV)
    return env


# --------------------------------------------------------------------------- one model (parent)
def bench_model(name, sizes, fractions, ambs, steps, threads, cache_dir, warmup=2, remat="auto",
                baselines=("eager", "checkpoint"), log=print):
    """Every configuration of one model, each in its own process; rows in a fixed order."""
    from pockc.bench import WorkerProcess
    base_spec = dict(model=name, sizes=sizes, threads=threads, warmup=warmup, remat=remat)
    rows, procs = [], []

    def start(row, spec):
        t0 = time.perf_counter()
        row["spec"] = spec
        pr = WorkerProcess(dict(base_spec, **spec), _env(spec["method"], threads, cache_dir),
                           "benchmarks.bench_remat")
        info = pr.read()
        row.update({k: v for k, v in info.items() if k != "ready"}, wall_setup_s=time.perf_counter() - t0)
        rows.append(row)
        if info.get("ready"):
            procs.append((row, pr))
        else:
            pr.close()
        return info

    try:
        info = start(dict(method="pockc", setting="no remat", fraction=None), dict(method="pockc"))
        if not info.get("ready"):
            raise RuntimeError(f"{name}: pockc without a budget failed: {info.get('error')}")
        p0 = info["required"]
        log(f"{name}: {info['graph_nodes']} nodes, no-remat peak P0 {p0:,} B, compile {info['compile_s']:.1f}s")
        for f in fractions:
            info = start(dict(method="pockc", setting=f"{f:.0%} of P0", fraction=f, budget=int(f * p0)),
                         dict(method="pockc", budget=int(f * p0)))
            log(f"  pockc {f:.0%}: " + (f"planned {info['planned']:,} B, planner {info['planner_s']:.2f}s "
                                        f"({info['solver']}), {info['recomputed']} recomputed, {info['paged']} paged"
                                        if info.get("fits")
                                        else f"does not fit (smallest {info.get('smallest_bytes')}) "
                                        f"{info.get('error', '')[:200] if info.get('fits') is None else ''}"))
        for method, setting in (("eager", "eager"), ("checkpoint", "checkpoint per block")):
            if method not in baselines:
                continue
            info = start(dict(method=method, setting=setting), dict(method=method))
            log(f"  {setting}: set up in {info.get('setup_s', 0):.1f}s {info.get('error', '')}")
        for a in ambs:
            info = start(dict(method="torch.compile", setting=f"budget {a:g}", amb=a),
                         dict(method="torch.compile", amb=a))
            log(f"  torch.compile activation_memory_budget={a:g}: set up in {info.get('setup_s', 0):.1f}s, "
                f"partitioner {info.get('partitioner_s')}s, {info.get('graph_breaks', '?')} graph breaks "
                f"{info.get('error', '')}")
        for r in range(steps):
            for i in range(len(procs)):
                row, pr = procs[(r + i) % len(procs)]
                pr.times += pr.ask("run 1")["times"]
        for row, pr in procs:
            row["step_s"] = statistics.median(pr.times)
            row["step_samples_ms"] = [round(t * 1e3, 3) for t in pr.times]
            row.update(pr.ask("memory"))
    finally:
        for _, pr in procs:
            pr.close()
    # RSS: one process per configuration with glibc's RSS_ENV (not the timed one: that malloc
    # setting maps and unmaps every large block, which would slow the timed steps)
    for row, _ in procs:
        pr = WorkerProcess(dict(base_spec, **row["spec"]), _env(row["method"], threads, cache_dir, rss=True),
                           "benchmarks.bench_remat")
        try:
            info = pr.read()
            got = pr.ask("rss") if info.get("ready") else {"rss_error": info.get("error")}
        finally:
            pr.close()
        row.update(got)
        if row.get("rss_transient") is not None:
            row["rss_peak"] = row["resident"] + row["rss_transient"]
        if row["method"] == "torch.compile":
            row["rss_process_setup_s"] = info.get("setup_s")
    ref = {"pockc": _find(rows, "pockc", None), "eager": _find(rows, "eager"),
           "checkpoint": _find(rows, "eager"), "torch.compile": _find(rows, "torch.compile", 1.0)}
    eager = ref["eager"]
    for row in rows:
        row["model"] = f"{name} {sizes}"
        base = ref.get(row["method"])
        if row.get("step_s") and base and base.get("step_s"):
            row["overhead"] = row["step_s"] / base["step_s"]
            # the same for the paired samples: median over rounds of this / reference
            row["overhead_paired"] = statistics.median(a / b for a, b in zip(row["step_samples_ms"],
                                                                             base["step_samples_ms"]))
        if row.get("step_s") and eager and eager.get("step_s"):
            row["vs_eager"] = row["step_s"] / eager["step_s"]
        if row.get("tracker_transient") and row.get("allocator_transient") is not None:
            row["allocator_over_tracker"] = row["allocator_transient"] / row["tracker_transient"]
        if row.get("tracker_transient") and row.get("rss_transient") is not None:
            row["rss_over_tracker"] = row["rss_transient"] / row["tracker_transient"]
    return rows


def _find(rows, method, key=None):
    for r in rows:
        if r["method"] != method:
            continue
        if method == "pockc" and r.get("fraction") != key:
            continue
        if method == "torch.compile" and r.get("amb") != key:
            continue
        return r
    return None


def run(quick=False, steps=None, threads=1, models=None, ambs=None, fractions=FRACTIONS, remat="auto", log=print):
    steps = steps or (3 if quick else 11)
    ambs = tuple(ambs) if ambs is not None else (QUICK_AMBS if quick else AMBS)
    cache_dir = tempfile.mkdtemp(prefix="pockc_remat_inductor_")
    rows = []
    try:
        for name, sizes in configs(quick):
            if models and name not in models:
                continue
            rows += bench_model(name, sizes, fractions, ambs, steps, threads, cache_dir, remat=remat, log=log)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rows, dict(steps=steps, threads=threads, ambs=list(ambs), fractions=list(fractions), quick=quick,
                      remat=remat)


# --------------------------------------------------------------------------- report
def _kb(b):
    return f"{b / 1024:,.0f}" if isinstance(b, (int, float)) else "-"


def _x(v):
    return f"{v:.2f}x" if isinstance(v, (int, float)) else "-"


def _ms(r):
    return f"{r['step_s'] * 1e3:.1f}" if r.get("step_s") else "-"


def _s(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def markdown(rows, meta, png=None):
    from tabulate import tabulate
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["# Rematerialization under a memory budget (issue 6)", "",
             f"{meta['date']} · {meta['machine']} · torch {meta['torch']} · commit {meta['commit']} · "
             f"{meta['threads']} thread(s) per process · load average at start {meta.get('loadavg')} · "
             f"{meta.get('wall_s', 0) / 60:.1f} min", ""]
    # 1. pockc and the eager baselines (tracker columns as before, plus the cross-method metrics)
    head = ["model", "method", "setting", "planned (KB)", "tracker (KB)", "allocator peak (KB)", "RSS peak (KB)",
            "step (ms)", "vs no recompute", "vs eager", "planner (s)", "solver", "recomputed", "paged", "ops added"]
    table = []
    for m in models:
        for r in rows:
            if r["model"] != m or r["method"] == "torch.compile":
                continue
            if r["method"] == "pockc" and r.get("fits") is False:
                table.append([m, "pockc", r["setting"], f"does not fit (smallest {_kb(r.get('smallest_bytes'))})"]
                             + ["-"] * (len(head) - 4))
                continue
            if r.get("step_s") is None:
                table.append([m, r["method"], r["setting"], f"error: {str(r.get('error'))[:80]}"]
                             + ["-"] * (len(head) - 4))
                continue
            table.append([m, r["method"], r["setting"], _kb(r.get("planned")), _kb(r.get("tracker_peak")),
                          _kb(r.get("allocator_peak")), _kb(r.get("rss_peak")), _ms(r), _x(r.get("overhead")),
                          _x(r.get("vs_eager")), _s(r.get("planner_s")), r.get("solver", "-"),
                          r.get("recomputed", "-"), r.get("paged", "-"), r.get("ops_added", "-")])
    lines += ["## pockc at a fraction of its no-recompute peak P0, and eager PyTorch with torch.utils.checkpoint",
              "", tabulate(table, headers=head, tablefmt="github"), ""]
    # 2. torch.compile's min-cut partitioner
    head = ["model", "activation_memory_budget", "allocator peak (KB)", "RSS peak (KB)", "step (ms)",
            "vs budget 1.0", "vs eager", "partitioner (s)", "set-up (s)", "graph breaks"]
    table = []
    for r in rows:
        if r["method"] != "torch.compile":
            continue
        if r.get("step_s") is None:
            table.append([r["model"], f"{r['amb']:g}", f"error: {str(r.get('error'))[:80]}"] + ["-"] * 7)
            continue
        table.append([r["model"], f"{r['amb']:g}", _kb(r.get("allocator_peak")), _kb(r.get("rss_peak")), _ms(r),
                      _x(r.get("overhead")), _x(r.get("vs_eager")), _s(r.get("partitioner_s")),
                      _s(r.get("setup_s")), r.get("graph_breaks", "-")])
    if table:
        lines += ["## torch.compile (Inductor), min-cut partitioner with activation_memory_budget", "",
                  tabulate(table, headers=head, tablefmt="github"), ""]
    # 3. the metric's check where the exact tracker applies
    table = [[r["model"], r["method"], r["setting"], _kb(r.get("tracker_transient")), _kb(r.get("allocator_transient")),
              f"{r['allocator_over_tracker']:.4f}", _kb(r.get("rss_transient")),
              f"{r['rss_over_tracker']:.3f}" if r.get("rss_over_tracker") else "-"]
             for r in rows if r.get("allocator_over_tracker")]
    if table:
        lines += ["## Check of the metrics against the exact tracker (memory allocated during one step)", "",
                  tabulate(table, headers=["model", "method", "setting", "tracker (KB)", "allocator (KB)",
                                           "allocator / tracker", "RSS (KB)", "RSS / tracker"],
                           tablefmt="github"), ""]
    lines += [
        "Writable memory: trained weights + SGD momentum + buffers + batch (resident across steps) + what one step "
        "allocates (activations, gradients, temporaries). Planned = step.memory.peak_bytes after rematerialize. "
        "Tracker = the exact CPU tracker of pockc.runtime.memory (a dispatch mode over tensor storages; "
        "step.memory.measure() for pockc, the second step for eager): it does not see the buffers "
        "Inductor's generated code allocates, so it has no figure for torch.compile. **Allocator peak** = the "
        "peak of live bytes allocated through PyTorch's CPU allocator during one step (the profiler's memory "
        "events, profile_memory=True), the metric every method is compared on: it sees Inductor's buffers "
        "and agrees with the tracker on eager and pockc (last table). **RSS peak** = growth of the process's "
        "resident set over one step (VmHWM after clear_refs, minus VmRSS before), in a second process per "
        "configuration started with MALLOC_MMAP_THRESHOLD_=65536 (every block from 64 KiB up its own mapping, "
        "unmapped when freed) and POCKC_KEEP_HEAP=0 (pockc's runtime/heap.py otherwise raises malloc's "
        "thresholds to keep the step's working memory mapped between steps, as the timed processes do), "
        "malloc_trim before the step, median of 5 steps: it also counts memory kernels "
        "take outside PyTorch's allocator (oneDNN's reorders and scratch around convolutions, Inductor's "
        "kernel-local buffers), page rounding and malloc's own slack. With glibc's default settings it "
        "over-counts by up to 2.6x on these models (freed blocks stay in malloc's free lists), hence the "
        "separate process; it is a cross-check of the allocator peak, not the basis of the comparison. "
        "pockc's paged activations (remat=\"auto\", column 'paged') go to a memory-mapped file mapped before the "
        "step: no metric here counts them as writable memory (RSS growth neither: the file's pages are "
        "resident from the first step on).",
        "",
        f"Step times: medians of {meta['steps']} steps per configuration after 2 warm-up steps, every "
        "configuration in its own process, timed in interleaved rounds (one step per process per round). "
        "'vs no recompute' divides by the method's own reference: pockc without a budget, eager without "
        "checkpointing, torch.compile at activation_memory_budget 1.0 (its default partition); 'vs eager' "
        "divides by eager PyTorch. The pockc planner time is the whole rematerialize pass (greedy and MILP, "
        "each verified with the memory planner) without scipy's one-time import. The torch.compile partitioner "
        "time is AOTAutograd's min_cut_rematerialization_partition (knapsack included); set-up is the first two "
        "steps (dynamo, AOTAutograd, Inductor, C++ compilation with kernels cached across this run's processes). "
        "activation_memory_budget is a fraction of the *saved activations* of the default partition, not of "
        "the whole step's peak, so its points are placed by their measured peak in the plot.",
    ]
    if png:
        lines += ["", f"![step time overhead against peak memory]({png})"]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Time overhead (step time / the method's no-recompute step time) against the allocator
    peak, one panel per model, a line per method; absolute step times below."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'pockc[plot]'): no plot")
        return False
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 8), squeeze=False)
    style = {"pockc": ("o-", "tab:blue"), "checkpoint": ("s--", "tab:orange"), "torch.compile": ("^-.", "tab:green")}
    for j, m in enumerate(models):
        mr = [r for r in rows if r["model"] == m and r.get("allocator_peak") and r.get("step_s")]
        lines = {"pockc": [r for r in mr if r["method"] == "pockc"],
                 "checkpoint": [r for r in mr if r["method"] in ("eager", "checkpoint")],
                 "torch.compile": [r for r in mr if r["method"] == "torch.compile"]}
        for k, (ax, key) in enumerate(((axes[0][j], "overhead"), (axes[1][j], "step_s"))):
            for meth, pts in lines.items():
                pts = sorted((p for p in pts if p.get(key)), key=lambda p: p["allocator_peak"])
                if not pts:
                    continue
                xs = [p["allocator_peak"] / 2 ** 20 for p in pts]
                ys = [p[key] * (1e3 if key == "step_s" else 1) for p in pts]
                fmt, color = style[meth]
                label = {"pockc": "pockc (no remat, budgets)", "checkpoint": "eager, + checkpoint per block",
                         "torch.compile": "torch.compile min-cut (budget sweep)"}[meth]
                ax.plot(xs, ys, fmt, color=color, label=label)
                for p, x, y in zip(pts, xs, ys):
                    tag = {"pockc": lambda p: "P0" if p.get("fraction") is None else f"{p['fraction']:.0%}",
                           "checkpoint": lambda p: "eager" if p["method"] == "eager" else "ckpt",
                           "torch.compile": lambda p: f"{p['amb']:g}"}[meth](p)
                    ax.annotate(tag, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7, color=color)
            ax.set_xlabel("peak writable memory (MiB, allocator peak)")
            ax.grid(alpha=0.3)
        axes[0][j].set_title(m.split(" {")[0] + "\n" + m[len(m.split(" {")[0]) + 1:], fontsize=8)
        axes[0][j].axhline(1.0, color="gray", lw=0.8)
        for k, r in enumerate(r for r in rows if r["model"] == m and r.get("budget")):
            for ax in axes[:, j]:   # the budgets pockc was given, met or not
                ax.axvline(r["budget"] / 2 ** 20, color="tab:blue", lw=0.6, ls=":",
                           label="pockc budgets (f x P0)" if k == 0 and ax is axes[0][j] else None)
        axes[0][j].set_ylabel("step time / no-recompute step time")
        axes[1][j].set_ylabel("median step time (ms)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    from pockc.bench import save_figure
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, activation_memory_budget 1.0 and 0.3 only")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 11; 3 quick)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    ap.add_argument("--models", default=None, help="comma-separated subset of mobilenet_v2,resnet,bert")
    ap.add_argument("--ambs", default=None, help="comma-separated activation_memory_budget values "
                    f"(default {','.join(map(str, AMBS))}; quick {','.join(map(str, QUICK_AMBS))}; '' for none)")
    ap.add_argument("--out", default=str(RESULTS), help="output directory")
    ap.add_argument("--name", default=None, help="output file stem (default remat_cpu[_quick])")
    ap.add_argument("--remat", default="auto", choices=("auto", "recompute"),
                    help="pockc's remat mode under a budget (default auto: recompute or page)")
    ap.add_argument("--replot", action="store_true", help="redraw the plot and table from the saved JSON")
    a = ap.parse_args(argv)
    from pockc.bench import run_meta, write_results
    out, stem = Path(a.out), a.name or ("remat_cpu_quick" if a.quick else "remat_cpu")
    if a.replot:
        data = json.loads((out / f"{stem}.json").read_text())
        png = f"{stem}.png" if plot(data["rows"], out / f"{stem}.png") else None
        from pockc.runtime.fileio import atomic_write
        atomic_write(out / f"{stem}.md", markdown(data["rows"], data["meta"], png))
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ambs = None if a.ambs is None else [float(x) for x in a.ambs.split(",") if x.strip()]
    t0 = time.perf_counter()
    rows, settings = run(a.quick, a.steps, a.threads, a.models.split(",") if a.models else None, ambs,
                         remat=a.remat)
    meta = run_meta(loadavg=load, wall_s=time.perf_counter() - t0, **settings)
    out.mkdir(parents=True, exist_ok=True)
    png = f"{stem}.png" if plot(rows, out / f"{stem}.png") else None
    md = markdown(rows, meta, png)
    write_results(out, stem, {"meta": meta, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
