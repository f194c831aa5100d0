"""Core CPU benchmark (issue 2): step time and peak memory of eager full fine-tuning, eager
PyTorch with the same trainable set, and the pockc step.

    python -m benchmarks.bench_core            # full sizes, 10 timed steps per variant
    python -m benchmarks.bench_core --quick    # tiny sizes, a smoke test (< 1 minute);
                                               # writes core_cpu_quick.{json,md}

Models (from pockc.zoo) and update policies:

* MobileNetV2 (batch 8, 128x128, width 1.0), pockc.SGD(lr=0.01, momentum=0.9):
  ``full``, ``last:4+head``, ``bias``;
* Llama-style decoder (d=512, 8 layers, 8 heads, seq 256, batch 4, vocab 8000),
  pockc.AdamW(lr=1e-4): ``full``, ``last:2``, ``{"layers.7.*": "channels:0.25"}``.

Variants, each in its own process (pockc.bench's workers) on a model built from the same seed:

* ``eager_full`` -- every parameter trained with torch.optim;
* ``eager_same`` -- the trainable set of the pockc plan, trained the way tests/oracle.py does it:
  frozen parameters have ``requires_grad=False``; a channel-sparse parameter keeps
  ``requires_grad=True`` (autograd computes its full gradient) and a separate leaf holding the
  selected rows is what torch.optim updates (its ``.grad`` is the selected rows of the
  parameter's gradient; the rows are written back after ``opt.step()``). For a contiguous row
  range the rows are taken with a slice rather than the oracle's index tensor (same scheme,
  cheaper). For ``update="full"`` this is exactly ``eager_full``, which is reused;
* ``pockc`` -- ``pockc.compile(...)`` of the same policy; compile time is reported separately
  and never timed as a step.

The eager loop is ``opt.zero_grad(set_to_none=True); loss = loss_fn(model, *batch);
loss.backward(); opt.step()``. torch.optim is built with its default ``foreach=None``, which on
CPU resolves to the single-tensor (for-loop) implementation, the code path whose arithmetic
pockc's in-graph optimizers follow; the resolved value is recorded in the JSON.

Timing: ``--warmup`` steps per variant (default 2), then ``--steps`` rounds (default 10): each
round asks every variant's process in turn for one step (the starting one rotates) while nothing
else runs, so machine noise spreads over all of them; medians, min and max are reported, and
ratios are taken from figures measured in this one run (also as the median of per-round paired
ratios). The 1-minute load average is sampled every round: a run whose load exceeded the cores
is flagged. Results go into benchmarks/results only from a committed tree.

Memory: one more, untimed step per variant under ``pockc.runtime.memory.measure_peak``: the
peak of tensor storage *allocated during the step* (activations, gradients, temporaries;
exact on CPU, see runtime/memory.py), plus ``resident_bytes``, the distinct storage of what
lives across steps (parameters, buffers, optimizer state, the eager channel-sparse leaves).
Gradients of the previous step are released before the measured step, as ``zero_grad`` does.

Threads: ``--threads`` per process (default 1; see DEFAULT_THREADS below for why).

Output: benchmarks/results/core_cpu.json (machine, commit, date, every figure) and
benchmarks/results/core_cpu.md (a GitHub-flavoured Markdown table).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

import pockc
from pockc import zoo
from pockc.runtime.memory import measure_peak, storage_bytes

RESULTS = Path(__file__).resolve().parent / "results"
# One intra-op thread by default: this is a 2-vCPU machine shared with other jobs, and with two
# OpenMP threads a step slows down ~20x whenever another process holds a core (threads spin /
# wait at every parallel region's barrier): measured, MobileNetV2 batch 8 @128px eager full step
# 0.38 s with 1 thread vs 7.6 s with 2 threads while one other process was busy. Pass
# --threads 0 for torch's default (all cores) on a quiet machine.
DEFAULT_THREADS = 1
MiB = 1024 * 1024


# --------------------------------------------------------------------------- configuration
def model_specs(quick: bool, sizes: dict | None = None, updates: dict | None = None) -> list[dict]:
    """The benchmarked models; ``sizes`` ({model: {kwarg: value}}) overrides builder kwargs and
    ``updates`` ({model: [policy, ...]}) the policies."""
    sizes, updates = sizes or {}, updates or {}
    mb = dict(batch=2, image=32, width=0.25) if quick else dict(batch=8, image=128, width=1.0)
    ll = (dict(batch=1, seq=32, vocab=256, d=64, heads=4, layers=2) if quick
          else dict(batch=4, seq=256, vocab=8000, d=512, heads=8, layers=8))
    mb.update(sizes.get("mobilenet_v2", {}))
    ll.update(sizes.get("llama", {}))
    last = ll["layers"] - 1
    specs = [
        dict(name="mobilenet_v2", builder=zoo.mobilenet_v2, sizes=mb,
             optimizer=pockc.SGD(lr=0.01, momentum=0.9),
             updates=["full", "last:4+head", "bias"]),
        dict(name="llama", builder=zoo.llama, sizes=ll,
             optimizer=pockc.AdamW(lr=1e-4),
             updates=["full", "last:2", {f"layers.{last}.*": "channels:0.25"}]),
    ]
    for spec in specs:
        spec["updates"] = list(updates.get(spec["name"], spec["updates"]))
    return specs


def update_label(update) -> str:
    return update if isinstance(update, str) else json.dumps(update)


# --------------------------------------------------------------------------- one variant (worker)
# One eager baseline for the tests' oracle and every benchmark; it lives in the installed package
# so that `pockc bench` can use it.
from pockc.bench import (BenchError, EagerStep, git_commit, load_average, run_workers, serve,  # noqa: E402
                         time_calls, worker_env, write_results)


class PockcStep:
    def __init__(self, model, loss_fn, batch, update, opt):
        self.model = model
        self.step = pockc.compile(model, loss_fn, batch, update=update, optimizer=copy.deepcopy(opt))
        self.compile_seconds = self.step.compile_seconds

    def release_grads(self):
        pass

    def __call__(self, *batch):
        return self.step(*batch)

    def resident(self):
        return list(self.model.parameters()) + list(self.model.buffers()) + list(self.step.state.values())


def summarize(times_s):
    ms = [t * 1e3 for t in times_s]
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms),
            "mean": statistics.fmean(ms), "samples": [round(m, 3) for m in ms]}


def measure_memory(runner, batch):
    runner.release_grads()
    gc.collect()
    resident = storage_bytes(runner.resident())
    _, peak = measure_peak(runner, *batch)
    return {"peak_bytes": peak, "resident_bytes": resident, "peak_total_bytes": resident + peak}


class StepWorker:
    """A variant in its own process (pockc.bench.serve): subclasses set ``runner``, ``batch`` and
    ``info``; every call of ``run`` and ``memory`` is one step of ``runner`` on ``batch``."""

    def warm_up(self, n):
        for _ in range(n):
            self.runner(*self.batch)

    def run(self, n):
        return time_calls(self.runner, self.batch, n)

    def memory(self):
        return measure_memory(self.runner, self.batch)


def time_variants(specs, module, threads, rounds, log, what="", env=None, concurrent_setup=True, keep_failed=False):
    """:func:`pockc.bench.run_workers` over ``specs`` (each variant's process started with
    ``python -m module --worker``, its environment ``env(variant)``, default worker_env), failing
    loudly if a variant failed -- or, with ``keep_failed``, marking its figure ``failed`` (it keeps
    its ``error``) and going on; returns ``(figures, step seconds per variant that ran, 1-minute
    load samples)``, each figure's ``time_ms`` summarized."""
    env = env or (lambda k: worker_env(k, threads))
    figs, load = run_workers(specs, module, lambda k, _: env(k), rounds, log=log, concurrent_setup=concurrent_setup)
    failed = {k: f["error"] for k, f in figs.items() if "error" in f}
    if failed and not keep_failed:
        raise RuntimeError(f"{what}variants failed: {failed}")
    for k in failed:
        figs[k]["failed"] = True
    times = {k: f.pop("_times") for k, f in figs.items() if k not in failed}
    for k in times:
        figs[k].pop("round_medians_ms", None)
        figs[k]["time_ms"] = summarize(times[k])
    return figs, times, load


