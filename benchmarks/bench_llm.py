"""LLM fine-tuning benchmark, CPU part (issue 5): Llama-style decoder (pockc.zoo.llama, d=512,
8 layers, 8 heads, vocab 8000, batch 4, seq 256), next-token cross-entropy, AdamW(lr=1e-4).

    python -m benchmarks.bench_llm            # full sizes; writes results/llm_cpu.{json,md}
    python -m benchmarks.bench_llm --quick    # tiny sizes, smoke test; llm_cpu_quick.{json,md}

Variants, each in its own process on a model built from the same seed, all fed the same batch:

* ``eager_full``        -- every parameter, autograd + torch.optim.AdamW;
* ``eager_last2``       -- the last 2 blocks, the rest ``requires_grad=False`` (benchmarks'
  EagerStep, the tests' oracle);
* ``eager_lora_last2``  -- LoRA r=16, alpha=32 on q/k/v/o of the last 2 blocks, eager autograd
  through the same adapter hooks pockc uses (PEFT's arithmetic; PEFT itself is not a dependency);
* ``pockc_last2``       -- ``pockc.finetune(..., layers="last:2")``;
* ``pockc_lora_last2``  -- ``pockc.finetune(..., lora=LoraConfig(r=16, lora_alpha=32,
  target_modules=q/k/v/o), layers="last:2")``.

Timing and memory as in benchmarks/bench_core.py: each variant in its own process with 1
intra-op thread, warm-up steps, then interleaved rounds of one step per process (starting one
rotating); medians and ratios from this one run; peak = storage allocated during one untimed step
(pockc.runtime.memory.measure_peak).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import sys
import time

import torch
from tabulate import tabulate

import pockc
from benchmarks.bench_core import (DEFAULT_THREADS, MiB, RESULTS, EagerStep, PockcStep, StepWorker, git_commit,
                                   load_average, machine_info, serve, time_variants)
from pockc import zoo
from pockc.bench import BenchError, write_results
from pockc.lora import attach_lora, match_targets

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class FinetuneRunner(PockcStep):
    """PockcStep's running and accounting, over a step built by pockc.finetune."""

    def __init__(self, model, loss_fn, batch, opt, **kw):
        self.model = model
        t0 = time.perf_counter()
        self.step = pockc.finetune(model, loss_fn, batch, optimizer=copy.deepcopy(opt), **kw)
        self.compile_seconds = time.perf_counter() - t0


def eager_lora(model, loss_fn, opt, lora, layers_k):
    """Eager LoRA baseline: the same adapters (same init, same hook arithmetic), autograd."""
    blocks = [f"layers.{i}" for i in range(len(model.layers))][-layers_k:]
    targets = match_targets(model, lora.target_modules, lambda n: any(n.startswith(b + ".") for b in blocks))
    names = attach_lora(model, lora, targets)
    plan = pockc.UpdatePlan({n: "full" for n in names}, {n: tuple(p.shape) for n, p in model.named_parameters()})
    return EagerStep(model, loss_fn, opt, plan)


def sizes_for(quick):
    return (dict(batch=1, seq=32, vocab=256, d=64, heads=4, layers=4) if quick
            else dict(batch=4, seq=256, vocab=8000, d=512, heads=8, layers=8))


VARIANTS = ("eager_full", "eager_last2", "eager_lora_last2", "pockc_last2", "pockc_lora_last2")
OPTIMIZER = pockc.AdamW(lr=1e-4)
LORA = pockc.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, seed=0)


class _Worker(StepWorker):
    """One variant in its own process, on a model built from the same seed as the others'."""

    def __init__(self, spec):
        sizes, variant = spec["sizes"], spec["variant"]
        torch.manual_seed(0)
        ex = zoo.llama(**sizes)
        self.batch, model, opt = ex.example_batch, ex.model, OPTIMIZER
        n_params = sum(p.numel() for p in model.parameters())
        if variant == "eager_full":
            self.runner, trained = EagerStep(model, ex.loss_fn, opt), n_params
        elif variant == "eager_last2":
            last2 = pockc.UpdatePlan({n: "full" for n, _ in model.named_parameters()
                                      if n.startswith((f"layers.{sizes['layers'] - 2}.", f"layers.{sizes['layers'] - 1}."))},
                                     {n: tuple(p.shape) for n, p in model.named_parameters()})
            self.runner, trained = EagerStep(model, ex.loss_fn, opt, last2), last2.counts()[0]
        elif variant == "eager_lora_last2":
            self.runner = eager_lora(model, ex.loss_fn, opt, LORA, 2)
            trained = sum(leaf.numel() for leaf in self.runner.leaves)
        else:
            kw = {"lora": LORA} if variant == "pockc_lora_last2" else {}
            self.runner = FinetuneRunner(model, ex.loss_fn, self.batch, opt, layers="last:2", **kw)
            trained = self.runner.step.update_plan.counts()[0]
        self.info = {"trained_params": trained, "params": n_params}
        if isinstance(self.runner, FinetuneRunner):
            self.info["compile_s"] = self.runner.compile_seconds
        self.warm_up(spec["warmup"])


def worker_main(spec_json):
    serve(_Worker, spec_json)


