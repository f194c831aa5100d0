"""ExecuTorch benchmark: pockc's step as an ExecuTorch program (``.pte``, runtime/executorch.py) run by
ExecuTorch's runtime, against the same step on ATen (``aten``, pockc's default) and eager PyTorch
with the same trainable set (``eager``: autograd + torch.optim).

    python -m benchmarks.bench_executorch            # writes results/executorch_cpu.{json,md}
    python -m benchmarks.bench_executorch --quick    # fewer rounds; executorch_cpu_quick.{json,md}

Variants: ``eager``, ``aten``, ``pte`` (ExecuTorch's portable kernels, pockc's memory planning)
and ``pte_xnnpack`` (what XNNPACK takes delegated to it). Models (one optimizer each):

* ``mcu_cnn``   -- examples/mcu_cnn.py (64x64, batch 1, BN folded), ``last:2``, SGD momentum;
  also exported with ``budget="256KB"``: does the program's arena fit 256 KB;
* ``small_cnn`` -- pockc.zoo.small_cnn(batch=1, image=64), BN in train mode, ``last:2``;
* ``mobilenet_v2`` -- pockc.zoo.mobilenet_v2(batch=2, image=64, width=0.35), dropout in eval mode
  (a program draws no random numbers), ``last:4``.

Each variant runs in its own process (pockc.bench's WorkerProcess, one intra-op thread), set up
one after another, then timed in interleaved rounds. Memory, per variant: ``eager`` and ``aten``
-- the allocator-level peak of new allocations during one step plus the writable tensors the step
holds (pockc.runtime.memory.measure_allocator_peak; for ``aten`` also pockc's planned peak);
``pte*`` -- the program's planned train_step arena read back from the file (activations and
temporaries, memory id 1, plus the shared trained state, id 2), and the same with ExecuTorch's own
greedy planner (``pte_greedy_arena``). The ExecuTorch runtime allocates that arena itself; torch's
allocator does not see it.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from benchmarks.bench_export import build_example, lscpu_model
from pockc.bench import (BenchError, git_commit, load_average, machine_info, require_committed, run_workers, serve,
                         worker_env, write_results)

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("eager", "aten", "pte", "pte_xnnpack")
SGD = {"type": "SGD", "lr": 0.01, "momentum": 0.9}
KiB = 1024


def configs(quick: bool) -> list[dict]:
    r = 3 if quick else 1
    return [dict(model="mcu_cnn", sizes={}, update="last:2", optimizer=SGD, rounds=15 // r, inner=5, budget=256 * KiB),
            dict(model="small_cnn", sizes=dict(batch=1, image=64), update="last:2", optimizer=SGD, rounds=15 // r,
                 inner=5),
            dict(model="mobilenet_v2", sizes=dict(batch=2, image=64, width=0.35), update="last:4", optimizer=SGD,
                 rounds=9 // r, inner=1)]


# --------------------------------------------------------------------------- one variant (worker)
class _Worker:
    def __init__(self, spec):
        import torch

        import pockc
        from pockc.bench import EagerStep
        model, self.batch, loss_fn = build_example(spec["model"], spec["sizes"])
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
        opt = pockc.Optimizer.from_dict(spec["optimizer"])
        variant, self.info = spec["variant"], {}
        t0 = time.perf_counter()
        self.step = None
        if variant == "eager":
            from pockc.trace import analyze_forward
            plan = pockc.resolve_update(spec["update"], model, analyze_forward(model, loss_fn, self.batch))
            self.runner = EagerStep(model, loss_fn, opt, plan)
        else:
            step = pockc.compile(model, loss_fn, self.batch, update=spec["update"], optimizer=opt)
            self.info["compile_s"] = time.perf_counter() - t0
            self.info["trained_params"] = step.update_plan.counts()[0]
            self.info["planned_peak_bytes"] = step.memory.peak_bytes
            self.runner = self.step = step
            if variant.startswith("pte"):
                self._export(step, spec, xnnpack=variant == "pte_xnnpack")
        self.info["warmup_losses"] = [float(self.runner(*self.batch)) for _ in range(spec["warmup"])]
        self.info["setup_s"] = time.perf_counter() - t0
        self.info["threads"] = torch.get_num_threads()

    def _export(self, step, spec, xnnpack):
        from pockc.runtime import executorch as et
        self._tmp = tempfile.TemporaryDirectory(prefix="pockc-bench-et-")
        path = os.path.join(self._tmp.name, "step.pte")
        t1 = time.perf_counter()
        step.export(path, target="executorch", xnnpack=xnnpack, predict=False)
        self.info["export_s"] = time.perf_counter() - t1
        rep = et.program_report(path)
        train = rep["methods"]["train_step"]
        self.info.update(program_bytes=rep["program_bytes"], arena_bytes=train["arena"],
                         arena_activations=train["activations"], arena_state=train["state"],
                         kernels=train["kernels"], delegates=train["delegates"])
        if not xnnpack:
            greedy = os.path.join(self._tmp.name, "greedy.pte")
            step.export(greedy, target="executorch", predict=False, memory_planning="greedy")
            self.info["greedy_arena_bytes"] = et.program_report(greedy)["methods"]["train_step"]["arena"]
            if spec.get("budget"):
                try:
                    step.export(os.path.join(self._tmp.name, "b.pte"), target="executorch", predict=False,
                                budget=spec["budget"])
                    self.info["fits_budget"] = True
                except et.ArenaOverBudget as e:
                    self.info["fits_budget"], self.info["budget_error"] = False, str(e)
        self.runner = et.load_executorch(path)

    def run(self, n):
        from pockc.bench import time_calls
        return time_calls(self.runner, self.batch, n)

    def memory(self):
        from pockc.runtime.memory import measure_allocator_peak, storage_bytes
        if self.info.get("arena_bytes") is not None:
            return {"peak_bytes": None}
        if hasattr(self.runner, "release_grads"):
            self.runner.release_grads()
        gc.collect()
        _, peak = measure_allocator_peak(self.runner, *self.batch)
        if self.step is not None:     # the step's writable tensors, as the plan counts them
            lay, model = self.step.layout, self.step.model
            params = dict(model.named_parameters())
            held = [params[n] for n in lay.params] + list(self.step.state.values())
            held += [t for n, t in model.named_buffers() if n in set(lay.buffers)]
            return {"peak_bytes": peak, "held_bytes": storage_bytes(held)}
        import torch   # eager: the trained leaves, torch.optim's state and the train-mode buffers
        held = list(self.runner.leaves) + [v for st in self.runner.opt.state.values() for v in st.values()
                                           if isinstance(v, torch.Tensor)]
        held += [b for m in self.runner.model.modules() if m.training for b in m.buffers(recurse=False)]
        return {"peak_bytes": peak, "held_bytes": storage_bytes(held)}


def worker_main(spec_json):
    serve(_Worker, spec_json)


# --------------------------------------------------------------------------- runs
def ratio(vs, a, b):
    if "time_ms" not in vs.get(a, {}) or "time_ms" not in vs.get(b, {}):
        return None
    return {"of_medians": vs[a]["time_ms"]["median"] / vs[b]["time_ms"]["median"],
            "paired": statistics.median(x / y for x, y in zip(vs[a]["round_medians_ms"], vs[b]["round_medians_ms"]))}


def bench_config(cfg, threads, warmup, log):
    result = {k: cfg[k] for k in ("model", "sizes", "update", "optimizer", "rounds", "inner")}
    specs = {v: dict(model=cfg["model"], sizes=cfg["sizes"], update=cfg["update"], optimizer=cfg["optimizer"],
                     variant=v, threads=threads, warmup=warmup, budget=cfg.get("budget")) for v in VARIANTS}
    figs, result["load_1min"] = run_workers(
        specs, "benchmarks.bench_executorch", lambda v, _: worker_env(v, threads), cfg["rounds"], cfg["inner"],
        log=lambda m: log(f"{cfg['model']}: {m}"), concurrent_setup=False)
    for f in figs.values():
        f.pop("_times", None)
    result["variants"] = figs
    result["ratios"] = {f"{a}/{b}": ratio(figs, a, b) for a, b in
                        (("pte", "aten"), ("pte_xnnpack", "aten"), ("pte", "pte_xnnpack"), ("eager", "aten"))}
    return result


def claims(res) -> list[dict]:
    out = []
    mcu = res["models"].get("mcu_cnn", {}).get("variants", {}).get("pte", {})
    if "fits_budget" in mcu:
        out.append({"claim": "the MCU example with the benchmark's fixed last:2 plan: .pte train_step arena fits 256 KB (the plan pockc selects for --budget 256KB is tested to fit: tests/test_executorch.py)", "pass": bool(mcu["fits_budget"]),
                    "value": mcu.get("arena_bytes")})
    for name, r in res["models"].items():
        p = r["variants"].get("pte", {})
        if p.get("arena_bytes") and p.get("greedy_arena_bytes"):
            out.append({"claim": f"{name}: pockc's planning gives an arena no larger than ExecuTorch's greedy",
                        "pass": p["arena_bytes"] <= p["greedy_arena_bytes"],
                        "value": p["greedy_arena_bytes"] / p["arena_bytes"]})
    return out


def markdown(res) -> str:
    rows = []
    for name, r in res["models"].items():
        vs = r["variants"]

        def t(v):
            f = vs.get(v, {}).get("time_ms")
            return f"{f['median']:.1f}" if f else str(vs.get(v, {}).get("error", "-"))[:40]

        def q(k):
            x = r["ratios"].get(k)
            return f"{x['of_medians']:.2f}x" if x else "-"

        def kib(x):
            return f"{x / KiB:,.0f}" if x else "-"
        e, a, p, px = (vs.get(v, {}) for v in VARIANTS)
        rows.append([name, r["update"], t("eager"), t("aten"), t("pte"), t("pte_xnnpack"), q("pte/aten"),
                     q("pte_xnnpack/aten"), kib((e.get("peak_bytes") or 0) + (e.get("held_bytes") or 0) or None),
                     kib(a.get("planned_peak_bytes")), kib(p.get("arena_bytes")), kib(p.get("greedy_arena_bytes")),
                     kib(px.get("arena_bytes")), f"{p.get('export_s', float('nan')):.0f}",
                     ", ".join(px.get("delegates", [])) or "-"])
    headers = ["model", "update", "eager ms", "aten ms", "pte ms", "pte+xnnpack ms", "pte/aten", "pte+xnn/aten",
               "eager peak KiB", "pockc plan KiB", "pte arena KiB", "pte arena (ET greedy) KiB",
               "pte+xnn arena KiB", "export s", "delegates"]
    mi, st = res["machine"], res["settings"]
    lines = [f"# ExecuTorch benchmark: .pte step vs pockc aten vs eager{' (quick mode)' if st['quick'] else ''}", "",
             f"{res['date']}, commit {res['git_commit']}; {mi['lscpu_model']} ({mi['cpu_cores']} cores), torch "
             f"{mi['torch']}, executorch {res.get('executorch')}, {st['threads']} intra-op thread(s) per process; "
             f"load average {mi.get('load_average_start')} at start, {mi.get('load_average_end')} at end.", "",
             "Step time: median ms; each variant in its own process, interleaved rounds. Ratios of medians: > 1 "
             "means the .pte is slower. eager peak: allocator-level peak of one step's new allocations plus the "
             "trained weights, optimizer state and buffers it holds (eager without those is not comparable). "
             "pockc plan: the aten step's planned writable peak. pte arena: the program's planned train_step "
             "arena (activations + shared trained state) read back from the .pte, with pockc's planning and with "
             "ExecuTorch's greedy planner.", "",
             tabulate(rows, headers=headers, tablefmt="github"), ""]
    for c in res["claims"]:
        lines.append(f"- {'PASS' if c['pass'] else 'FAIL'}: {c['claim']} ({c['value']:,.2f})")
    for name, r in res["models"].items():
        p = r["variants"].get("pte_xnnpack", {})
        if p.get("kernels"):
            lines.append(f"- {name}, ops left on portable kernels with XNNPACK: {', '.join(p['kernels'])}")
    return "\n".join(lines) + "\n"


def run(quick=False, models=None, threads=1, warmup=2, out_dir=RESULTS, name=None, progress=True):
    from pockc.runtime.executorch import executorch_version
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    require_committed(out_dir)
    cfgs = [c for c in configs(quick) if models is None or c["model"] in models]
    if not cfgs:
        raise SystemExit(f"no model matches {models}; choose from: {', '.join(c['model'] for c in configs(quick))}")
    info = machine_info("cpu")
    info.pop("device", None)
    info["lscpu_model"] = lscpu_model()
    res = {"benchmark": "executorch_cpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": git_commit(), "machine": info, "executorch": executorch_version(),
           "settings": {"quick": quick, "threads": threads, "warmup": warmup, "variants": list(VARIANTS)},
           "models": {}}
    res["machine"]["load_average_start"] = load_average()
    t0 = time.perf_counter()
    for c in cfgs:
        res["models"][c["model"]] = bench_config(c, threads, warmup, log)
    res["wall_s"] = time.perf_counter() - t0
    res["machine"]["load_average_end"] = load_average()
    res["claims"] = claims(res)
    write_results(out_dir, name or ("executorch_cpu_quick" if quick else "executorch_cpu"), res, markdown(res))
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_executorch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--models", default=None, help="comma-separated subset of: mcu_cnn,small_cnn,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process (default 1)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    try:
        res = run(a.quick, a.models.split(",") if a.models else None, a.threads, a.warmup, a.out, a.name)
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(res))


if __name__ == "__main__":
    main()