class _Worker(StepWorker):
    """One variant (``eager_full``, ``eager_same`` or ``pockc`` of one policy) in its own process,
    on a model built from the same seed as every other variant's."""

    def __init__(self, spec):
        from pockc.trace import analyze_forward
        torch.manual_seed(0)
        ex = zoo.ZOO[spec["model"]](**spec["sizes"])
        opt = pockc.Optimizer.from_dict(spec["optimizer"])
        self.batch, variant = ex.example_batch, spec["variant"]
        t0 = time.perf_counter()
        if variant == "pockc":
            self.runner = PockcStep(ex.model, ex.loss_fn, self.batch, spec["update"], opt)
            self.info = {"compile_s": self.runner.compile_seconds}
        else:
            plan = None if variant == "eager_full" else pockc.resolve_update(
                spec["update"], ex.model, analyze_forward(ex.model, ex.loss_fn, self.batch))
            self.runner = EagerStep(ex.model, ex.loss_fn, opt, plan)
            self.info = {"torch_optim_foreach": self.runner.foreach}
        self.warm_up(spec["warmup"])
        self.info["setup_s"] = time.perf_counter() - t0


def worker_main(spec_json):
    serve(_Worker, spec_json)


def bench_model(spec, steps, warmup, threads, bar):
    """Every variant of one model, each in its own process (pockc.bench's workers), timed in
    interleaved rounds."""
    from pockc.trace import analyze_forward
    torch.manual_seed(0)
    ex = spec["builder"](**spec["sizes"])
    opt = spec["optimizer"]
    n_params = sum(p.numel() for p in ex.model.parameters())
    order = analyze_forward(ex.model, ex.loss_fn, ex.example_batch)
    base = dict(model=spec["name"], sizes=spec["sizes"], optimizer=opt.to_dict(), warmup=warmup, threads=threads)
    specs, configs = {"eager_full": dict(base, variant="eager_full")}, []
    for update in spec["updates"]:
        label = update_label(update)
        plan = pockc.resolve_update(update, ex.model, order)
        trained, _ = plan.counts()
        same_key = "eager_full" if trained == n_params and not any(
            plan.selection(n) is not None for n in plan.trainable_names()) else f"eager_same[{label}]"
        specs.setdefault(same_key, dict(base, variant="eager_same", update=update))
        specs[f"pockc[{label}]"] = dict(base, variant="pockc", update=update)
        configs.append(dict(update=update, label=label, same_key=same_key, pockc_key=f"pockc[{label}]",
                            trainable_tensors=len(plan.trainable_names()), trained_params=trained))

    def log(msg):
        bar.set_description(f"{spec['name']}: {msg}")
        if msg.startswith("round"):
            bar.update(1)
    figs, times, load = time_variants(specs, "benchmarks.bench_core", threads, steps, log, f"{spec['name']}: ")

    result = {"sizes": spec["sizes"], "optimizer": opt.to_dict(), "params": n_params, "load_1min": load,
              "eager_full": figs["eager_full"], "configs": []}
    med = statistics.median
    full_t = times["eager_full"]
    for c in configs:
        same_t, pk_t = times[c["same_key"]], times[c["pockc_key"]]
        same, pk = figs[c["same_key"]], figs[c["pockc_key"]]
        result["configs"].append({
            "update": c["update"], "label": c["label"],
            "trainable_tensors": c["trainable_tensors"], "trained_params": c["trained_params"],
            "trained_fraction": c["trained_params"] / n_params,
            "eager_same_is_eager_full": c["same_key"] == "eager_full",
            "eager_same": same, "pockc": pk,
            "ratios": {
                "eager_same_over_pockc": med(same_t) / med(pk_t),
                "eager_full_over_pockc": med(full_t) / med(pk_t),
                "eager_same_over_pockc_paired": med([a / b for a, b in zip(same_t, pk_t)]),
                "eager_full_over_pockc_paired": med([a / b for a, b in zip(full_t, pk_t)]),
                "peak_eager_same_over_pockc": same["peak_bytes"] / max(pk["peak_bytes"], 1),
                "peak_eager_full_over_pockc": result["eager_full"]["peak_bytes"] / max(pk["peak_bytes"], 1),
            },
        })
    return result