def bench(quick, steps, warmup, threads, progress=True):
    sizes = sizes_for(quick)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)
    specs = {v: dict(variant=v, sizes=sizes, warmup=warmup, threads=threads) for v in VARIANTS}
    figs, times, load = time_variants(specs, "benchmarks.bench_llm", threads, steps, log)
    if figs["pockc_last2"]["trained_params"] != figs["eager_last2"]["trained_params"]:
        raise RuntimeError("pockc last:2 and eager last-2 train different sets")
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = lambda a, b: statistics.median([x / y for x, y in zip(times[a], times[b])])  # noqa: E731
    ratios = {
        "eager_last2_over_pockc_last2": med["eager_last2"] / med["pockc_last2"],
        "eager_full_over_pockc_last2": med["eager_full"] / med["pockc_last2"],
        "eager_lora_over_pockc_lora": med["eager_lora_last2"] / med["pockc_lora_last2"],
        "eager_full_over_pockc_lora": med["eager_full"] / med["pockc_lora_last2"],
        "eager_last2_over_pockc_last2_paired": paired("eager_last2", "pockc_last2"),
        "eager_full_over_pockc_last2_paired": paired("eager_full", "pockc_last2"),
    }
    res = {"sizes": sizes, "optimizer": OPTIMIZER.to_dict(), "lora": LORA.to_dict(),
           "params": figs["eager_full"]["params"], "variants": figs, "ratios": ratios, "load_1min": load}
    pk = figs["pockc_last2"]["peak_bytes"]
    res["claims"] = [
        {"claim": "pockc last-2 >= 1.3x faster than eager last-2", "ratio": ratios["eager_last2_over_pockc_last2"],
         "threshold": 1.3},
        {"claim": "pockc last-2 >= 2.5x faster than eager full", "ratio": ratios["eager_full_over_pockc_last2"],
         "threshold": 2.5},
        {"claim": "pockc last-2 peak below eager last-2", "ratio": figs["eager_last2"]["peak_bytes"] / pk,
         "threshold": 1.0, "strict": True},
        {"claim": "pockc last-2 peak below eager full", "ratio": figs["eager_full"]["peak_bytes"] / pk,
         "threshold": 1.0, "strict": True},
        {"claim": "pockc LoRA last-2 faster than eager LoRA last-2", "ratio": ratios["eager_lora_over_pockc_lora"],
         "threshold": 1.0, "strict": True},
    ]
    for c in res["claims"]:
        c["pass"] = c["ratio"] > c["threshold"] if c.get("strict") else c["ratio"] >= c["threshold"]
        c["quick_mode"] = quick
    return res


def markdown(res) -> str:
    mi, r = res["machine"], res["result"]
    rows = []
    for k, v in r["variants"].items():
        t = v["time_ms"]
        rows.append([k, f"{v['trained_params']:,}", f"{t['median']:.1f} ({t['min']:.0f}-{t['max']:.0f})",
                     f"{v['peak_bytes'] / MiB:.1f}", f"{v['resident_bytes'] / MiB:.1f}",
                     f"{v['compile_s']:.1f}" if "compile_s" in v else ""])
    lines = [f"# LLM fine-tuning CPU benchmark{' (quick mode)' if res['settings']['quick'] else ''}", "",
             f"{res['date']}, commit {res['git_commit']}; {mi['cpu_model']}, "
             f"{mi['cpu_cores']} cores, torch {mi['torch']} ({mi['torch_num_threads']} threads), {mi['platform']}; "
             f"load average {mi.get('load_average_start')} at start, {mi.get('load_average_end')} at end.", "",
             f"Llama-style decoder {r['sizes']}, AdamW(lr=1e-4), causal LM loss, same batch every step. "
             f"Median (min-max) of {res['settings']['steps']} timed steps after {res['settings']['warmup']} "
             "warm-up steps, each variant in its own process, timed in interleaved rounds. Peak: MiB of tensor storage "
             "allocated during one step; resident: parameters, buffers, optimizer state.", "",
             tabulate(rows, headers=["variant", "trained params", "step ms", "peak MiB", "resident MiB", "compile s"],
                      tablefmt="github"), ""]
    for k, v in r["ratios"].items():
        lines.append(f"- {k}: {v:.2f}x")
    lines.append("")
    for c in r["claims"]:
        lines.append(f"- {'PASS' if c['pass'] else 'FAIL'}: {c['claim']}: {c['ratio']:.2f}x "
                     f"(needs {'>' if c.get('strict') else '>='} {c['threshold']}x)")
    return "\n".join(lines) + "\n"


def run(quick=False, steps=None, warmup=None, out_dir=RESULTS, threads=DEFAULT_THREADS, progress=True):
    from pockc.bench import require_committed
    require_committed(out_dir)
    steps = steps if steps is not None else (2 if quick else 7)
    warmup = warmup if warmup is not None else 1
    res = {"benchmark": "llm_cpu", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "git_commit": git_commit(), "machine": machine_info(),
           "settings": {"quick": quick, "steps": steps, "warmup": warmup, "threads": threads,
                        "timing": "one process per variant, interleaved rounds of one step per process"}}
    res["machine"]["torch_num_threads"] = threads or torch.get_num_threads()
    res["machine"]["load_average_start"] = load_average()
    t0 = time.perf_counter()
    res["result"] = bench(quick, steps, warmup, threads, progress)
    res["wall_s"] = time.perf_counter() - t0
    res["machine"]["load_average_end"] = load_average()
    name = "llm_cpu_quick" if quick else "llm_cpu"
    write_results(out_dir, name, res, markdown(res))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--out", default=str(RESULTS))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    a = ap.parse_args(argv)
    try:
        res = run(a.quick, a.steps, a.warmup, a.out, a.threads)
    except BenchError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown(res))


if __name__ == "__main__":
    main()
