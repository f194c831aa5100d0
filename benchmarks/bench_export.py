"""Export benchmark: step time of pockc's step run from an AOTInductor package (``aoti``, runtime/
aoti.py) against the same step on ATen (``aten``, pockc's default) and eager PyTorch with the same
trainable set (``eager``: autograd + torch.optim, benchmarks' EagerStep).

    python -m benchmarks.bench_export            # full sizes; writes results/export_cpu.{json,md}
    python -m benchmarks.bench_export --quick    # tiny sizes, a smoke test; export_cpu_quick.{json,md}

Models and update policies (one optimizer each, the same for every variant):

* ``mcu_cnn``      -- examples/mcu_cnn.py (MCUNet-sized inverted residuals, 64x64, batch 1, BN
  folded), ``last:2``, SGD(lr=0.01, momentum=0.9);
* ``small_cnn``    -- pockc.zoo.small_cnn(batch=1, image=64) with BatchNorm in train mode (the
  ``mcu_cnn`` configuration of ``pockc bench``), ``last:2``, SGD(lr=0.01, momentum=0.9);
* ``mobilenet_v2`` -- pockc.zoo.mobilenet_v2(batch=8, image=128, width=1.0), ``last:4``, SGD
  momentum;
* ``llama``        -- pockc.zoo.llama(batch=4, seq=256, vocab=8000, d=512, heads=8, layers=8) (the
  decoder of benchmarks/bench_core.py), ``last:2``, AdamW(lr=1e-4).

Each variant runs in **its own process** (pockc.bench's WorkerProcess, one intra-op thread by
default), set up one after another so that the compile-and-package time of ``aoti`` is measured
on an otherwise idle machine; then all processes are timed in interleaved rounds (each round asks
every process in turn, starting process rotated, for ``--inner`` steps, each timed on its own).
Reported: median (min-max) step time, ratios of medians and medians of per-round paired ratios,
setup time (aten: pockc.compile; aoti: pockc.compile + export_aoti + load_aoti, with the export
alone as ``package s``), the first step's loss of every variant (they start from the same weights
and batch, so these agree), and the peak of new allocations during one untimed step at the
allocator (pockc.runtime.memory.measure_allocator_peak, the same measure for every variant; the
tensor tracker cannot see AOTInductor's buffers).

Output: benchmarks/results/export_cpu[_quick].json (machine with lscpu's model name, torch version,
commit, date, settings, every sample) and .md (the table).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from pockc.bench import (BenchError, git_commit, load_average, machine_info, require_committed, run_workers, serve,
                         worker_env, write_results)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("eager", "aten", "aoti")
MiB = 1024 * 1024
SGD = {"type": "SGD", "lr": 0.01, "momentum": 0.9}
ADAMW = {"type": "AdamW", "lr": 1e-4}


def configs(quick: bool) -> list[dict]:
    """model, builder kwargs, update, optimizer, timing rounds and steps per round."""
    if quick:
        return [dict(model="mcu_cnn", sizes={}, update="last:2", optimizer=SGD, rounds=5, inner=5),
                dict(model="mobilenet_v2", sizes=dict(batch=2, image=32, width=0.25), update="last:4",
                     optimizer=SGD, rounds=3, inner=2),
                dict(model="llama", sizes=dict(batch=1, seq=32, vocab=256, d=64, heads=4, layers=2),
                     update="last:2", optimizer=ADAMW, rounds=3, inner=2)]
    return [dict(model="mcu_cnn", sizes={}, update="last:2", optimizer=SGD, rounds=15, inner=20),
            dict(model="small_cnn", sizes=dict(batch=1, image=64), update="last:2", optimizer=SGD, rounds=15,
                 inner=20),
            dict(model="mobilenet_v2", sizes=dict(batch=8, image=128, width=1.0), update="last:4", optimizer=SGD,
                 rounds=10, inner=1),
            dict(model="llama", sizes=dict(batch=4, seq=256, vocab=8000, d=512, heads=8, layers=8),
                 update="last:2", optimizer=ADAMW, rounds=7, inner=1)]


# --------------------------------------------------------------------------- one variant (worker)
def build_example(name, sizes):
    """(model, example batch, loss_fn) of a benchmarked model, seeded."""
    import torch
    torch.manual_seed(0)
    if name == "mcu_cnn":
        spec = importlib.util.spec_from_file_location("pockc_example_mcu_cnn", REPO / "examples" / "mcu_cnn.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.model(), tuple(mod.example_batch()), mod.loss_fn
    from pockc import zoo
    ex = zoo.ZOO[name](**sizes)
    return ex.model, tuple(ex.example_batch), ex.loss_fn


class _Worker:
    def __init__(self, spec):
        import torch

        import pockc
        from pockc.bench import EagerStep
        from pockc.runtime.aoti import export_aoti, load_aoti
        model, self.batch, loss_fn = build_example(spec["model"], spec["sizes"])
        opt = pockc.Optimizer.from_dict(spec["optimizer"])
        variant, self.info = spec["variant"], {}
        t0 = time.perf_counter()
        if variant == "eager":
            from pockc.trace import analyze_forward
            plan = pockc.resolve_update(spec["update"], model, analyze_forward(model, loss_fn, self.batch))
            self.runner = EagerStep(model, loss_fn, opt, plan)
            self.info["torch_optim_foreach"] = self.runner.foreach
            self.info["trained_params"] = plan.counts()[0]
        else:
            step = pockc.compile(model, loss_fn, self.batch, update=spec["update"], optimizer=opt)
            self.info["compile_s"] = time.perf_counter() - t0
            self.info["trained_params"] = step.update_plan.counts()[0]
            self.info["graph_nodes"] = len(step.graph.graph.nodes)
            self.runner = step
            if variant == "aoti":
                self._tmp = tempfile.TemporaryDirectory(prefix="pockc-bench-export-")
                t1 = time.perf_counter()
                path = export_aoti(step, os.path.join(self._tmp.name, "step.pt2"))
                self.info["export_s"] = time.perf_counter() - t1
                self.info["package_bytes"] = os.path.getsize(path)
                t2 = time.perf_counter()
                self.runner = load_aoti(path)
                self.info["load_s"] = time.perf_counter() - t2
        self.info["warmup_losses"] = [float(self.runner(*self.batch)) for _ in range(spec["warmup"])]
        self.info["setup_s"] = time.perf_counter() - t0
        self.info["threads"] = torch.get_num_threads()

    def run(self, n):
        from pockc.bench import time_calls
        return time_calls(self.runner, self.batch, n)

    def memory(self):
        from pockc.runtime.memory import measure_allocator_peak
        if hasattr(self.runner, "release_grads"):
            self.runner.release_grads()
        gc.collect()
        _, peak = measure_allocator_peak(self.runner, *self.batch)
        return {"peak_bytes": peak}


def worker_main(spec_json):
    serve(_Worker, spec_json)


# --------------------------------------------------------------------------- one configuration
def bench_config(cfg, threads, warmup, log):
    result = {k: cfg[k] for k in ("model", "sizes", "update", "optimizer", "rounds", "inner")}
    specs = {v: dict(model=cfg["model"], sizes=cfg["sizes"], update=cfg["update"], optimizer=cfg["optimizer"],
                     variant=v, threads=threads, warmup=warmup) for v in VARIANTS}
    figs, result["load_1min"] = run_workers(
        specs, "benchmarks.bench_export", lambda v, _: worker_env("pockc[aoti]" if v == "aoti" else v, threads),
        cfg["rounds"], cfg["inner"], log=lambda m: log(f"{cfg['model']}: {m}"),
        concurrent_setup=False)   # one at a time: the setup times are those of an idle machine
    for f in figs.values():
        f.pop("_times", None)
    result["variants"] = figs
    result["ratios"] = ratios(result["variants"])
    return result


def ratios(vs) -> dict:
    out = {}
    for a, b in (("aten", "aoti"), ("eager", "aoti"), ("eager", "aten")):
        if "time_ms" in vs.get(a, {}) and "time_ms" in vs.get(b, {}):
            out[f"{a}/{b}"] = vs[a]["time_ms"]["median"] / vs[b]["time_ms"]["median"]
            out[f"{a}/{b} paired"] = statistics.median(
                x / y for x, y in zip(vs[a]["round_medians_ms"], vs[b]["round_medians_ms"]))
    return out


def claims(res) -> list[dict]:
    out = []
    for name, r in res["models"].items():
        mcu = name in ("mcu_cnn", "small_cnn")
        threshold = 1.2 if mcu else 1.0
        ratio = r["ratios"].get("aten/aoti")
        out.append({"claim": "aoti >= 1.2x faster than aten on the MCU-class CNN" if mcu
                    else "aoti no slower than aten", "model": name, "update": r["update"], "ratio": ratio,
                    "threshold": threshold, "pass": ratio is not None and ratio >= threshold,
                    "quick_mode": res["settings"]["quick"]})
    return out


# --------------------------------------------------------------------------- report
def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


def markdown(res) -> str:
    rows = []
    for name, r in res["models"].items():
        vs, q = r["variants"], r["ratios"]

        def t(v):
            f = vs.get(v, {}).get("time_ms")
            return f"{f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f})" if f else vs.get(v, {}).get("error", "-")[:40]

        def fmt(k):
            return f"{q[k]:.2f}x ({q[k + ' paired']:.2f}x)" if k in q else "-"

        a = vs.get("aoti", {})
        peak = lambda v: f"{vs[v]['peak_bytes'] / MiB:.2f}" if vs.get(v, {}).get("peak_bytes") is not None else "-"  # noqa: E731
        loss = "/".join(f"{vs[v]['warmup_losses'][0]:.6f}" if vs.get(v, {}).get("warmup_losses") else "-"
                        for v in VARIANTS)
        rows.append([name, r["update"], f"{vs.get('aten', {}).get('trained_params', 0):,}", t("eager"), t("aten"),
                     t("aoti"), fmt("aten/aoti"), fmt("eager/aoti"), fmt("eager/aten"),
                     f"{vs.get('aten', {}).get('compile_s', float('nan')):.1f}",
                     f"{a.get('export_s', float('nan')):.1f}", f"{a.get('setup_s', float('nan')):.1f}",
                     f"{a.get('package_bytes', 0) / MiB:.1f}", peak("eager"), peak("aten"), peak("aoti"), loss])
    headers = ["model", "update", "trained params", "eager ms", "aten ms", "aoti ms", "aten/aoti", "eager/aoti",
               "eager/aten", "compile s", "package s", "aoti setup s", "package MiB", "peak MiB eager",
               "peak MiB aten", "peak MiB aoti", "first loss eager/aten/aoti"]
    mi, st = res["machine"], res["settings"]
    lines = [f"# Export benchmark: AOTInductor package vs pockc aten vs eager{' (quick mode)' if st['quick'] else ''}",
             "", f"{res['date']}, commit {res['git_commit']}; {mi['lscpu_model']} ({mi['cpu_cores']} cores), torch "
             f"{mi['torch']}, {st['threads']} intra-op thread(s) per process, {mi['platform']}; load average "
             f"{mi.get('load_average_start')} at start, {mi.get('load_average_end')} at end.", "",
             "Step time: median (min-max) ms of every timed step; each variant in its own process, timed in "
             "interleaved rounds (starting process rotated). Ratios: of medians (in brackets: median of per-round "
             "paired ratios); > 1 means the right-hand variant is faster. compile s: pockc.compile; package s: "
             "export_aoti (torch.export + AOTInductor compile + packaging); aoti setup s: compile + package + load "
             "+ warm-up. Peak: new allocations during one step at the allocator.", "",
             tabulate(rows, headers=headers, tablefmt="github"), ""]
    for c in res["claims"]:
        r = "n/a" if c["ratio"] is None else f"{c['ratio']:.2f}x"
        lines.append(f"- {'PASS' if c['pass'] else 'FAIL'}: {c['claim']} ({c['model']}, {c['update']}): {r} "
                     f"(needs >= {c['threshold']}x)")
    return "\n".join(lines) + "\n"


def run(quick=False, models=None, threads=1, warmup=2, out_dir=RESULTS, name=None, progress=True):
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    require_committed(out_dir)
    cfgs = [c for c in configs(quick) if models is None or c["model"] in models]
    if not cfgs:
        raise SystemExit(f"no model matches {models}; choose from: {', '.join(c['model'] for c in configs(quick))}")
    info = machine_info("cpu")
    info.pop("device", None)
    info["lscpu_model"] = lscpu_model()
    res = {"benchmark": "export_cpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": git_commit(), "machine": info,
           "settings": {"quick": quick, "threads": threads, "warmup": warmup, "variants": list(VARIANTS),
                        "timing": "one process per variant, set up one after another; interleaved rounds of "
                                  "`inner` individually timed steps per process"},
           "models": {}}
    res["machine"]["load_average_start"] = load_average()
    t0 = time.perf_counter()
    for c in cfgs:
        res["models"][c["model"]] = bench_config(c, threads, warmup, log)
    res["wall_s"] = time.perf_counter() - t0
    res["machine"]["load_average_end"] = load_average()
    res["claims"] = claims(res)
    write_results(out_dir, name or ("export_cpu_quick" if quick else "export_cpu"), res, markdown(res))
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds: a smoke test")
    ap.add_argument("--models", default=None, help="comma-separated subset of: mcu_cnn,small_cnn,mobilenet_v2,llama")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant (default 2)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None, help="output file stem (default export_cpu[_quick])")
    a = ap.parse_args(argv)
    try:
        res = run(a.quick, a.models.split(",") if a.models else None, a.threads, a.warmup, a.out, a.name)
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(res))


if __name__ == "__main__":
    main()
