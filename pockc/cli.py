"""The ``pockc`` command line.

    pockc compile model.py --update last:2 -o build/
    pockc train build/ [--epochs N]       # resume an interrupted run exactly, or train N more epochs

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

pockc writes train_step.py, plan.json, report.txt (and scores.json), model.safetensors (the
model's state dict, fine-tuned with --epochs) and step/ (the saved step: pockc.load, pockc train)
into -o, each file atomically,
and records them in -o/.pockc-manifest.json: a later run into the same directory removes the files
an earlier run wrote that it does not write again (never a file pockc did not write, or one
changed since). A run that fails writes nothing. Exit status: 0; 1 when the model cannot be compiled
as asked or training diverges (a NaN or infinite loss); 2 for a bad argument or model file; 130 on
Ctrl-C (during training: after the current step, with a checkpoint that `pockc train` resumes).
Errors are one line on stderr (POCKC_TRACEBACK=1 shows the traceback of an unexpected one).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import time

USAGE_ERROR, COMPILE_ERROR, INTERRUPTED = 2, 1, 130
MANIFEST = ".pockc-manifest.json"   # in the output directory: the files pockc wrote there, with their hashes
OUTPUT_NAMES = ("train_step.py", "plan.json", "report.txt", "scores.json", "model.safetensors", "train_step.pt2",
                "train_report.txt")


class UsageError(Exception):
    pass


class RunError(Exception):
    """The run failed after its arguments were accepted (exit COMPILE_ERROR)."""


class TrainingError(RunError):
    """Training on the compiled step went wrong (a non-finite loss)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``pockc: error: ...`` and exit status 2, no usage block."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"pockc: error: {message} (see `{self.prog} --help`)\n")


def _count(text):
    """argparse type: an integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def _positive_count(text):
    """argparse type: an integer >= 1."""
    v = _count(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {v}")
    return v


def _positive_rate(text):
    """argparse type: a finite float > 0."""
    v = _rate(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _rate(text):
    """argparse type: a finite float >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _one_line(text) -> str:
    """A message as one line (a multi-line exception message joined with ' | ')."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    out = " | ".join(lines) or "(no message)"
    return out if len(out) <= 2000 else out[:1997] + "..."


def _describe(value) -> str:
    r = repr(value)
    r = r if len(r) <= 60 else r[:57] + "..."
    return r if value is None else f"{r} ({type(value).__name__})"


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
    if not text:
        raise UsageError("--update is empty; give a preset (full, bias, last:K, head), a JSON dict or a plan.json file")
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--update looks like JSON but does not parse: {e}") from None
    if text.lower().endswith(".json") or (os.sep in text and os.path.exists(text)):
        return _read_plan(text)
    import re
    for part in text.split("+"):
        p = part.strip().lower()
        if re.fullmatch(r"channels\s*:.*", p):
            rule = part.strip()
            raise UsageError(f"--update {text!r}: {rule!r} is a rule for parameters, not a preset; to apply it to "
                             f"every parameter write --update '{{\"*\": \"{rule}\"}}' (or a glob such as "
                             f"'{{\"fc.*\": \"{rule}\"}}')")
    return text


def _read_plan(path):
    """An UpdatePlan from a plan.json file; UsageError naming the file if it is missing or broken."""
    import pockc
    if not os.path.exists(path):
        raise UsageError(f"--update: plan file {path!r} not found")
    if not os.path.isfile(path):
        raise UsageError(f"--update: {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise UsageError(f"--update: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--update: {path} is not a text file ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UsageError(f"--update: {path} is empty; expected a plan.json written by pockc")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--update: {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("rules"), dict):
        raise UsageError(f"--update: {path} is not a plan.json written by pockc (it needs a \"rules\" object "
                         "mapping parameter names to full, frozen or channels:R)")
    try:
        return pockc.UpdatePlan.from_dict(d)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--update: {path} is not a valid plan: {_one_line(e)}") from None


def _optimizer(args, module):
    import pockc
    if args.optimizer is None and hasattr(module, "optimizer"):
        opt = _user_call(module, "optimizer")
        if not isinstance(opt, pockc.Optimizer):
            raise UsageError(f"optimizer() in the model file must return pockc.SGD(...) or pockc.AdamW(...), "
                             f"got {_describe(opt)}")
        if args.lr is not None:
            opt.lr = args.lr
        lr = getattr(opt, "lr", None)
        if isinstance(lr, (int, float)) and (not math.isfinite(lr) or lr < 0):
            raise UsageError(f"optimizer() in the model file has lr={lr}; the learning rate must be a finite "
                             "number >= 0 (or override it with --lr)")
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
        except OSError as e:
            raise UsageError(f"--scores: cannot read {args.scores}: {e.strerror or e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--scores: {_one_line(e)}") from None
        from pockc.errors import CompileError
        from pockc.scoring import check_scores_match
        try:
            check_scores_match(scores, model)
        except CompileError as e:
            raise UsageError(f"--scores: {args.scores}: {e}") from None
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


def _remove_dirs(created):
    """Remove the directories this run created (deepest first), as long as they are still empty."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break


