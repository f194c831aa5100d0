"""``pockc bench``: step time and peak memory of pockc against what users run today.

    pockc bench                   # the full suite on every device present (tens of minutes)
    pockc bench --quick           # small sizes, fewer configurations (< 3 minutes on 2 cores)
    python -m benchmarks ...      # the same, from a source checkout

For every model and update scheme it measures, **in the same run**:

* ``eager_full`` -- every parameter trained, eager autograd + torch.optim (default ``foreach``);
* ``eager_same`` -- the same trainable set as the pockc plan, eager (frozen parameters have
  ``requires_grad=False``; channel-sparse rows train through a separate leaf, see EagerStep);
* ``compile_same`` -- the same, with the loss function (model forward, and through AOTAutograd the
  backward) under ``torch.compile`` and torch.optim eager: the usual way to speed a step up today;
* ``pockc[aten]`` and ``pockc[inductor]`` -- ``pockc.compile(..., backend=...)``.

Each variant runs in **its own process** with the environment that suits it (one intra-op thread
by default; ``OMP_WAIT_POLICY=PASSIVE`` for Inductor-compiled variants when more than one thread is
asked for, see runtime/backends.py), so an Inductor step never shares an OpenMP pool with an eager
baseline. All processes of one configuration are set up first (build, compile, warm up), then
timed in rounds: each round asks every process in turn (rotating the starting one) for one step
and nothing else runs meanwhile, so machine noise spreads over all variants. Reported: median
step time with min and max, ratios of medians (and the median of per-round paired ratios),
compile / setup time, and peak memory of one untimed step: the peak of tensor storage allocated
during the step (``pockc.runtime.memory.measure_peak``: exact on CPU for ATen programs; on CPU it
cannot see the buffers of Inductor-generated code, so compiled variants report none there; CUDA
uses the caching allocator's peak for every variant) plus pockc's planned peak where the step has
a memory plan.

malloc: a pockc CPU step raises glibc malloc's trim and mmap thresholds in its process so its
working memory stays mapped between steps (runtime/heap.py). By default (``--malloc kept``) every
variant's process gets the same raised thresholds before it builds anything, so the ratios measure
the steps, not malloc's trimming; ``--malloc default`` leaves the baselines' processes with
malloc's defaults (what a user running eager PyTorch has) while pockc's steps raise their own.

Output: ``bench_<device>[_quick].json`` (machine, torch version, git commit, date, settings, every
figure), ``.md`` (a table) and, when matplotlib is installed and ``--plot`` is given, ``.png``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024
MALLOC_MODES = ("kept", "default")
KEPT_HEAP_BYTES = 1 << 30  # --malloc kept: every process keeps up to 2 GiB of free heap mapped
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" if (REPO / "benchmarks").is_dir() else Path("pockc_bench")


# --------------------------------------------------------------------------- the suite
def suite(quick: bool) -> list[dict]:
    """Models, sizes, optimizers and schemes. A scheme is (label, update policy, options)."""
    sgd = {"type": "SGD", "lr": 0.01, "momentum": 0.9}
    adamw = {"type": "AdamW", "lr": 1e-4}
    if quick:
        return [
            dict(model="small_cnn", label="mcu_cnn", sizes=dict(batch=1, image=32), optimizer=sgd,
                 schemes=[("last:2", "last:2"), ("bias", "bias", {"variants": ["eager_full", "eager_same",
                                                                                "pockc[aten]"]})]),
            dict(model="mobilenet_v2", label="mobilenet_v2", sizes=dict(batch=2, image=32, width=0.25),
                 optimizer=sgd, schemes=[("last:4+head", "last:4+head")]),
            dict(model="llama", label="llama", sizes=dict(batch=1, seq=32, vocab=256, d=64, heads=4, layers=2),
                 optimizer=adamw, schemes=[("last:1", "last:1", {"variants": ["eager_full", "eager_same",
                                                                              "pockc[aten]"]})]),
        ]
    return [
        dict(model="small_cnn", label="mcu_cnn", sizes=dict(batch=1, image=64), optimizer=sgd,
             schemes=[("full", "full"), ("bias", "bias"), ("last:2", "last:2"),
                      ("channels:0.25", ["last:2", {"features.3.0.weight": "channels:0.25"}]),
                      ("last:2 bn-eval", "last:2", {"bn_eval": True})]),
        dict(model="mobilenet_v2", label="mobilenet_v2", sizes=dict(batch=8, image=128, width=1.0),
             optimizer=sgd,
             schemes=[("full", "full"), ("bias", "bias"), ("last:4+head", "last:4+head"),
                      ("channels:0.25", ["last:4+head", {"features.1[5-8].*.weight": "channels:0.25"}]),
                      ("last:4+head bn-eval", "last:4+head", {"bn_eval": True})]),
        dict(model="resnet", label="resnet18", sizes=dict(batch=8, image=32, blocks=(2, 2, 2, 2), width=32),
             optimizer=sgd, schemes=[("full", "full"), ("bias", "bias"), ("last:2+head", "last:2+head"),
                                     ("channels:0.25", ["last:2+head", {"layer4.*.weight": "channels:0.25"}])]),
        dict(model="bert", label="bert", sizes=dict(batch=8, seq=128, vocab=8000, d=256, heads=4, layers=4, ffn=1024),
             optimizer=adamw, schemes=[("full", "full"), ("bias", "bias"), ("last:1+head", "last:1+head"),
                                       ("channels:0.25", {"layers.3.*.weight": "channels:0.25",
                                                          "classifier.*": "full"})]),
        dict(model="llama", label="llama", sizes=dict(batch=4, seq=128, vocab=4000, d=256, heads=4, layers=4),
             optimizer=adamw, schemes=[("full", "full"), ("last:1", "last:1"),
                                       ("channels:0.25", {"layers.3.*": "channels:0.25"}),
                                       ("lora r=8", "lora", {"lora": dict(r=8, lora_alpha=16,
                                                                          target_modules=["q_proj", "v_proj"])})]),
    ]


VARIANTS = ("eager_full", "eager_same", "compile_same", "pockc[aten]", "pockc[inductor]", "pockc[aoti]")


def devices_present() -> list[str]:
    import torch
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


# --------------------------------------------------------------------------- eager baselines
def torch_optimizer(opt, params, **extra):
    """torch.optim twin of a pockc optimizer (torch.optim's default ``foreach`` unless ``extra``
    says otherwise)."""
    import torch
    cfg = {k: v for k, v in opt.to_dict().items() if k != "type"}
    cls = {"SGD": torch.optim.SGD, "AdamW": torch.optim.AdamW}[type(opt).__name__]
    return cls(params, **cfg, **extra)


def resolved_foreach(params) -> bool | None:
    """What torch.optim's ``foreach=None`` resolves to for ``params``."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
        return bool(_default_to_fused_or_foreach(list(params), differentiable=False, use_fused=False)[1])
    except Exception:  # noqa: BLE001 -- private API; record "unknown" rather than fail
        return None