# --------------------------------------------------------------------------- reporting
def machine_info():
    from pockc.bench import machine_info as _machine_info
    info = _machine_info("cpu")
    info.pop("device", None)
    info["torch_num_threads"] = torch.get_num_threads()
    return info


def claims(models, quick):
    out = []
    for name, m in models.items():
        for c in m["configs"]:
            r = c["ratios"]["eager_same_over_pockc"]
            out.append({"claim": "pockc no slower than eager with the same trainable set", "model": name,
                        "update": c["label"], "ratio": r, "threshold": 1.0, "pass": r >= 1.0})
            if name == "llama" and c["label"] == "last:2":
                r = c["ratios"]["eager_full_over_pockc"]
                out.append({"claim": "pockc last:2 on the decoder >= 1.8x faster than eager full fine-tuning",
                            "model": name, "update": c["label"], "ratio": r, "threshold": 1.8, "pass": r >= 1.8})
    for c in out:
        c["quick_mode"] = quick
    return out


def _fmt_load(la):
    return "/".join(f"{x:.2f}" for x in la) if la else "n/a"


def markdown(res) -> str:
    rows = []
    for name, m in res["models"].items():
        ef = m["eager_full"]
        for c in m["configs"]:
            s, p, r = c["eager_same"], c["pockc"], c["ratios"]
            t = lambda f: f"{f['time_ms']['median']:.1f} ({f['time_ms']['min']:.0f}-{f['time_ms']['max']:.0f})"  # noqa: E731
            rows.append([name, c["label"], f"{c['trained_params']:,} ({100 * c['trained_fraction']:.1f}%)",
                         t(ef), t(s) + (" =full" if c["eager_same_is_eager_full"] else ""), t(p),
                         f"{r['eager_same_over_pockc']:.2f}x", f"{r['eager_full_over_pockc']:.2f}x",
                         f"{ef['peak_bytes'] / MiB:.1f}", f"{s['peak_bytes'] / MiB:.1f}", f"{p['peak_bytes'] / MiB:.1f}",
                         f"{p['compile_s']:.1f}"])
    headers = ["model", "update", "trained params", "eager full ms", "eager same ms", "pockc ms",
               "same/pockc", "full/pockc", "peak MiB eager full", "peak MiB eager same", "peak MiB pockc",
               "compile s"]
    mi = res["machine"]
    lines = [f"# Core CPU benchmark{' (quick mode)' if res['settings']['quick'] else ''}", "",
             f"{res['date']}, commit {res['git_commit']}; {mi['cpu_model']}, {mi['cpu_cores']} cores, "
             f"torch {mi['torch']} ({mi['torch_num_threads']} threads), {mi['platform']}; load average "
             f"{_fmt_load(mi.get('load_average_start'))} at start, {_fmt_load(mi.get('load_average_end'))} at end.", "",
             f"Step times: median (min-max) ms over {res['settings']['steps']} timed steps after "
             f"{res['settings']['warmup']} warm-up steps, each variant in its own process, timed in interleaved rounds (one run). "
             "Peak: MiB of tensor storage allocated during one step (parameters, buffers and optimizer "
             "state excluded; see `resident_bytes` in the JSON). Ratios > 1 mean pockc is faster / smaller.",
             "", tabulate(rows, headers=headers, tablefmt="github"), ""]
    for c in res["claims"]:
        lines.append(f"- {'PASS' if c['pass'] else 'FAIL'}: {c['claim']} ({c['model']}, {c['update']}): "
                     f"{c['ratio']:.2f}x (needs >= {c['threshold']}x)")
    return "\n".join(lines) + "\n"