def _prepare_out(out) -> list:
    """Check the output directory ``-o`` before any work: it is (or can be made) a directory that
    pockc can write files into. Returns the directories it created (removed if the run fails)."""
    from pockc.runtime.fileio import atomic_write
    if not str(out).strip():
        raise UsageError("-o: the output directory name is empty")
    path = os.path.abspath(out)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UsageError(f"-o {out}: exists and is not a directory")
    missing, p = [], path
    while not os.path.lexists(p):
        missing.append(p)
        if os.path.dirname(p) == p:
            break
        p = os.path.dirname(p)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise UsageError(f"-o {out}: {p} is not a directory")
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except OSError as e:
            _remove_dirs(created)
            raise UsageError(f"-o {out}: cannot create the output directory {d} ({e.strerror or e})") from None
        created.append(d)
    probe = os.path.join(path, f".pockc-probe-{os.getpid()}")
    try:
        atomic_write(probe, b"pockc\n")
        os.unlink(probe)
    except OSError as e:
        _remove_dirs(created)
        raise UsageError(f"-o {out}: cannot write files in the output directory ({e.strerror or e})") from None
    step_dir = os.path.join(path, "step")
    if os.path.lexists(step_dir) and not os.path.isdir(step_dir):
        _remove_dirs(created)
        raise UsageError(f"-o {out}: {os.path.join(out, 'step')} is a file; pockc writes the saved step there")
    for name in OUTPUT_NAMES:
        if os.path.isdir(os.path.join(path, name)):
            _remove_dirs(created)
            raise UsageError(f"-o {out}: {os.path.join(out, name)} is a directory; pockc writes a file of that name")
    return created


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(out) -> dict:
    """name -> hashes of the files an earlier run of pockc wrote into ``out`` (empty if none)."""
    try:
        with open(os.path.join(out, MANIFEST), "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
        files = d["files"]
        out_files = {}
        for name, hashes in files.items():
            hashes = [hashes] if isinstance(hashes, str) else list(hashes)
            if (isinstance(name, str) and name == os.path.basename(name) and name not in ("", ".", "..", MANIFEST)
                    and all(isinstance(h, str) for h in hashes)):
                out_files[name] = set(hashes)
        return out_files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_manifest(out, files: dict):
    import pockc
    from pockc.runtime.fileio import atomic_write
    atomic_write(os.path.join(out, MANIFEST), json.dumps(
        {"written_by": f"pockc {pockc.__version__}", "note": "the files pockc wrote here (sha256); a later run "
         "into this directory removes those it does not write again, if unchanged",
         "files": {n: sorted(h) for n, h in sorted(files.items())}}, indent=1) + "\n")


def write_outputs(out, files: dict, *, keep_others: bool = False) -> list:
    """Write ``{name: text}`` into ``out``, each file atomically, and remove the files an earlier run
    of pockc wrote there that this run does not (only those still as pockc wrote them, by their hash
    in the directory's manifest; nothing pockc did not write). ``keep_others``: add these files to
    the ones written before and remove nothing. Returns the names removed."""
    from pockc.runtime.fileio import atomic_write, fsync_dir, remove_stale_temps
    data = {n: t.encode("utf-8") if isinstance(t, str) else t for n, t in files.items()}
    new = {n: {_sha(b)} for n, b in data.items()}
    old = _read_manifest(out)
    # first record both runs' files: a run killed below still knows every file pockc wrote here
    _write_manifest(out, {n: old.get(n, set()) | new.get(n, set()) for n in {*old, *new}})
    for name, b in data.items():
        atomic_write(os.path.join(out, name), b)
    removed = []
    for name in sorted(set(old) - set(data)) if not keep_others else ():
        full = os.path.join(out, name)
        try:
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    if _sha(f.read()) in old[name]:
                        os.unlink(full)
                        removed.append(name)
        except OSError:
            pass
    _write_manifest(out, {**old, **new} if keep_others else new)
    remove_stale_temps(out)
    fsync_dir(out)
    return removed


def _check_finite(losses, where, lr, out, kept=None, first=1):
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None:
        left = (f"the last checkpoint ({kept}) in {out} is kept" if kept else f"Nothing was written to {out}")
        raise TrainingError(f"training diverged: the loss is {losses[bad]} at step {bad + first} {where} (lr {lr:g}); "
                            f"lower the learning rate (--lr). {left}")


def _evaluate(model, loss_fn, val, metric):
    from pockc.scoring import evaluate
    try:
        return evaluate(model, loss_fn, val, metric)
    except Exception as e:  # noqa: BLE001 -- the user's metric or loss on the user's data
        what = "metric()" if metric is not None else "loss_fn()"
        raise UsageError(f"{what} on val_data() raised {type(e).__name__}: {_one_line(e)}") from e


def cmd_compile(args):
    if not os.path.isfile(args.model):
        raise UsageError(f"model file {args.model!r} not found")
    if args.accumulate > 1 and args.target in ("aoti", "executorch"):
        raise UsageError(f"--target {args.target} cannot export a step with --accumulate {args.accumulate} (it "
                         "runs two programs): drop one of them")
    _check_target(args)
    created = _prepare_out(args.out)      # before any work: a bad -o fails now, not after compiling
    try:
        return _compile(args)
    except BaseException:
        _remove_dirs(created)             # a failed run leaves no empty output directory behind
        raise


def _compile(args):
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
    if not 0 <= args.max_overhead < float("inf"):
        raise UsageError(f"--max-overhead must be a fraction >= 0 of the step's time (0.15: 15%), not {args.max_overhead}")
    if args.scores is not None and (budget is None or args.update is not None):
        raise UsageError("--scores needs --budget and no --update: the scores decide what to train under a budget")
    update = _parse_update(args.update) if args.update is not None else None
    model = _user_call(module, "model")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model() in the model file must return a torch.nn.Module, got {_describe(model)}")
    batch = _user_call(module, "example_batch")
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)) or not any(isinstance(t, torch.Tensor) for t in batch):
        raise UsageError(f"example_batch() in the model file must return a tensor or a tuple of tensors, e.g. "
                         f"(x, y); it returned {_describe(batch)}")
    batch = tuple(batch)
    train, val = _task_data(args, module, batch)
    if args.epochs and train is None:
        raise UsageError(f"--epochs needs train_data() and val_data() in {args.model}")
    optimizer = _optimizer(args, module)
    scores = _scores(args, module, model, batch, optimizer, train, val, budget)
    step = pockc.compile(model, module.loss_fn, batch, update=update, optimizer=optimizer, budget=budget,
                         verbose=args.verbose, scores=scores, remat=args.remat,
                         device_profile=args.device_profile, objective=args.objective,
                         accumulate=args.accumulate, max_grad_norm=args.max_grad_norm, precision=args.precision,
                         max_overhead=args.max_overhead)
    outputs = {}
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
    outputs["train_step.py"] = "\n".join(header) + step.code
    plan = step.update_plan.to_dict()
    plan["budget_bytes"] = budget
    plan["memory"] = step.memory.to_dict()
    if step.remat is not None:
        plan["remat"] = step.remat.to_dict()
    if step.patch is not None:
        plan["patch"] = step.patch
    if step.selection is not None:
        plan["selection"] = step.selection.to_dict()
    outputs["plan.json"] = json.dumps(plan, indent=1) + "\n"
    stats = pockc.graph_stats(step.graph)
    lines = []
    if step.selection is not None:
        sel = step.selection
        lines += [f"chose the plan of most expected benefit ({sel.source}) that fits, from "
                  f"{len(sel.candidates)} single-layer options of the last {len(dict.fromkeys(c.layer for c in sel.candidates))} "
                  f"layers, {len(sel.tries)} plan(s) verified, in {sel.seconds:.1f}s:", sel.table(), ""]
    if step.patch is not None:
        pr = step.patch
        lines += [f"patch-based stage: {pr['stage']['nodes']} frozen forward ops ({pr['stage']['start']} .. "
                  f"{pr['stage']['end']}) run in {pr['tiles']} tiles with {pr['stats_passes']} batch-norm statistics "
                  f"passes; planned peak {pr['peak_before']:,} B -> {pr['peak_after']:,} B", ""]
    if step.remat is not None:
        lines += [step.remat.table(), ""]
    lines += [step.update_plan.table(), "", step.memory.table(budget), "", step.memory.summary(budget), "",
              f"graph: {stats.get('forward', 0)} forward, {stats.get('backward', 0)} backward, "
              f"{stats.get('update', 0)} update ops; compiled in {step.compile_seconds:.2f}s"]
    if args.steps:
        if step.remat is not None and args.steps > 1:   # the same plan without rematerialization, to compare
            import copy
            ref = pockc.compile(copy.deepcopy(model), module.loss_fn, batch, update=step.update_plan,
                                optimizer=copy.deepcopy(optimizer), accumulate=args.accumulate,
                                max_grad_norm=args.max_grad_norm)
            ref(*batch)
            t0 = time.perf_counter()
            for _ in range(args.steps - 1):
                ref(*batch)
            ref_ms = (time.perf_counter() - t0) / (args.steps - 1) * 1e3
        measured = step.memory.measure(*batch)     # the first step, under the exact peak tracker
        losses = [float(step.memory.last_loss)]
        t0 = time.perf_counter()
        for _ in range(args.steps - 1):
            if not math.isfinite(losses[-1]):
                break
            losses.append(float(step(*batch)))
        ms = (time.perf_counter() - t0) / max(args.steps - 1, 1) * 1e3
        _check_finite(losses, f"of --steps {args.steps} on the example batch", step.optimizer.lr, args.out)
        lines.append(f"measured peak of step 1: {format_bytes(measured)} (planned {format_bytes(step.memory.peak_bytes)})")
        lines.append(f"ran {args.steps} step{'s' if args.steps != 1 else ''} on the example batch: "
                     f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
                     + (f" ({ms:.1f} ms/step)" if args.steps > 1 else ""))
        if step.remat is not None and args.steps > 1:
            lines.append(f"rematerialization: measured {ms:.1f} ms/step against {ref_ms:.1f} ms/step for the same plan "
                         f"without it ({ms / ref_ms - 1:+.1%}; estimated {step.remat.overhead:+.1%})")
    from pockc import training
    model_file = os.path.abspath(args.model)
    run = training.Run(model_file=model_file, model_sha=training.file_sha(model_file), epochs=args.epochs, seed=0,
                       lr0=step.optimizer.lr, total=args.epochs * len(train) if args.epochs else 0)
    if args.epochs:
        status, more = _train_and_evaluate(args, module, step, model, train, val, run)
        if status is not None:
            return status
        lines += more
    report = "\n".join(lines)
    outputs["report.txt"] = report + "\n"
    if scores is not None:
        outputs["scores.json"] = scores.dumps()
    from pockc.training import state_dict_bytes
    outputs["model.safetensors"] = state_dict_bytes(model)
    try:
        removed = write_outputs(args.out, outputs)
        step.save(os.path.join(args.out, "step"), extra={"run": run.to_dict()})
        exported = _export(args, step)
    except OSError as e:       # the disk filled up, the directory went away, ...: no partial file is left
        raise RunError(f"-o {args.out}: could not write the output files ({e.strerror or e}); "
                       "no file there is half-written") from None
    print(report)
    print(f"wrote {os.path.join(args.out, 'train_step.py')}, plan.json, report.txt"
          + (", scores.json" if scores is not None else "")
          + f", model.safetensors (the {'fine-tuned ' if args.epochs else ''}state dict), step/ (the saved step: "
          f"pockc.load({os.path.join(args.out, 'step')!r}) or `pockc train {args.out} --epochs N` continues it)"
          + (f", {os.path.basename(exported[0])} ({exported[1]})" if exported else "")
          + (f" (removed {', '.join(removed)} from an earlier run)" if removed else ""))
    return 0