class EagerStep:
    """One eager training step; ``plan=None`` trains every parameter.

    With a plan: frozen parameters get ``requires_grad=False``; a channel-sparse parameter keeps
    ``requires_grad=True`` (autograd computes its full gradient) and a separate leaf holding the
    selected rows is what torch.optim updates (its ``.grad`` is the selected rows of the
    parameter's gradient; the rows are written back after ``opt.step()``). This is also the
    correctness oracle of tests/oracle.py."""

    def __init__(self, model, loss_fn, opt, plan=None, **optim_kwargs):
        import torch
        self.model, self.loss_fn = model, loss_fn
        params = dict(model.named_parameters())
        self.sparse = []  # (parameter, row index, leaf holding those rows)
        if plan is None:
            leaves = list(params.values())
        else:
            for p in params.values():
                p.requires_grad_(False)
            leaves = []
            for name in plan.trainable_names():
                p = params[name]
                p.requires_grad_(True)
                sel = plan.selection(name)
                if sel is None:
                    leaves.append(p)
                    continue
                idx = slice(sel[1], sel[2]) if sel[0] == "slice" else torch.tensor(list(sel[1]), device=p.device)
                leaf = p.detach()[idx].clone().requires_grad_(True)
                leaves.append(leaf)
                self.sparse.append((p, idx, leaf))
        self.leaves = leaves
        self.opt = torch_optimizer(opt, leaves, **optim_kwargs)
        self.foreach = resolved_foreach(leaves)

    def release_grads(self):
        self.opt.zero_grad(set_to_none=True)
        for p, _, _ in self.sparse:
            p.grad = None

    def __call__(self, *batch):
        import torch
        self.release_grads()
        loss = self.loss_fn(self.model, *batch)
        loss.backward()
        for p, idx, leaf in self.sparse:
            leaf.grad = None if p.grad is None else p.grad[idx]
        self.opt.step()
        if self.sparse:
            with torch.no_grad():
                for p, idx, leaf in self.sparse:
                    p[idx] = leaf
        return loss.detach()

    def resident(self):
        import torch
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return (list(self.model.parameters()) + list(self.model.buffers()) + state
                + [leaf for _, _, leaf in self.sparse])


# --------------------------------------------------------------------------- one variant (worker)
def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _to(x, device):
    import torch
    return x.to(device) if isinstance(x, torch.Tensor) else x


