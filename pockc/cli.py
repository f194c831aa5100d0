"""The ``pockc`` command line.

    pockc compile model.py --update last:2 -o build/

A model file defines three functions:

    def model() -> torch.nn.Module                 # the model to fine-tune, in train or eval mode
    def example_batch() -> tuple                   # e.g. (x, y): the step is specialized to its shapes
    def loss_fn(model, *batch) -> scalar tensor    # e.g. F.cross_entropy(model(x), y)

and optionally:

    def optimizer() -> pockc.SGD | pockc.AdamW     # --optimizer/--lr override it
    def train_data() -> iterable of batches        # the task's data, each batch shaped like
    def val_data() -> iterable of batches          #   example_batch() (val batches: any size)
    def metric(model, *batch) -> float             # higher is better, e.g. accuracy (default: -loss)
    def scoring() -> dict                          # keyword arguments of pockc.score_layers,
                                                   #   e.g. {"steps": 60, "base": "head"}

With --budget and train_data()/val_data(), pockc measures each candidate layer's contribution by
fine-tuning it alone (pockc.score_layers; cached, or reused with --scores FILE) and spends the
budget where it buys the most; without them it uses the prior (later layers first, biases
cheapest) and says so. --epochs N then fine-tunes the compiled step on train_data() and reports
the metric on val_data() before and after.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

USAGE_ERROR, COMPILE_ERROR = 2, 1


class UsageError(Exception):
    pass


def load_model_file(path):
    """Import a model file (its folder on sys.path while it runs) and check it defines model(),
    example_batch() and loss_fn(); UsageError otherwise."""
    if not os.path.isfile(path):
        raise UsageError(f"model file {path!r} not found")
    spec = importlib.util.spec_from_file_location("pockc_user_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 -- the user's file failed to import
        raise UsageError(f"could not import {path}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.pop(0)
    missing = [f for f in ("model", "example_batch", "loss_fn") if not callable(getattr(module, f, None))]
    if missing:
        raise UsageError(f"{path} must define {', '.join(f + '()' for f in missing)} "
                         "(see `pockc compile --help` for the model file convention)")
    return module


def _parse_update(text):
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--update looks like JSON but does not parse: {e}") from None
    if os.path.isfile(text) and text.endswith(".json"):
        import pockc
        return pockc.UpdatePlan.from_json(text)
    return text


def _optimizer(args, module):
    import pockc
    if args.optimizer is None and hasattr(module, "optimizer"):
        opt = module.optimizer()
        if args.lr is not None:
            opt.lr = args.lr
        return opt
    name = (args.optimizer or "sgd").lower()
    lr = args.lr if args.lr is not None else (0.01 if name == "sgd" else 1e-3)
    if name == "sgd":
        return pockc.SGD(lr=lr, momentum=args.momentum)
    if name == "adamw":
        return pockc.AdamW(lr=lr)
    raise UsageError(f"unknown optimizer {args.optimizer!r}; use sgd or adamw")


def _user_call(module, name, *args):
    """Call the model file's ``name`` function; its exceptions are the user's, said in one line."""
    try:
        return getattr(module, name)(*args)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{name}() in the model file raised {type(e).__name__}: {e}") from e


def _task_data(args, module, batch):
    """(train, val) batches from the model file, or (None, None) when it defines neither."""
    has = [callable(getattr(module, f, None)) for f in ("train_data", "val_data")]
    if not any(has):
        return None, None
    if not all(has):
        raise UsageError(f"{args.model} defines {'train_data' if has[0] else 'val_data'}() but not "
                         f"{'val_data' if has[0] else 'train_data'}(); define both")
    from pockc.errors import CompileError
    from pockc.scoring import as_batches, check_shapes
    try:
        out = [as_batches(_user_call(module, name), f"{name}()") for name in ("train_data", "val_data")]
        check_shapes(out[0], "train_data()", like=batch, like_name="example_batch()")
    except CompileError as e:
        raise UsageError(str(e)) from None
    return out


def _scores(args, module, model, batch, optimizer, train, val, budget):
    """Contribution scores for --budget: from --scores, measured on the task data, or None (prior)."""
    import pockc
    if args.scores is not None:
        if not os.path.isfile(args.scores):
            raise UsageError(f"--scores: {args.scores!r} not found")
        try:
            scores = pockc.LayerScores.from_json(args.scores)
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--scores: {args.scores} is not a scores file written by pockc ({e})") from None
        print(f"contribution scores: {len(scores)} candidates from {args.scores}")
        return scores
    if budget is None or args.update is not None:
        return None
    if train is None:
        print(f"note: {os.path.basename(args.model)} defines no train_data()/val_data(): choosing on the "
              "prior (later layers first, biases cheapest). Define them to measure each layer's "
              "contribution on your task.")
        return None
    settings = dict(_user_call(module, "scoring")) if callable(getattr(module, "scoring", None)) else {}
    metric = getattr(module, "metric", None)
    scores = pockc.score_layers(model, module.loss_fn, train, val, metric=metric, optimizer=optimizer,
                                progress=True if args.verbose else None, log=lambda m: print(f"pockc: {m}", flush=True),
                                **settings)
    how = f"cached: {scores.path}" if scores.cached else f"measured, saved to {scores.path or 'nowhere (no cache)'}"
    print(f"contribution scores ({how}):")
    print(scores.table())
    print()
    return scores


def cmd_compile(args):
    module = load_model_file(args.model)
    import torch

    import pockc
    from pockc.memory import format_bytes, parse_bytes
    budget = None
    if args.budget is not None:
        try:
            budget = parse_bytes(args.budget)
        except pockc.BudgetError as e:
            raise UsageError(f"--budget: {e}") from None
        print(f"budget: {format_bytes(budget)} of writable memory")
    if args.device_profile is not None:
        from pockc.remat_cost import CostModel
        try:
            CostModel.from_profile(args.device_profile, args.objective)
        except ValueError as e:
            raise UsageError(f"--device-profile: {e}") from None
    if args.scores is not None and (budget is None or args.update is not None):
        raise UsageError("--scores needs --budget and no --update: the scores decide what to train under a budget")
    model, batch = _user_call(module, "model"), _user_call(module, "example_batch")
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    batch = tuple(batch)
    train, val = _task_data(args, module, batch)
    if args.epochs and train is None:
        raise UsageError(f"--epochs needs train_data() and val_data() in {args.model}")
    update = _parse_update(args.update) if args.update is not None else None
    optimizer = _optimizer(args, module)
    scores = _scores(args, module, model, batch, optimizer, train, val, budget)
    step = pockc.compile(model, module.loss_fn, batch, update=update, optimizer=optimizer, budget=budget,
                         verbose=args.verbose, scores=scores, remat=args.remat,
                         device_profile=args.device_profile, objective=args.objective)
    os.makedirs(args.out, exist_ok=True)
    if scores is not None:
        scores.to_json(os.path.join(args.out, "scores.json"))
    lay = step.layout
    header = [f"# Generated by pockc {pockc.__version__} from {os.path.basename(args.model)} "
              f"(update={args.update or ('chosen for --budget ' + args.budget if budget else 'full')!r}, "
              f"{type(step.optimizer).__name__}). One training step:",
              "# forward, the backward of the trained tensors only, and the in-place optimizer update.",
              f"# Inputs in order: {len(lay.params)} trained params, {len(lay.frozen)} frozen params, "
              f"{len(lay.buffers)} buffers, {len(lay.state)} optimizer state tensors, "
              f"{len(lay.scalars)} optimizer scalars, {lay.batch} batch tensors.",
              "import torch", "from torch import device, inf, nan  # noqa: F401"]
    for name, obj in sorted(step.graph.graph.python_code(root_module="self").globals.items()):
        mod = getattr(obj, "__module__", None) or ""
        if callable(obj) and mod.startswith("pockc."):       # runtime calls (paging) the code makes
            header.append(f"from {mod} import {obj.__name__} as {name}")
    header.append("")
    with open(os.path.join(args.out, "train_step.py"), "w") as f:
        f.write("\n".join(header) + step.code)
    plan = step.update_plan.to_dict()
    plan["budget_bytes"] = budget
    plan["memory"] = step.memory.to_dict()
    if step.remat is not None:
        plan["remat"] = step.remat.to_dict()
    if step.selection is not None:
        plan["selection"] = step.selection.to_dict()
    with open(os.path.join(args.out, "plan.json"), "w") as f:
        json.dump(plan, f, indent=1)
        f.write("\n")
    stats = pockc.graph_stats(step.graph)
    lines = []
    if step.selection is not None:
        sel = step.selection
        lines += [f"chose the plan of most expected benefit ({sel.source}) that fits, from "
                  f"{len(sel.candidates)} single-layer options of the last {len(dict.fromkeys(c.layer for c in sel.candidates))} "
                  f"layers, {len(sel.tries)} plan(s) verified, in {sel.seconds:.1f}s:", sel.table(), ""]
    if step.remat is not None:
        lines += [step.remat.table(), ""]
    lines += [step.update_plan.table(), "", step.memory.table(budget), "", step.memory.summary(budget), "",
              f"graph: {stats.get('forward', 0)} forward, {stats.get('backward', 0)} backward, "
              f"{stats.get('update', 0)} update ops; compiled in {step.compile_seconds:.2f}s"]
    if args.steps:
        measured = step.memory.measure(*batch)     # the first step, under the exact peak tracker
        losses = [float(step.memory.last_loss)]
        t0 = time.perf_counter()
        for _ in range(args.steps - 1):
            losses.append(float(step(*batch)))
        ms = (time.perf_counter() - t0) / max(args.steps - 1, 1) * 1e3
        lines.append(f"measured peak of step 1: {format_bytes(measured)} (planned {format_bytes(step.memory.peak_bytes)})")
        lines.append(f"ran {args.steps} steps on the example batch: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
                     + (f" ({ms:.1f} ms/step)" if args.steps > 1 else ""))
    if args.epochs:
        from pockc.scoring import evaluate, fit
        metric = getattr(module, "metric", None)
        name = "metric()" if metric is not None else "-loss"
        before = evaluate(model, module.loss_fn, val, metric)
        t0 = time.perf_counter()
        losses = fit(step, train, args.epochs, progress=True if args.verbose else None)
        secs = time.perf_counter() - t0
        after = evaluate(model, module.loss_fn, val, metric)
        lines.append(f"fine-tuned {args.epochs} epochs ({len(losses)} steps, cosine lr from {step.optimizer.lr:g}) "
                     f"in {secs:.1f}s: train loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        lines.append(f"validation {name}: {before:.4f} before fine-tuning -> {after:.4f} after")
    report = "\n".join(lines)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(report + "\n")
    print(report)
    print(f"wrote {os.path.join(args.out, 'train_step.py')}, plan.json, report.txt"
          + (", scores.json" if scores is not None else ""))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="pockc", description="Compile-time sparse-backprop fine-tuning compiler.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a training step for a model file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", help="Python file defining model(), example_batch(), loss_fn(model, *batch)")
    c.add_argument("--update", default=None,
                   help="policy: full, bias, last:K, head (join with +), a JSON dict of glob -> "
                        "full|frozen|channels:R, or a plan.json file (default: full, or with --budget "
                        "the plan pockc chooses)")
    c.add_argument("--budget", default=None,
                   help="writable memory the step may use, e.g. 256KB, 1.5MB, 4096 (KB/MB/GB are 1024-based; "
                        "KiB/MiB/GiB accepted); frozen weights are read-only and not counted")
    c.add_argument("--remat", choices=["auto", "recompute", "off"], default="auto",
                   help="when the update plan does not fit --budget: recompute activations in the backward pass "
                        "or page them out to a slower tier and back (auto, the default), recompute only, or "
                        "neither (off)")
    c.add_argument("--device-profile", default=None, metavar="PROFILE",
                   help="plan recomputation and paging for this device: a bundled profile (mcu-cortex-m7, "
                        "raspberry-pi-4, jetson-nano, cuda-h100, x86-cpu) or a JSON file "
                        "(see pockc/profiles/README.md); default: this machine's built-in rates")
    c.add_argument("--objective", choices=["time", "energy"], default=None,
                   help="what recomputation and paging minimize (default: the profile's, else time; "
                        "energy needs a profile with energy figures)")
    c.add_argument("-v", "--verbose", action="store_true", help="progress bars and compile details")
    c.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="default: the file's optimizer() or sgd")
    c.add_argument("--lr", type=float, default=None, help="learning rate")
    c.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    c.add_argument("--steps", type=int, default=0, help="run this many steps on the example batch and report")
    c.add_argument("--epochs", type=int, default=0,
                   help="fine-tune the step this many epochs on train_data() and report the metric on val_data()")
    c.add_argument("--scores", default=None, metavar="FILE",
                   help="contribution scores to choose with under --budget (a scores.json from an earlier run) "
                        "instead of measuring them")
    c.add_argument("-o", "--out", default="build", help="output directory (default: build/)")
    c.set_defaults(func=cmd_compile)
    from pockc import bench  # the suite's logic and options live in pockc/bench.py
    b = sub.add_parser("bench", help="benchmark pockc against eager PyTorch and torch.compile",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(b)
    b.set_defaults(func=bench.main_args)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"pockc: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as e:  # noqa: BLE001
        from pockc.errors import CompileError
        if isinstance(e, (CompileError, ValueError)):
            print(f"pockc: error: {e}", file=sys.stderr)
            return COMPILE_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