def _train_and_evaluate(args, module, step, model, train, val, run):
    """(exit status or None, report lines): the metric on val_data(), the run to its end, the metric."""
    metric = getattr(module, "metric", None)
    before = _evaluate(model, module.loss_fn, val, metric)
    status = _run_training(args, step, train, run, model)
    if status is not None:
        return status, []
    after = _evaluate(model, module.loss_fn, val, metric)
    return None, _training_lines(run, before, after, metric)


def _training_lines(run, before, after, metric) -> list:
    name = "metric()" if metric is not None else "-loss"
    losses = run.losses
    return [f"fine-tuned {run.epochs} epoch{'s' if run.epochs != 1 else ''} ({run.total} steps"
            + (f", {len(losses)} of them now, resumed at step {run.total - len(losses) + 1}" if len(losses) != run.total else "")
            + f", cosine lr from {run.lr0:g}) in {run.seconds:.1f}s: train loss {losses[0]:.4f} -> {losses[-1]:.4f}",
            f"validation {name}: {before:.4f} before -> {after:.4f} after"]


def _run_training(args, step, train, run, model):
    """Train ``run`` to its end with checkpoints; None when done, else the exit status (Ctrl-C)."""
    from pockc import training
    start = run.done
    t0 = time.perf_counter()
    try:
        losses = training.train(step, train, run, args.out, save_every=args.save_every,
                                progress=True if args.verbose else None, model=model)
    except training.Interrupted as e:
        _say(f"interrupted at step {e.run.done} of {e.run.total}, after the step finished; the checkpoint is in "
             f"{os.path.join(args.out, 'step')} and {os.path.join(args.out, 'model.safetensors')}; resume with: "
             f"pockc train {args.out}")
        return INTERRUPTED
    run.seconds = time.perf_counter() - t0
    run.losses = losses
    good = start + len(losses) - 1                  # steps of the run done before a non-finite loss
    last = good // args.save_every * args.save_every if args.save_every else 0
    kept = f"step {max(last, start)} of the run" if max(last, start) else None
    _check_finite(losses, f"of the run's {run.total} on train_data()", run.lr0, args.out, kept, first=start + 1)
    return None


