"""Memory benchmark (issue 3): planned and measured peak of writable memory for eager full
fine-tuning, eager PyTorch with the same trainable set, and pockc; pockc's peak before and after
scheduling.

    python -m benchmarks.bench_memory            # writes benchmarks/results/memory_cpu.{json,md}
    python -m benchmarks.bench_memory --quick    # tiny sizes (smoke test)

Writable memory (DESIGN.md) = trained weights + optimizer state + buffers + the batch + what the
step allocates (activations, gradients, temporaries). Frozen weights are read-only and excluded
for every variant.

* pockc: ``planned`` is ``step.memory.peak_bytes``; ``measured`` is ``step.memory.measure``:
  the writable inputs plus the exact peak of storage allocated during the step (CPU tracker of
  runtime/memory.py).
* eager (``pockc.bench.EagerStep``: torch.optim, ``zero_grad(set_to_none=True)``, forward,
  backward, ``opt.step()``): the second step is measured, so optimizer state exists already;
  measured = bytes of the trained parameters, the optimizer state, the buffers and the batch,
  plus the exact peak of storage allocated during the step (activations, gradients, temporaries,
  by the same tracker). Eager has no plan: its ``planned`` column is empty.

Models: the MCU example (examples/mcu_cnn.py, batch 1, the plan pockc chooses for 256KB),
MobileNetV2-style (batch 8, 128x128, ``last:4+head``; without a budget, and under ``--budget
24MB``, where its frozen high-resolution stages run tile by tile: passes/patch_stages.py), Llama-style (d=512, 8 layers, batch 4,
seq 256, ``last:2``).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

import pockc
from pockc import zoo
from pockc.bench import EagerStep, run_meta, write_results
from pockc.cli import load_model_file
from pockc.runtime.memory import measure_peak, storage_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def configs(quick):
    mcu = load_model_file(str(ROOT / "examples" / "mcu_cnn.py"))
    mb = dict(batch=2, image=32, width=0.25) if quick else dict(batch=8, image=128, width=1.0)
    ll = (dict(batch=1, seq=32, vocab=256, d=64, heads=4, layers=2) if quick
          else dict(batch=4, seq=256, vocab=8000, d=512, heads=8, layers=8))
    ex_mb, ex_ll = zoo.mobilenet_v2(**mb), zoo.llama(**ll)
    return [
        dict(name="mcu_cnn (batch 1, 64x64)", model=mcu.model(), loss_fn=mcu.loss_fn, batch=mcu.example_batch(),
             opt=mcu.optimizer(), update=None, budget="256KB"),
        dict(name=f"mobilenet_v2 (batch {mb['batch']}, {mb['image']}x{mb['image']})", model=ex_mb.model,
             loss_fn=ex_mb.loss_fn, batch=ex_mb.example_batch, opt=pockc.SGD(lr=0.01, momentum=0.9),
             update="last:4+head", budget=None),
        dict(name=f"mobilenet_v2 (batch {mb['batch']}, {mb['image']}x{mb['image']})", model=ex_mb.model,
             loss_fn=ex_mb.loss_fn, batch=ex_mb.example_batch, opt=pockc.SGD(lr=0.01, momentum=0.9),
             update="last:4+head", budget="1700KB" if quick else "24MB"),   # frozen stages run tile by tile
        dict(name=f"llama (d={ll['d']}, {ll['layers']} layers, batch {ll['batch']}, seq {ll['seq']})",
             model=ex_ll.model, loss_fn=ex_ll.loss_fn, batch=ex_ll.example_batch, opt=pockc.AdamW(lr=1e-4),
             update="last:2", budget=None),
    ]


def eager_peak(model, loss_fn, batch, opt, plan):
    """(allocator-level peak, tensor-storage peak) of eager PyTorch's second step, resident
    writable tensors included."""
    from benchmarks.bench_remat import allocator_peak
    step = EagerStep(model, loss_fn, copy.deepcopy(opt), plan)
    step(*batch)                       # creates the optimizer state
    step.release_grads()
    _, transient = measure_peak(step, *batch)
    step.release_grads()
    _, at_allocator = allocator_peak(step, *batch)
    state = [t for s in step.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    trained = [p for p in step.leaves]
    resident = storage_bytes(trained + state + list(model.buffers()) + [b for b in batch if isinstance(b, torch.Tensor)])
    return resident + at_allocator, resident + transient


def run(quick=False):
    torch.manual_seed(0)
    rows = []
    for cfg in configs(quick):
        model = cfg["model"]
        step = pockc.compile(copy.deepcopy(model), cfg["loss_fn"], cfg["batch"], update=cfg["update"],
                             optimizer=copy.deepcopy(cfg["opt"]), budget=cfg["budget"])
        planned = step.memory.peak_bytes
        measured = step.memory.measure(*cfg["batch"])                  # at the allocator
        storage = step.memory.measure(*cfg["batch"], allocator=False)  # live tensor storage
        full_step = pockc.compile(copy.deepcopy(model), cfg["loss_fn"], cfg["batch"], update="full",
                                  optimizer=copy.deepcopy(cfg["opt"]))
        e_full, e_full_storage = eager_peak(copy.deepcopy(model), cfg["loss_fn"], cfg["batch"], cfg["opt"], None)
        e_same, e_same_storage = eager_peak(copy.deepcopy(model), cfg["loss_fn"], cfg["batch"], cfg["opt"],
                                            step.update_plan)
        fns = {"pockc": step, "eager": EagerStep(copy.deepcopy(model), cfg["loss_fn"], copy.deepcopy(cfg["opt"]),
                                                 step.update_plan)}
        times = {k: [] for k in fns}
        for f in fns.values():
            f(*cfg["batch"])                                   # warm-up
        for _ in range(7):                                     # interleaved: the machine's noise hits both
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(*cfg["batch"])
                times[k].append(time.perf_counter() - t0)
        times = {k: statistics.median(v) for k, v in times.items()}
        rows.append(dict(
            model=cfg["name"], update=(cfg["update"] or "chosen") + (f", budget {cfg['budget']}" if cfg["budget"] else "")
            + (f" ({step.patch['tiles']} tiles)" if getattr(step, "patch", None) else ""),
            trainable=step.update_plan.counts()[0], params=step.update_plan.counts()[1],
            eager_full_measured=e_full, eager_same_measured=e_same,
            eager_full_storage=e_full_storage, eager_same_storage=e_same_storage,
            pockc_planned=planned, pockc_measured=measured, pockc_storage=storage,
            pockc_step_ms=times["pockc"] * 1e3, eager_same_step_ms=times["eager"] * 1e3,
            patch=None if getattr(step, "patch", None) is None else
            {k: v for k, v in step.patch.items() if k != "stage"} | {"stage_nodes": step.patch["stage"]["nodes"]},
            pockc_arena=step.memory.arena_bytes, pockc_readonly=step.memory.readonly_bytes,
            pockc_peak_before_scheduling=step.memory.peak_before_scheduling,
            pockc_schedule=step.memory.schedule,
            pockc_full_planned=full_step.memory.peak_bytes,
            pockc_full_measured=full_step.memory.measure(*cfg["batch"]),
            breakdown=step.memory.breakdown,
            ratio_vs_eager_same=e_same / measured, ratio_vs_eager_full=e_full / measured,
            budget=cfg["budget"],
        ))
        print(f"{cfg['name']}: eager full {e_full:,} B, eager same {e_same:,} B, pockc measured {measured:,} B "
              f"(planned {planned:,} B)", flush=True)
    return rows


def markdown(rows, meta):
    kb = lambda b: f"{b / 1024:,.1f}"  # noqa: E731
    table = [[r["model"], r["update"], f"{r['trainable']:,} / {r['params']:,}", kb(r["eager_full_measured"]),
              kb(r["eager_same_measured"]), kb(r["pockc_planned"]), kb(r["pockc_measured"]), kb(r["pockc_storage"]),
              kb(r["pockc_peak_before_scheduling"]), kb(r["pockc_arena"]),
              f"{r['ratio_vs_eager_same']:.2f}x", f"{r['ratio_vs_eager_full']:.2f}x",
              f"{r['pockc_step_ms'] / r['eager_same_step_ms']:.2f}x"] for r in rows]
    head = ["model", "update", "trained / all params", "eager full (KB)", "eager same set (KB)",
            "pockc planned (KB)", "pockc allocator peak (KB)", "pockc storage peak (KB)",
            "pockc before scheduling (KB)", "pockc arena (KB)", "eager same / pockc", "eager full / pockc",
            "pockc step / eager same step"]
    lines = ["# Peak writable memory (issue 3)", "",
             f"{meta['date']} · {meta['machine']} · torch {meta['torch']} · commit {meta['commit']}", "",
             tabulate(table, headers=head, tablefmt="github"), "",
             "Writable = trained weights + optimizer state + buffers + batch + activations, gradients and "
             "temporaries; frozen weights excluded. Every measured figure is at the allocator (the profiler's "
             "memory events: kernel scratch included), resident writable tensors added: eager's second step, "
             "pockc's step.memory.measure(); 'storage peak' is live tensor storage only (runtime/memory.py's "
             "tracker). pockc planned = step.memory.peak_bytes. The ratios divide eager's allocator peak by "
             "pockc's. Step times: medians of 5 steps after one warm-up, pockc and eager one after the other in "
             "this one process (1 thread): an indication, not the interleaved per-process timing of bench_remat."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(a.quick)
    meta = run_meta()
    md = markdown(rows, meta)
    write_results(RESULTS, "memory_cpu_quick" if a.quick else "memory_cpu", {"meta": meta, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
