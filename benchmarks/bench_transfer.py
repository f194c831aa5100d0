"""Transfer benchmark (issue 4): accuracy against writable memory on the shipped transfer task.

    python -m benchmarks.bench_transfer          # writes benchmarks/results/transfer_cpu.{json,md,png}
    python -m benchmarks.bench_transfer --quick  # one seed, one learning rate (smoke test)

The task is examples/transfer_digits.py: DigitNet pretrained on the digits 0-4, fine-tuned on
the digits 5-9 (150 training images, a new classifier). Compared in one run:

* no fine-tuning (the new classifier stays random),
* full fine-tuning,
* presets: ``head`` (the head conv and the classifier), ``bias+head``, ``last:1+head``,
  ``last:2+head``,
* the plans pockc chooses under budgets, with the contribution scores of pockc.score_layers
  (measured on the validation split, with the classifier as the base) and, for one budget, with
  the prior instead of scores.

Every plan is fine-tuned with pockc's compiled step (SGD, momentum 0.9, cosine learning rate,
15 epochs) at each learning rate of a small grid; the rate with the best mean *validation*
accuracy over the seeds is kept and its *test* accuracy (448 held-out images, never used for a
choice) is reported as mean and standard deviation over the seeds. Memory is the step's planned
peak of writable memory and the measured peak of its first step; eager full fine-tuning
(torch.optim) is measured as in benchmarks/bench_memory.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

import pockc
from pockc.cli import load_model_file
from pockc.memory import format_bytes
from pockc.scoring import evaluate, fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ["full", "head", "bias+head", "last:1+head", "last:2+head"]
BUDGETS = ["640KB", "704KB", "768KB", "1MB"]
PRIOR_BUDGET = "768KB"
LRS = (0.01, 0.03, 0.1)
SEEDS = (0, 1, 2)
EPOCHS = 15


def run_plan(task, plan, lrs, seeds, data):
    """{lr: ([val acc per seed], [test acc per seed])} of fine-tuning ``plan`` (None: no fine-tuning)."""
    train, val, test = data
    out = {}
    for lr in lrs:
        va, te = [], []
        for seed in seeds:
            model = task.model()
            if plan is not None:
                step = pockc.compile(model, task.loss_fn, train[0], update=plan, optimizer=pockc.SGD(lr=lr, momentum=0.9))
                fit(step, train, EPOCHS, seed)
            va.append(evaluate(model, task.loss_fn, val, task.metric))
            te.append(evaluate(model, task.loss_fn, test, task.metric))
        out[lr] = (va, te)
        if plan is None:
            break
    return out


def run(quick=False):
    from benchmarks.bench_memory import eager_peak
    task = load_model_file(str(ROOT / "examples" / "transfer_digits.py"))
    train, val, test = task.train_data(), task.val_data(), task.test_data()
    lrs, seeds = ((0.03,), (0,)) if quick else (LRS, SEEDS)
    batch = train[0]
    model = task.model()
    scores = pockc.score_layers(model, task.loss_fn, train, val, task.metric, optimizer=task.optimizer(),
                                log=print, **task.scoring())
    print(scores.table())
    plans = [("no fine-tuning", None, None)]
    plans += [(p, p, None) for p in PRESETS]
    for b in BUDGETS:
        plans.append((f"pockc, {b} budget, scores", None, (b, scores)))
    plans.append((f"pockc, {PRIOR_BUDGET} budget, prior", None, (PRIOR_BUDGET, None)))
    rows = []
    for name, update, sel in tqdm(plans, desc="plans", unit="plan"):
        row = {"plan": name, "lr": None}
        if update is None and sel is None:
            res = run_plan(task, None, lrs, seeds, (train, val, test))
        else:
            step = pockc.compile(task.model(), task.loss_fn, batch, update=update, optimizer=task.optimizer(),
                                 budget=sel[0] if sel else None, scores=sel[1] if sel else None)
            plan = step.update_plan
            trained, total = plan.counts()[:2]
            row.update(budget=sel[0] if sel else None, chosen=step.selection.chosen if step.selection else None,
                       trained_params=trained, params=total, planned_peak=step.memory.peak_bytes,
                       measured_peak=step.memory.measure(*batch), rules={n: str(r) for n, r in plan.rules.items()
                                                                         if r.kind != "frozen"})
            res = run_plan(task, plan, lrs, seeds, (train, val, test))
            row["lr"] = max(res, key=lambda k: statistics.mean(res[k][0]))
        va, te = res[row["lr"]] if row["lr"] is not None else next(iter(res.values()))
        row.update(val_acc=statistics.mean(va), test_acc=statistics.mean(te),
                   test_std=statistics.stdev(te) if len(te) > 1 else 0.0, test_per_seed=te,
                   grid={str(k): {"val": v[0], "test": v[1]} for k, v in res.items()})
        rows.append(row)
        print(f"{name}: test accuracy {row['test_acc']:.4f} (lr {row['lr']}), peak "
              f"{format_bytes(row['measured_peak']) if 'measured_peak' in row else '-'}", flush=True)
    e_full = eager_peak(task.model(), task.loss_fn, batch, task.optimizer(), None)
    full = next(r for r in rows if r["plan"] == "full")
    for r in rows:
        if "planned_peak" in r:
            r["full_over_peak"] = full["planned_peak"] / r["planned_peak"]
            r["eager_full_over_peak"] = e_full / r["planned_peak"]
            r["acc_vs_full_pp"] = 100 * (r["test_acc"] - full["test_acc"])
    return rows, {"eager_full_measured_peak": e_full, "scores": scores.to_dict(),
                  "epochs": EPOCHS, "lrs": list(lrs), "seeds": list(seeds)}


def markdown(rows, meta, extra):
    kb = lambda b: f"{b / 1024:,.1f}" if b is not None else "-"  # noqa: E731
    table = []
    for r in rows:
        table.append([r["plan"], f"{r['trained_params']:,}" if "trained_params" in r else "0",
                      kb(r.get("planned_peak")), kb(r.get("measured_peak")),
                      f"{r['full_over_peak']:.2f}x" if "full_over_peak" in r else "-",
                      f"{100 * r['test_acc']:.2f} ± {100 * r['test_std']:.2f}",
                      f"{r['acc_vs_full_pp']:+.2f}" if "acc_vs_full_pp" in r else "-",
                      f"{100 * r['val_acc']:.2f}", r["lr"] if r["lr"] is not None else "-"])
    head = ["plan", "trained params", "planned peak (KB)", "measured peak (KB)", "pockc full / peak",
            "test acc (%)", "vs full (pp)", "val acc (%)", "lr"]
    chosen = [f"- **{r['plan']}** trains " + ", ".join(f"`{m}` {o}" for m, o in r["chosen"].items())
              + " and the base (head conv, classifier)" * ("scores" in r["plan"])
              for r in rows if r.get("chosen")]
    lines = ["# Transfer: accuracy against writable memory (issue 4)", "",
             f"{meta['date']} · {meta['machine']} · torch {meta['torch']} · commit {meta['commit']}", "",
             "examples/transfer_digits.py: DigitNet (34,637 params) pretrained on the digits 0-4, fine-tuned on "
             "the digits 5-9 (150 training images, batch 8, a new classifier). SGD momentum 0.9, cosine lr, "
             f"{extra['epochs']} epochs; the lr of the grid {extra['lrs']} with the best mean validation accuracy "
             f"over seeds {extra['seeds']}; test accuracy on 448 held-out images, mean ± std over the seeds.", "",
             tabulate(table, headers=head, tablefmt="github"), "",
             f"Eager full fine-tuning (torch.optim SGD) measured peak: {kb(extra['eager_full_measured_peak'])} KB.", "",
             "Chosen plans:", *chosen, "",
             "Writable memory = trained weights + optimizer state + batch + activations, gradients and temporaries "
             "(frozen weights are read-only and not counted).", ""]
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'pockc[plot]'): no plot")
        return False
    fig, ax = plt.subplots(figsize=(8, 6.5))
    full = next(r for r in rows if r["plan"] == "full")
    markers = iter("o^sDv<>pP*hX")
    for r in rows:
        if "planned_peak" not in r:
            continue
        ax.errorbar(r["planned_peak"] / 1024, 100 * r["test_acc"], yerr=100 * r["test_std"], capsize=3,
                    fmt=next(markers), label=f"{r['plan']} ({100 * r['test_acc']:.1f}%)")
    ax.axhline(100 * full["test_acc"] - 1, ls="--", lw=0.8, color="gray", label="full fine-tuning - 1 pp")
    ax.axvline(full["planned_peak"] / 4 / 1024, ls=":", lw=0.8, color="gray", label="full fine-tuning's peak / 4")
    none = next((r for r in rows if r["plan"] == "no fine-tuning"), None)
    if none:
        ax.set_title(f"pockc on examples/transfer_digits.py (no fine-tuning: {100 * none['test_acc']:.1f}%)")
    lo = min(100 * (r["test_acc"] - r["test_std"]) for r in rows if "planned_peak" in r)
    ax.set_ylim(max(0, lo - 2), 100)
    ax.set_xscale("log")
    ax.set_xlabel("planned peak of writable memory (KB, log scale)")
    ax.set_ylabel("test accuracy on digits 5-9 (%)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    fig.tight_layout()
    from pockc.bench import save_figure
    save_figure(fig, path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from the saved JSON, run nothing")
    a = ap.parse_args(argv)
    stem = "transfer_cpu_quick" if a.quick else "transfer_cpu"
    if a.replot:
        plot(json.loads((RESULTS / f"{stem}.json").read_text())["rows"], RESULTS / f"{stem}.png")
        return
    torch.set_num_threads(2)
    rows, extra = run(a.quick)
    from pockc.bench import run_meta, write_results
    meta = run_meta()
    md = markdown(rows, meta, extra)
    RESULTS.mkdir(exist_ok=True)
    if plot(rows, RESULTS / f"{stem}.png"):
        md += f"\n![accuracy against peak memory]({stem}.png)\n"
    write_results(RESULTS, stem, {"meta": meta, **extra, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