def _check_target(args):
    if getattr(args, "target", None) == "executorch":
        from pockc.runtime import executorch
        try:
            executorch._import()
        except ImportError as e:
            raise UsageError(f"--target executorch: {e}") from None


def _export(args, step):
    """Export the step for --target; returns (path, one line for the report) or None."""
    target = getattr(args, "target", None)
    if target in (None, "step"):
        return None
    if target == "aoti":
        path = os.path.join(args.out, "train_step.pt2")
        step.export(path, target="aoti")
        return path, "AOTInductor package"
    from pockc.memory import format_bytes, parse_bytes
    from pockc.runtime import executorch
    path = os.path.join(args.out, "train_step.pte")
    budget = parse_bytes(args.budget) if getattr(args, "budget", None) is not None else None
    try:
        step.export(path, target="executorch", budget=budget)
    except executorch.ArenaOverBudget as e:
        raise RunError(f"--target executorch: {e}") from None
    train = executorch.program_report(path)["methods"]["train_step"]
    return path, (f"ExecuTorch program; train_step arena {format_bytes(train['arena'])}: "
                  f"{train['activations']:,} B activations + {train['state']:,} B trained state"
                  + (f", within --budget {args.budget}" if budget is not None else ""))


def cmd_train(args):
    """`pockc train OUT`: continue the saved step in OUT on its model file's data."""
    import pockc
    from pockc import training
    out = args.out or args.resume
    if out is None:
        raise UsageError("name the output directory of an earlier `pockc compile -o OUT` run: pockc train OUT")
    if args.target == "executorch":
        raise UsageError("--target executorch exports from `pockc compile` (it traces the model again without the "
                         "CPU-specific passes, which a saved step cannot): run pockc compile ... --target executorch")
    step_dir = os.path.join(out, training.STEP_DIR)
    from pockc.runtime.artifact import read_manifest
    if not os.path.isdir(step_dir):
        raise UsageError(f"{out}: no saved step there ({step_dir}/ is missing); train continues what "
                         f"`pockc compile ... -o {out}` saved")
    try:
        manifest = read_manifest(step_dir)
    except pockc.ArtifactError as e:
        raise UsageError(f"{e} (train continues what `pockc compile ... -o {out}` saved)") from None
    saved = (manifest.get("extra") or {}).get("run")
    if not saved:
        raise UsageError(f"{step_dir} was not saved by the command line (no run recorded); load it with pockc.load")
    run = training.Run.from_dict(saved)
    model_file = args.model or run.model_file
    if not os.path.isfile(model_file):
        raise UsageError(f"the model file {model_file} of this run is gone; pass it with --model FILE")
    if training.file_sha(model_file) != run.model_sha:
        import warnings
        warnings.warn(f"pockc: {model_file} changed since the run started; its data and metric are used as they "
                      "are now")
    module = load_model_file(model_file)
    args.model = model_file
    model = _user_call(module, "model")
    try:
        step = pockc.load(step_dir, model=model)
    except pockc.ArtifactError as e:
        raise RunError(str(e)) from None
    train, val = _task_data(args, module, _example_of(step))
    if train is None:
        raise UsageError(f"{model_file} defines no train_data()/val_data(): nothing to train on")
    if not run.finished:
        if args.epochs and args.epochs != run.epochs:
            raise UsageError(f"the run in {out} stopped at step {run.done} of {run.total} ({run.epochs} epochs); "
                             f"`pockc train {out}` finishes it, then --epochs {args.epochs} starts another")
        print(f"resuming the run at step {run.done + 1} of {run.total} ({run.epochs} epochs, lr {run.lr0:g})")
    else:
        if not args.epochs:
            raise UsageError(f"the run in {out} is finished ({run.total} steps); --epochs N trains N more epochs")
        lr = args.lr if args.lr is not None else run.lr0
        run = training.Run(model_file=os.path.abspath(model_file), model_sha=training.file_sha(model_file),
                           epochs=args.epochs, seed=run.seed + 1, lr0=lr, total=args.epochs * len(train),
                           index=run.index + 1)
        print(f"continuing from step {step.step_count}: {run.epochs} more epoch{'s' if run.epochs != 1 else ''} "
              f"({run.total} steps, cosine lr from {run.lr0:g})")
    status, lines = _train_and_evaluate(args, module, step, model, train, val, run)
    if status is not None:
        return status
    try:
        training.checkpoint(step, out, run, model)
        write_outputs(out, {"train_report.txt": "\n".join(lines) + "\n"}, keep_others=True)
        exported = _export(args, step)
    except OSError as e:
        raise RunError(f"{out}: could not write the checkpoint ({e.strerror or e}); the previous one is intact") from None
    print("\n".join(lines))
    print(f"wrote {os.path.join(out, 'model.safetensors')}, {step_dir}/ (step {step.step_count}), train_report.txt"
          + (f", {os.path.basename(exported[0])} ({exported[1]})" if exported else ""))
    return 0