def run(quick=False, steps=None, warmup=None, out_dir=RESULTS, models=None, sizes=None, updates=None,
        progress=True, name="core_cpu", threads=DEFAULT_THREADS):
    """Run the benchmark, write ``{name}.json`` and ``{name}.md`` under ``out_dir``; return the dict.

    ``threads``: intra-op threads of every variant's process; 0 or None keeps torch's default."""
    from pockc.bench import require_committed
    require_committed(out_dir)
    steps = steps if steps is not None else (3 if quick else 10)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    specs = [s for s in model_specs(quick, sizes, updates) if models is None or s["name"] in models]
    res = {"benchmark": "core_cpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": git_commit(), "machine": machine_info(),
           "settings": {"quick": quick, "steps": steps, "warmup": warmup, "threads": threads,
                        "timing": "one process per variant, interleaved rounds of one step per process, "
                                  "starting process rotated per round",
                        "torch_optim": "default foreach=None (resolved per variant in torch_optim_foreach)",
                        "memory": "peak_bytes: peak of storage allocated during one untimed step "
                                  "(pockc.runtime.memory.measure_peak); resident_bytes: parameters, "
                                  "buffers, optimizer state"},
           "models": {}}
    res["machine"]["torch_num_threads"] = threads or torch.get_num_threads()
    res["machine"]["load_average_start"] = load_average()  # 1/5/15-min: other processes' noise
    t0 = time.perf_counter()
    with tqdm(total=steps * len(specs), unit="round", disable=not progress, file=sys.stderr) as bar:
        for s in specs:
            res["models"][s["name"]] = bench_model(s, steps, warmup, threads, bar)
    res["machine"]["load_average_end"] = load_average()
    res["wall_s"] = time.perf_counter() - t0
    res["claims"] = claims(res["models"], quick)
    write_results(out_dir, name, res, markdown(res))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_core", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 3 steps: a smoke test")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; 1 with --quick)")
    ap.add_argument("--models", default=None, help="comma-separated subset of: mobilenet_v2,llama")
    ap.add_argument("--out", default=str(RESULTS), help="output directory (default benchmarks/results)")
    ap.add_argument("--name", default=None, help="output file stem (default core_cpu, core_cpu_quick with --quick)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help=f"intra-op threads per process (default {DEFAULT_THREADS}; 0 = torch's default)")
    ap.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    a = ap.parse_args(argv)
    name = a.name or ("core_cpu_quick" if a.quick else "core_cpu")
    try:
        res = run(a.quick, a.steps, a.warmup, a.out, a.models.split(",") if a.models else None,
                  progress=not a.no_progress, name=name, threads=a.threads)
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