def time_calls(fn, args, n, device="cpu") -> list:
    """Seconds of each of ``n`` calls ``fn(*args)``, the garbage collected and ``device`` synchronized
    before each (the timing loop of every benchmark worker)."""
    times = []
    for _ in range(n):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


class _Worker:
    """Builds one variant in this process and answers ``run N`` / ``memory`` / ``quit``."""

    def __init__(self, spec):
        import torch

        import pockc
        from pockc import zoo
        from pockc.trace import analyze_forward
        self.spec, self.device = spec, spec["device"]
        torch.manual_seed(0)
        ex = zoo.ZOO[spec["model"]](**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["sizes"].items()})
        model = ex.model.to(self.device)
        opts = spec.get("options") or {}
        if opts.get("bn_eval"):
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self.batch = tuple(_to(b, self.device) for b in ex.example_batch)
        opt = pockc.Optimizer.from_dict(spec["optimizer"])
        variant, update = spec["variant"], spec["update"]
        self.compiled_memory_blind = variant in ("compile_same", "pockc[inductor]") and self.device == "cpu"
        self.planned_peak = None
        t0 = time.perf_counter()
        if variant == "eager_full":
            self.runner = EagerStep(model, ex.loss_fn, opt)
        elif variant in ("eager_same", "compile_same"):
            if opts.get("lora"):
                raise RuntimeError("no eager LoRA baseline in this suite")
            plan = pockc.resolve_update(update, model, analyze_forward(model, ex.loss_fn, self.batch))
            loss_fn = torch.compile(ex.loss_fn) if variant == "compile_same" else ex.loss_fn
            self.runner = EagerStep(model, loss_fn, opt, plan)
        elif variant == "pockc[aoti]":          # the step exported as an AOTInductor package, run from it
            import tempfile

            from pockc.runtime.aoti import export_aoti, load_aoti
            if opts.get("lora"):
                step = pockc.finetune(model, ex.loss_fn, self.batch, lora=pockc.LoraConfig(**opts["lora"]),
                                      optimizer=opt)
            else:
                step = pockc.compile(model, ex.loss_fn, self.batch, update=update, optimizer=opt, distributed=False)
            self.planned_peak = step.memory.peak_bytes
            self._tmp = tempfile.TemporaryDirectory(prefix="pockc-bench-")
            t_export = time.perf_counter()
            path = export_aoti(step, os.path.join(self._tmp.name, "step.pt2"))
            self.export_s = time.perf_counter() - t_export
            self.runner = load_aoti(path)
            self.allocator_memory = True    # AOTI's buffers are c10 allocations the tensor tracker cannot see
        else:
            backend = variant[len("pockc["):-1]
            if opts.get("lora"):
                step = pockc.finetune(model, ex.loss_fn, self.batch, lora=pockc.LoraConfig(**opts["lora"]),
                                      optimizer=opt)
                step.backend = backend
            else:
                step = pockc.compile(model, ex.loss_fn, self.batch, update=update, optimizer=opt, backend=backend,
                                     distributed=False)
            mem = getattr(step, "memory", None)
            self.planned_peak = getattr(mem, "peak_bytes", None)
            self.runner = step
        self.model = model
        n_warm = spec.get("warmup", 2)
        for _ in range(n_warm):  # the first call lowers lazily compiled programs
            self.runner(*self.batch)
        _sync(self.device)
        self.setup_s = time.perf_counter() - t0
        self.info = {"setup_s": self.setup_s, "planned_peak_bytes": self.planned_peak,
                     "export_s": getattr(self, "export_s", None), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
        if isinstance(self.runner, EagerStep):
            self.info["torch_optim_foreach"] = self.runner.foreach

    def run(self, n):
        return time_calls(self.runner, self.batch, n, self.device)

    def memory(self):
        if self.compiled_memory_blind:
            return {"peak_bytes": None, "why": "the CPU tracker cannot see Inductor-generated buffers"}
        from pockc.runtime.memory import measure_allocator_peak, measure_peak
        if getattr(self, "allocator_memory", False):
            gc.collect()
            _, peak = measure_allocator_peak(self.runner, *self.batch)
            return {"peak_bytes": peak, "measured_at": "allocator"}
        if hasattr(self.runner, "release_grads"):
            self.runner.release_grads()
        gc.collect()
        _, peak = measure_peak(self.runner, *self.batch)
        return {"peak_bytes": peak}


def serve(build, spec_json):
    """The worker side of :class:`WorkerProcess`'s protocol, for every benchmark: ``build(spec)``
    makes the variant in this process (an object with ``info``, a dict, and ``run(n)`` returning
    ``n`` step times; optionally ``memory()`` and ``rss()`` returning dicts); then one JSON line
    answers each command read on stdin (``run N``, ``memory``, ``rss``, ``quit``)."""
    from pockc.runtime import heap
    spec = json.loads(spec_json)
    if spec.get("malloc", "kept") == "kept":  # the same thresholds in every variant's process
        heap.keep_heap(KEPT_HEAP_BYTES)
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out, sys.stdout = sys.stdout, sys.stderr  # keep library prints off the protocol channel
    try:
        w = build(spec)
        ready = {"ready": True, "threads": torch.get_num_threads(), **w.info}
        ready["malloc_thresholds"] = heap.thresholds()  # after set-up: a pockc step has raised its own
    except Exception as e:  # noqa: BLE001 -- reported to the parent as a failed variant
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"[:800]}) + "\n")
        out.flush()
        return
    out.write(json.dumps(ready, default=str) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            reply = {"times": w.run(int(cmd[1]))}
        elif cmd[0] in ("memory", "rss") and hasattr(w, cmd[0]):
            reply = getattr(w, cmd[0])()
        else:
            reply = {"error": f"unknown command {cmd[0]!r}"}
        out.write(json.dumps(reply, default=str) + "\n")
        out.flush()


def worker_main(spec_json):
    serve(_Worker, spec_json)


class WorkerProcess:
    """A benchmark worker process speaking one JSON line per command (``python -m module --worker
    SPEC``). Its stderr goes to a temporary file: a pipe nobody reads while the parent times other
    processes could fill up (compiler warnings) and block the worker."""

    def __init__(self, spec, env, module="pockc.bench"):
        self.spec, self.times = spec, []
        self.err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([sys.executable, "-m", module, "--worker", json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  env=env, cwd=str(REPO))

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            self.err.seek(0)
            return {"ready": False, "error": f"worker exited ({self.p.returncode}): {self.err.read()[-800:].strip()}"}
        return json.loads(line)

    def ask(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except OSError:
            pass
        try:
            self.p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.err):
            try:
                f.close()
            except OSError:
                pass


def worker_env(variant, threads):
    """The environment a variant's process starts with (see the module docstring)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    compiled = variant in ("compile_same", "pockc[inductor]")
    if compiled and threads != 1 and "OMP_WAIT_POLICY" not in os.environ:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


# --------------------------------------------------------------------------- the parent side
def run_workers(specs: dict, module, env_for, rounds, inner=1, log=None, concurrent_setup=True, memory=True):
    """Start one :class:`WorkerProcess` per ``specs`` entry (``python -m module --worker``, with the
    environment ``env_for(key, spec)``), then time them in ``rounds`` interleaved rounds of
    ``inner`` steps per process (the starting process rotates each round, nothing else runs
    meanwhile), then ask each for ``memory``. Set-up runs concurrently unless
    ``concurrent_setup=False`` (set-up times then are those of an idle machine).

    Returns ``(figures, load)``: per key the worker's ready-info plus ``time_ms`` (median, min,
    max, samples), ``round_medians_ms``, ``_times`` (seconds, flat) and the memory reply, or
    ``{"error": ...}``; ``load``: the 1-minute load average sampled before every round."""
    log = log or (lambda s: None)
    procs, figs, load = {}, {}, []
    try:
        started = {}
        for k, spec in specs.items():
            log(f"setting up {k}")
            started[k] = WorkerProcess(spec, env_for(k, spec), module=module)
            if not concurrent_setup:
                figs[k] = started[k].read()
        for k, pr in started.items():
            info = figs[k] if k in figs else pr.read()
            if info.pop("ready", False):
                procs[k], figs[k] = pr, info
            else:
                figs[k] = {"error": info.get("error")}
                log(f"{k} failed: {info.get('error')}")
                pr.close()
        keys, rounds_t = list(procs), {k: [] for k in procs}
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}")
            load.append(load_average(1))
            for i in range(len(keys)):
                k = keys[(r + i) % len(keys)]
                rounds_t[k].append(procs[k].ask(f"run {inner}")["times"])
        for k in keys:
            flat = [t for rnd in rounds_t[k] for t in rnd]
            figs[k].update(time_ms=_summary(flat), _times=flat,
                           round_medians_ms=[statistics.median(rnd) * 1e3 for rnd in rounds_t[k]])
            if memory:
                figs[k].update(procs[k].ask("memory"))
    finally:
        for pr in procs.values():
            pr.close()
    return figs, load


# --------------------------------------------------------------------------- one configuration
def _summary(times_s):
    ms = [t * 1e3 for t in times_s]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "samples": [round(m, 3) for m in ms]}


def bench_config(model_spec, scheme, device, variants, steps, warmup, threads, bar=None, malloc="kept"):
    """Time every variant of one (model, scheme), each in its own process, interleaved."""
    label, update = scheme[0], scheme[1]
    options = scheme[2] if len(scheme) > 2 else {}
    is_lora = bool(options.get("lora"))
    wanted = [v for v in variants if not (is_lora and v in ("eager_same", "compile_same"))]
    if update == "full" and not options:  # the same trainable set as eager full
        wanted = [v for v in wanted if v != "eager_same"]
    if options.get("variants"):
        wanted = [v for v in wanted if v in options["variants"]]
    result = {"label": label, "update": update, "options": options}
    if bar is not None:
        bar.set_description(f"{model_spec['label']} {label}: {len(wanted)} variants")
    specs = {v: dict(model=model_spec["model"], sizes=model_spec["sizes"], optimizer=model_spec["optimizer"],
                     update=update, options=options, variant=v, device=device, threads=threads, warmup=warmup,
                     malloc=malloc) for v in wanted}
    result["variants"], result["load_1min"] = run_workers(specs, "pockc.bench", lambda v, _: worker_env(v, threads),
                                                          steps)
    if "eager_same" not in result["variants"] and update == "full" and not options and \
            "eager_full" in result["variants"]:
        result["variants"]["eager_same"] = dict(result["variants"]["eager_full"], same_as="eager_full")
    result["ratios"] = _ratios(result["variants"])
    for fig in result["variants"].values():
        fig.pop("_times", None)
    return result


def _ratios(vs):
    out = {}
    med = statistics.median

    def t(k):
        f = vs.get(k, {})
        return f.get("_times") or None

    if t("pockc[aten]") and t("pockc[aoti]"):
        out["pockc[aten]/pockc[aoti]"] = med(t("pockc[aten]")) / med(t("pockc[aoti]"))
    for pk in ("pockc[aten]", "pockc[inductor]", "pockc[aoti]"):
        if not t(pk):
            continue
        for base in ("eager_full", "eager_same", "compile_same"):
            if not t(base):
                continue
            out[f"{base}/{pk}"] = med(t(base)) / med(t(pk))
            if vs[base].get("same_as") is None:
                out[f"{base}/{pk} paired"] = med([a / b for a, b in zip(t(base), t(pk))])
    return out


# --------------------------------------------------------------------------- the run
def machine_info(device):
    import torch
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu,
            "cpu_cores": os.cpu_count(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    info["load_average_start"] = load_average()
    return info


def run_meta(**extra) -> dict:
    """Date, machine, torch version, commit and Python of a benchmark run, plus ``extra``."""
    import torch
    info = machine_info("cpu")
    return dict(date=datetime.date.today().isoformat(), machine=f"{info['cpu_model']}, {info['cpu_cores']} cores",
                torch=torch.__version__, commit=git_commit(), python=info["python"], **extra)


class BenchError(ValueError):
    """A benchmark asked to do something it must not (e.g. write results from an uncommitted tree)."""


RESULTS_DIR = REPO / "benchmarks" / "results"


def load_average(minutes=None):
    """``os.getloadavg()`` rounded to 2 decimals (1, 5, 15 minutes), or only the ``minutes=1``
    figure; None where the OS has none."""
    try:
        la = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
    return la[0] if minutes == 1 else la


def tree_changes() -> list[str]:
    """Tracked files of this checkout with uncommitted changes, benchmarks/results/ excluded (a
    benchmark's own output); [] outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)benchmarks/results"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln[3:] for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []


def require_committed(out_dir):
    """Results go into the repository's benchmarks/results only from a committed tree, so the
    commit a result file records is the code that produced it; elsewhere (``--out DIR``) anything
    goes. Raises BenchError naming the changed files."""
    out = Path(out_dir).resolve()
    results = RESULTS_DIR.resolve()
    if out != results and results not in out.parents:
        return
    changed = tree_changes()
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise BenchError(f"{out} holds committed benchmark results, and this tree has uncommitted changes "
                         f"({shown}): commit first, or write elsewhere with --out DIR")


def _loads(payload):
    """Every 1-minute load figure a payload recorded (machine start/end, per-round samples)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("load_average_start", "load_average_end") and isinstance(v, list) and v:
                    found.append(v[0])
                elif k == "load_1min" and isinstance(v, list):
                    found.extend(a for a in v if isinstance(a, (int, float)))
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(payload)
    return found


def annotate_load(payload, md: str):
    """Record the highest 1-minute load average the run saw against the cores; a run whose load
    exceeded the cores (another job competed for them) is flagged in the JSON and the table."""
    loads, cores = _loads(payload), os.cpu_count() or 1
    peak = max(loads) if loads else None
    payload["load"] = {"max_1min": peak, "cores": cores, "exceeded_cores": peak is not None and peak > cores}
    if payload["load"]["exceeded_cores"]:
        head, _, rest = md.partition("\n")
        md = (f"{head}\n\n> **Noisy run:** the 1-minute load average reached {peak:.2f} on {cores} cores (other "
              f"processes competed for them); treat its ratios with care.\n{rest}")
    return md


def write_results(out_dir, stem, payload, md: str) -> Path:
    """Write a benchmark's ``stem.json`` (the payload) and ``stem.md`` (its table) to ``out_dir``,
    atomically, after :func:`require_committed` and with the load recorded (:func:`annotate_load`)."""
    from pockc.runtime.fileio import atomic_write
    require_committed(out_dir)
    if payload.get("git_commit") not in (None, git_commit()):
        raise BenchError(f"the commit changed during the run ({payload['git_commit']} -> {git_commit()}); "
                         "run it again")
    md = annotate_load(payload, md)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{stem}.json", json.dumps(payload, indent=1, default=str) + "\n")  # never half a file
    atomic_write(out_dir / f"{stem}.md", md)
    return out_dir


def save_figure(fig, path, **kwargs):
    """``fig.savefig(path)``, atomically (rendered in memory, then written by atomic_write)."""
    import io

    from pockc.runtime.fileio import atomic_write
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write(path, buf.getvalue())


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip() + ("+dirty" if tree_changes() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def run(quick=False, devices=None, models=None, schemes=None, variants=VARIANTS, steps=None, warmup=None,
        threads=1, out_dir=None, name=None, progress=True, plot=False, malloc="kept"):
    """Run the suite; write ``{name}.json`` / ``.md`` (and ``.png`` with ``plot``) per device and
    return the result dicts."""
    from tqdm import tqdm
    devices = devices or devices_present()
    steps = steps if steps is not None else (3 if quick else 10)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    specs = [s for s in suite(quick) if models is None or s["label"] in models or s["model"] in models]
    if not specs:
        raise ValueError(f"no model matches {models}; choose from: {', '.join(s['label'] for s in suite(quick))}")
    for s in specs:
        if schemes is not None:
            s["schemes"] = [sc for sc in s["schemes"] if sc[0] in schemes]
        s["schemes"] = [_norm_scheme(sc) for sc in s["schemes"]]
    lora_ok = _has_lora()
    out_dir = Path(out_dir or DEFAULT_OUT)
    require_committed(out_dir)   # before tens of minutes of work, not after
    results = []
    for device in devices:
        res = {"benchmark": "pockc bench", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "git_commit": git_commit(), "machine": machine_info(device),
               "settings": {"quick": quick, "steps": steps, "warmup": warmup, "threads": threads, "malloc": malloc,
                            "variants": list(variants), "timing": "one process per variant, rounds of one "
                            "step per process, starting process rotated per round"},
               "models": {}, "skipped": []}
        t0 = time.perf_counter()
        n = sum(len(s["schemes"]) for s in specs)
        with tqdm(total=n, unit="config", disable=not progress, file=sys.stderr) as bar:
            for s in specs:
                rows = []
                for sc in s["schemes"]:
                    if (sc[2] or {}).get("lora") and not lora_ok:
                        res["skipped"].append(f"{s['label']} {sc[0]}: pockc.finetune / LoraConfig not available")
                        bar.update(1)
                        continue
                    rows.append(bench_config(s, sc, device, variants, steps, warmup, threads, bar, malloc))
                    bar.update(1)
                res["models"][s["label"]] = {"model": s["model"], "sizes": s["sizes"], "optimizer": s["optimizer"],
                                             "configs": rows}
        res["wall_s"] = time.perf_counter() - t0
        res["machine"]["load_average_end"] = load_average()
        res["claims"] = claims(res)
        stem = name or f"bench_{device}{'_quick' if quick else ''}"
        write_results(out_dir, stem, res, markdown(res))
        if plot:
            _plot(res, out_dir / f"{stem}.png")
        results.append(res)
    return results


def _norm_scheme(sc):
    return (sc[0], sc[1], dict(sc[2]) if len(sc) > 2 else {})


def _has_lora():
    try:
        import pockc
        return hasattr(pockc, "finetune") and hasattr(pockc, "LoraConfig")
    except Exception:  # noqa: BLE001
        return False


def claims(res):
    """The issue's targets, checked against this run's figures (never softened)."""
    out = []

    def add(claim, model, label, key, threshold, cfg):
        r = cfg["ratios"].get(key)
        if r is not None:
            out.append({"claim": claim, "model": model, "scheme": label, "ratio": r, "threshold": threshold,
                        "pass": r >= threshold})

    for mname, m in res["models"].items():
        for cfg in m["configs"]:
            best = max(("pockc[aten]", "pockc[inductor]"), key=lambda k: -(cfg["variants"].get(k, {}).get(
                "time_ms", {}).get("median", float("inf"))))
            for pk in ("pockc[aten]", "pockc[inductor]"):
                add(f"{pk} no slower than eager with the same trainable set", mname, cfg["label"],
                    f"eager_same/{pk}", 1.0, cfg)
            if mname == "mcu_cnn":
                add("pockc[aoti] >= 1.2x pockc[aten] on the MCU-class CNN", mname, cfg["label"],
                    "pockc[aten]/pockc[aoti]", 1.2, cfg)
            else:
                add("pockc[aoti] no slower than pockc[aten]", mname, cfg["label"], "pockc[aten]/pockc[aoti]", 1.0, cfg)
            if res["settings"]["quick"]:  # the targets are defined at full size (b8, 128px)
                continue
            if mname == "mobilenet_v2" and cfg["label"] == "last:4+head":
                add(f"{best} last-4 >= 1.5x eager same set", mname, cfg["label"], f"eager_same/{best}", 1.5, cfg)
                add(f"{best} last-4 >= 1.0x torch.compile same set", mname, cfg["label"], f"compile_same/{best}",
                    1.0, cfg)
                add(f"{best} last-4 >= 3x eager full", mname, cfg["label"], f"eager_full/{best}", 3.0, cfg)
            if mname == "mobilenet_v2" and cfg["label"] == "bias":
                add(f"{best} bias-only >= 1.5x eager bias-only", mname, cfg["label"], f"eager_same/{best}", 1.5, cfg)
    return out


def _fmt_t(f):
    t = f.get("time_ms")
    if not t:
        return "error" if f.get("error") else "-"
    return f"{t['median']:.1f} ({t['min']:.0f}-{t['max']:.0f})"


def _fmt_mem(f):
    p = f.get("peak_bytes")
    return "n/a" if p is None else f"{p / MiB:.1f}"


def markdown(res) -> str:
    from tabulate import tabulate
    rows = []
    for mname, m in res["models"].items():
        for cfg in m["configs"]:
            vs, r = cfg["variants"], cfg["ratios"]
            row = [mname, cfg["label"]]
            for v in VARIANTS:
                row.append(_fmt_t(vs.get(v, {})) + (" =full" if vs.get(v, {}).get("same_as") else ""))
            for pk in ("pockc[aten]", "pockc[inductor]"):
                row += [f"{r[k]:.2f}x" if k in r else "-" for k in (f"eager_same/{pk}", f"compile_same/{pk}",
                                                                    f"eager_full/{pk}")]
            row.append(f"{r['pockc[aten]/pockc[aoti]']:.2f}x" if "pockc[aten]/pockc[aoti]" in r else "-")
            row += [_fmt_mem(vs.get(v, {})) for v in ("eager_full", "eager_same", "pockc[aten]", "pockc[aoti]")]
            planned = vs.get("pockc[aten]", {}).get("planned_peak_bytes")
            row.append("-" if planned is None else f"{planned / MiB:.1f}")
            row += [f"{vs.get(v, {}).get('setup_s', 0):.0f}" if "setup_s" in vs.get(v, {}) else "-"
                    for v in ("compile_same", "pockc[aten]", "pockc[inductor]", "pockc[aoti]")]
            export_s = vs.get("pockc[aoti]", {}).get("export_s")
            row.append("-" if export_s is None else f"{export_s:.0f}")
            rows.append(row)
    headers = (["model", "scheme", "eager full ms", "eager same ms", "torch.compile same ms", "pockc aten ms",
                "pockc inductor ms", "pockc aoti ms", "same/aten", "compile/aten", "full/aten", "same/ind",
                "compile/ind", "full/ind", "aten/aoti", "peak MiB eager full", "peak MiB eager same",
                "peak MiB pockc aten", "peak MiB pockc aoti", "planned MiB pockc", "setup s compile",
                "setup s aten", "setup s ind", "setup s aoti", "package s aoti"])
    mi, st = res["machine"], res["settings"]
    la = lambda k: "/".join(f"{x:.2f}" for x in mi[k]) if mi.get(k) else "n/a"  # noqa: E731
    lines = [f"# pockc bench: {mi['device']}{' (quick)' if st['quick'] else ''}", "",
             f"{res['date']}, commit {res['git_commit']}; {mi['cpu_model']}, {mi['cpu_cores']} cores"
             f"{', ' + mi['gpu'] if mi.get('gpu') else ''}; torch {mi['torch']}; {st['threads']} intra-op thread(s) "
             f"per process; load average {la('load_average_start')} at start, {la('load_average_end')} at end; "
             f"{res.get('wall_s', 0) / 60:.1f} min.", "",
             f"Median step time (min-max) in ms over {st['steps']} timed steps after {st['warmup']} warm-up steps; "
             "every variant in its own process, timed in interleaved rounds. Ratios: baseline median / pockc "
             "median (> 1: pockc faster). Peak: MiB of tensor storage allocated during one step (parameters, "
             "buffers, optimizer state excluded); n/a where the CPU tracker cannot see Inductor buffers; the aoti "
             "peak is measured at the allocator (kernel scratch included). aoti: the step exported with "
             "step.export(target='aoti') and run from the package; package s: its export and packaging time. "
             "Setup: build + compile + warm-up seconds. " + MALLOC_NOTE[st.get("malloc", "kept")], "",
             tabulate(rows, headers=headers, tablefmt="github"), ""]
    for c in res["claims"]:
        lines.append(f"- {'PASS' if c['pass'] else 'FAIL'}: {c['claim']} ({c['model']}, {c['scheme']}): "
                     f"{c['ratio']:.2f}x (needs >= {c['threshold']}x)")
    for s in res.get("skipped", []):
        lines.append(f"- skipped: {s}")
    errors = [(m, c["label"], v, f["error"]) for m, mm in res["models"].items() for c in mm["configs"]
              for v, f in c["variants"].items() if f.get("error")]
    for m, lab, v, e in errors:
        lines.append(f"- error: {m} {lab} {v}: {e}")
    return "\n".join(lines) + "\n"


MALLOC_NOTE = {
    "kept": "malloc: the same raised trim/mmap thresholds in every process (--malloc kept).",
    "default": "malloc: defaults in the baselines' processes; pockc's steps raise their own thresholds "
               "(--malloc default: what a user gets).",
}


def _plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pockc bench: matplotlib is not installed; no plot", file=sys.stderr)
        return
    labels, series = [], {v: [] for v in VARIANTS}
    mems = {v: [] for v in ("eager_same", "pockc[aten]")}
    for mname, m in res["models"].items():
        for cfg in m["configs"]:
            labels.append(f"{mname}\n{cfg['label']}")
            for v in VARIANTS:
                series[v].append(cfg["variants"].get(v, {}).get("time_ms", {}).get("median", float("nan")))
            for v in mems:
                p = cfg["variants"].get(v, {}).get("peak_bytes")
                mems[v].append(float("nan") if p is None else p / MiB)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, len(labels) * 1.1), 8))
    w = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        a1.bar([x + i * w for x in range(len(labels))], series[v], w, label=v)
    a1.set_ylabel("ms / step (median)")
    a1.set_yscale("log")
    a1.legend(fontsize=7)
    for i, v in enumerate(mems):
        a2.bar([x + i * 0.4 for x in range(len(labels))], mems[v], 0.4, label=v)
    a2.set_ylabel("peak MiB during a step")
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.set_xticks([x + 0.3 for x in range(len(labels))])
        a.set_xticklabels(labels, fontsize=6)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------- command line
def add_arguments(ap):
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer configurations (< 3 minutes)")
    ap.add_argument("--device", default=None, help="comma-separated: cpu,cuda,mps (default: every one present)")
    ap.add_argument("--models", default=None, help="comma-separated subset: mcu_cnn,mobilenet_v2,resnet18,bert,llama")
    ap.add_argument("--schemes", default=None, help="comma-separated scheme labels to keep (e.g. full,bias,last:2)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated subset of {','.join(VARIANTS)} (default: all; with --quick all but "
                         "pockc[aoti], whose AOTInductor packaging takes tens of seconds per configuration)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; 1 with --quick)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads per process (default 1: the cores are often shared; 0 = torch's default)")
    ap.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--name", default=None, help="output file stem (default bench_<device>[_quick])")
    ap.add_argument("--plot", action="store_true", help="also write a .png (needs matplotlib)")
    ap.add_argument("--malloc", choices=MALLOC_MODES, default="kept",
                    help="kept (default): the same raised glibc malloc thresholds in every variant's process; "
                         "default: malloc's defaults for the baselines, pockc's steps raise their own")
    ap.add_argument("--no-progress", action="store_true")


def main_args(a):
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    variants = split(a.variants) or [v for v in VARIANTS if not (a.quick and v == "pockc[aoti]")]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    devices = split(a.device)
    if devices:
        present = devices_present()
        missing = [d for d in devices if d not in present]
        if missing:
            raise ValueError(f"device(s) {missing} not available here; present: {', '.join(present)}")
    results = run(a.quick, devices, split(a.models), split(a.schemes), variants, a.steps, a.warmup, a.threads,
                  a.out, a.name, not a.no_progress, a.plot, a.malloc)
    for res in results:
        print(markdown(res))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return 0
    ap = argparse.ArgumentParser(prog="pockc bench", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return main_args(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