def _example_of(step):
    """A batch of the saved step's signature (zeros), for checking the model file's data against it."""
    import torch
    leaves = [sig for _, sig in step._signature[1]]
    return tuple(torch.zeros(s[1], dtype=s[2]) if s[0] == "tensor" else None for s in leaves)


def build_parser():
    p = _Parser(prog="pockc", description="Compile-time sparse-backprop fine-tuning compiler.")
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
    c.add_argument("--max-overhead", type=float, default=0.15, metavar="FRACTION",
                   help="with --budget and no --update: also choose plans that fit only by recomputing or paging, "
                        "when the estimated added time is at most this fraction of the step's (default 0.15; "
                        "0: only plans that fit as they are)")
    c.add_argument("--device-profile", default=None, metavar="PROFILE",
                   help="plan recomputation and paging for this device: a bundled profile (mcu-cortex-m7, "
                        "raspberry-pi-4, jetson-nano, cuda-h100, x86-cpu) or a JSON file "
                        "(see pockc/profiles/README.md); default: this machine's built-in rates")
    c.add_argument("--objective", choices=["time", "energy"], default=None,
                   help="what recomputation and paging minimize (default: the profile's, else time; "
                        "energy needs a profile with energy figures)")
    c.add_argument("-v", "--verbose", action="store_true", help="progress bars and compile details")
    c.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="default: the file's optimizer() or sgd")
    c.add_argument("--lr", type=_rate, default=None, help="learning rate (a finite number >= 0)")
    c.add_argument("--momentum", type=_rate, default=0.9, help="SGD momentum (default 0.9)")
    c.add_argument("--steps", type=_count, default=0, help="run this many steps on the example batch and report")
    c.add_argument("--epochs", type=_count, default=0,
                   help="fine-tune the step this many epochs on train_data() and report the metric on val_data()")
    c.add_argument("--scores", default=None, metavar="FILE",
                   help="contribution scores to choose with under --budget (a scores.json from an earlier run) "
                        "instead of measuring them")
    c.add_argument("--save-every", type=_count, default=0, metavar="K",
                   help="with --epochs: write a checkpoint (-o/step/, -o/model.safetensors) every K steps")
    c.add_argument("--accumulate", type=_positive_count, default=1, metavar="K",
                   help="gradient accumulation: each step is a micro-batch, the optimizer updates every K steps "
                        "with the loss normalized over the items of all K (see pockc.compile); a run's last "
                        "partial cycle stays in the saved step's buffers (default 1: update every step)")
    c.add_argument("--max-grad-norm", type=_positive_rate, default=None, metavar="X",
                   help="clip the global L2 norm of the trained gradients to X before each update, as "
                        "torch.nn.utils.clip_grad_norm_ (default: no clipping)")
    c.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: frozen weights in bfloat16 and bfloat16 autocast compute, trained tensors and "
                        "optimizer state in float32 (default fp32: the model's own dtypes)")
    c.add_argument("--target", choices=["step", "aoti", "executorch"], default="step",
                   help="also export the step: aoti writes -o/train_step.pt2, an AOTInductor package a C++ "
                        "program runs; executorch writes -o/train_step.pte, an ExecuTorch program for phones "
                        "and microcontrollers (its planned arena must fit --budget) (default: only the saved "
                        "step -o/step/)")
    c.add_argument("-o", "--out", default="build", help="output directory (default: build/)")
    c.set_defaults(func=cmd_compile)
    t = sub.add_parser("train", help="continue training the step saved in an output directory",
                       description="Continue the step `pockc compile ... -o OUT` saved in OUT/step/ on the model "
                                   "file's train_data(): an interrupted run (Ctrl-C, --save-every checkpoints) "
                                   "resumes where it stopped, exactly; a finished one trains --epochs N more.")
    t.add_argument("out", nargs="?", default=None, help="the output directory of an earlier pockc compile -o OUT")
    t.add_argument("--resume", default=None, metavar="OUT", help="the same as the positional OUT")
    t.add_argument("--epochs", type=_count, default=0, help="epochs of a new run after a finished one")
    t.add_argument("--lr", type=_rate, default=None, help="learning rate of the new run (default: the last run's)")
    t.add_argument("--save-every", type=_count, default=0, metavar="K", help="write a checkpoint every K steps")
    t.add_argument("--model", default=None, metavar="FILE", help="the model file (default: the one the run used)")
    t.add_argument("--target", choices=["step", "aoti", "executorch"], default="step",
                   help="also export the step (aoti: .pt2, executorch: .pte)")
    t.add_argument("-v", "--verbose", action="store_true", help="progress bars")
    t.set_defaults(func=cmd_train)
    from pockc import bench  # the suite's logic and options live in pockc/bench.py
    b = sub.add_parser("bench", help="benchmark pockc against eager PyTorch and torch.compile",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(b)
    b.set_defaults(func=bench.main_args)
    return p


def _format_warning(message, category, filename, lineno, line=None):
    text = _one_line(message)
    return f"pockc: warning: {text[7:] if text.startswith('pockc: ') else text}\n"


def _say(text):
    print(f"pockc: {_one_line(text)}", file=sys.stderr, flush=True)


def main(argv=None):
    """Run the command line; returns the exit status: 0, COMPILE_ERROR (1: the model cannot be
    compiled as asked, or training diverged), USAGE_ERROR (2: a bad argument or model file) or
    INTERRUPTED (130: Ctrl-C). Every failure is one line on stderr (POCKC_TRACEBACK=1 re-raises
    unexpected errors, for a traceback)."""
    import warnings
    saved = warnings.formatwarning
    warnings.formatwarning = _format_warning
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        _say(f"error: {e}")
        return USAGE_ERROR
    except RunError as e:
        _say(f"error: {e}")
        return COMPILE_ERROR
    except KeyboardInterrupt:
        _say("interrupted")
        return INTERRUPTED
    except BrokenPipeError:                     # stdout closed early (pockc ... | head)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return COMPILE_ERROR
    except Exception as e:  # noqa: BLE001
        from pockc.errors import CompileError
        if isinstance(e, (CompileError, ValueError)):
            _say(f"error: {e}")
            return COMPILE_ERROR
        if isinstance(e, OSError) and e.strerror:
            _say(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror}")
            return COMPILE_ERROR
        if os.environ.get("POCKC_TRACEBACK", "").strip() not in ("", "0"):
            raise
        _say(f"error: unexpected {type(e).__name__}: {e} (this may be a pockc bug: set POCKC_TRACEBACK=1 for "
             "the traceback and report it)")
        return COMPILE_ERROR
    finally:
        warnings.formatwarning = saved


if __name__ == "__main__":
    sys.exit(main())
