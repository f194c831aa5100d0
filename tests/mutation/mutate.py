"""Mutation testing for pockc: apply each mutant of tests/mutation/mutations.py to a private copy of
the working tree, run the tests mapped to it, and record whether the suite notices.

    python -m tests.mutation.mutate                 # every mutant, mapped tests, writes the report
    python -m tests.mutation.mutate --list          # the mutants, their files and tests
    python -m tests.mutation.mutate --only NAME,NAME
    python -m tests.mutation.mutate --full          # survivors re-run against the whole tests/
    python -m tests.mutation.mutate --full all      # every mutant against the whole tests/

How (see README.md): the tree (``git ls-files -co --exclude-standard``: tracked files plus untracked
files git does not ignore) is copied once into a temporary directory. The venv's pockc is an
*editable* install of this checkout whose import finder maps ``pockc.passes`` -> ``<checkout>/passes``
and ``pockc.runtime`` -> ``<checkout>/runtime``; with only PYTHONPATH pointing at the copy, ``pockc``
would come from the copy but ``pockc.passes`` / ``pockc.runtime`` from the checkout, and every pass
or optimizer mutant would "survive". So the copy gets ``pockc/passes`` and ``pockc/runtime``
symlinks to its own ``passes/`` and ``runtime/``: the normal path finder (which runs before the
editable finder) then resolves the whole package inside the copy. Before any mutant runs, a self
check imports every target module from the copy and verifies the files, and a canary mutant (a
``raise`` appended to one file per package) must make the import fail.

Each mutant: write the mutated file into the copy (the original is restored afterwards), run
``python -m pytest -x -q -p no:cacheprovider -n 2 <mapped tests>`` with cwd and PYTHONPATH = the
copy, no bytecode caches and a fresh POCKC_CACHE, and record killed (tests failed, exit 1/2),
survived (exit 0), timeout or error (any other exit: e.g. no test collected). The mapped tests
are first collected, and (unless ``--no-baseline``) run, on the unmutated copy: a mutant can only be
killed by tests that pass without it.

The report (``report.md``, ``report.json`` next to this file) is written atomically (temp file,
fsync, rename) after a run over every mutant, or wherever ``--report DIR`` says.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pockc.bench import git_commit             # the commit, '+dirty' when tracked files changed
from pockc.runtime.fileio import atomic_write   # temporary file, fsync, rename

from .mutations import MUTATIONS, Mutation

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CANARY = "raise RuntimeError('pockc mutation canary: this module must not import')\n"
CANARY_FILES = ("passes/prune_backward.py", "runtime/optim.py", "pockc/plan.py")
SELF_CHECK_MODULES = ("pockc", "pockc.passes", "pockc.runtime", "pockc.plan", "pockc.lora",
                      "pockc.runtime.optim", "passes", "runtime")


class MutationListError(Exception):
    """The list is out of sync with the code (a snippet not found exactly once, a syntax error)."""


# --------------------------------------------------------------------------- the mutants
def select(only: str | None) -> list[Mutation]:
    names = [m.name for m in MUTATIONS]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MutationListError(f"duplicate mutant names: {dup}")
    if not only:
        return list(MUTATIONS)
    want = [w.strip() for w in only.split(",") if w.strip()]
    unknown = [w for w in want if w not in names]
    if unknown:
        raise MutationListError(f"unknown mutant(s) {unknown}; --list shows the names")
    return [m for m in MUTATIONS if m.name in want]


def mutated_source(m: Mutation, root: Path) -> tuple[str, str, int]:
    """(original text, mutated text, line of the snippet); raises MutationListError unless the
    snippet occurs exactly once and the result still compiles."""
    path = root / m.file
    if not path.is_file():
        raise MutationListError(f"{m.name}: {m.file} does not exist")
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise MutationListError(f"{m.name}: the snippet occurs {count} times in {m.file} (must be exactly once):\n"
                                f"    {m.old!r}")
    if m.old == m.new:
        raise MutationListError(f"{m.name}: the replacement equals the snippet")
    new = text.replace(m.old, m.new)
    try:
        compile(new, str(path), "exec")
    except SyntaxError as e:
        raise MutationListError(f"{m.name}: the mutated {m.file} does not compile: {e}") from None
    return text, new, text[:text.index(m.old)].count("\n") + 1


def validate(mutants, root: Path) -> dict:
    """name -> line of the snippet, for every mutant; all errors at once."""
    errors, lines = [], {}
    for m in mutants:
        try:
            lines[m.name] = mutated_source(m, root)[2]
        except MutationListError as e:
            errors.append(str(e))
        if not m.tests:
            errors.append(f"{m.name}: no tests mapped")
    if errors:
        raise MutationListError("\n".join(errors))
    return lines


# --------------------------------------------------------------------------- the copy
def copy_tree(dest: Path) -> int:
    out = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    files = sorted({f for f in out.decode().split("\0") if f})
    n = 0
    for f in files:
        src = REPO / f
        if not src.is_file():
            continue            # deleted in the working tree but still in the index
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / f)
        n += 1
    # pyproject maps pockc.passes -> passes/, pockc.runtime -> runtime/ (an editable install does
    # it with a finder pointing at the checkout): make the copy's own directories win.
    for sub in ("passes", "runtime"):
        link = dest / "pockc" / sub
        if link.exists() or link.is_symlink():
            raise MutationListError(f"{link} already exists in the tree; the runner cannot map pockc.{sub}")
        link.symlink_to(Path("..") / sub, target_is_directory=True)
    return n


def child_env(copy: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"     # a stale .pyc can never stand in for a mutant
    env["POCKC_CACHE"] = str(cache)          # no layer scores cached across mutants
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(copy.parent / "inductor-cache"))
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONHASHSEED"] = "0"
    return env


def self_check(copy: Path, env: dict) -> None:
    """The copy's modules are the ones imported, and a module that raises at import is noticed."""
    code = ("import importlib, json, os, sys\n"
            f"mods = {list(SELF_CHECK_MODULES)!r}\n"
            "print(json.dumps({m: os.path.realpath(importlib.import_module(m).__file__) for m in mods}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"self check: importing pockc from the copy failed:\n{r.stderr[-3000:]}")
    files = json.loads(r.stdout.strip().splitlines()[-1])
    real = os.path.realpath(copy)
    wrong = {m: f for m, f in files.items() if not f.startswith(real + os.sep)}
    if wrong:
        raise RuntimeError(f"self check: these modules are imported from outside the copy {real}: {wrong}")
    for f in CANARY_FILES:
        path = copy / f
        original = path.read_text()
        mod = "pockc." + f[:-3].replace("/", ".") if not f.startswith("pockc/") else f[:-3].replace("/", ".")
        try:
            write(path, original + "\n" + CANARY)   # at the end: after any __future__ import
            r = subprocess.run([sys.executable, "-c", f"import {mod}"], cwd=copy, env=env, capture_output=True,
                               text=True, timeout=300)
        finally:
            write(path, original)
        if r.returncode == 0 or "pockc mutation canary" not in r.stderr:
            raise RuntimeError(f"self check: a canary raising at import in {f} was not seen by `import {mod}`: "
                               "the mutants would not be what the tests import")


def write(path: Path, text: str) -> None:
    """Rewrite ``path`` and move its mtime forward (no import cache can mistake it for the old one)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= before:
        os.utime(path, ns=(st.st_atime_ns, before + 1_000_000_000))


# --------------------------------------------------------------------------- running pytest
def pytest_cmd(tests, workers: int, stop_first: bool = True, basetemp: Path | None = None, deselect=()) -> list:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers)]
    if stop_first:
        cmd.insert(3, "-x")
    if basetemp is not None:      # private tmp_path root: no clash with other pytest sessions
        cmd.append(f"--basetemp={basetemp}")
    for d in deselect:            # tests that fail on the unmutated tree (--deselect-failing)
        cmd += ["--deselect", d]
    return cmd + list(tests)


def run_pytest(cmd, copy: Path, env: dict, timeout: float) -> tuple:
    """(returncode or None on timeout, seconds, output)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        import signal
        try:
            os.killpg(p.pid, signal.SIGKILL)     # the group this runner started: pytest and its workers
        except ProcessLookupError:
            pass
        out, _ = p.communicate()
        rc = None
    return rc, time.perf_counter() - t0, out or ""


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+\.py(?:::.*?)?)(?: - .*)?$", re.M)   # pytest's short summary lines


def first_failure(out: str) -> str:
    m = _FAILED.search(out)
    if m:
        return f"{m.group(1)} {m.group(2)}"
    m = re.search(r"^E\s+(.{0,160})", out, re.M)
    return m.group(1).strip() if m else ""


def summary_line(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1].strip("= ").strip() if lines else ""


def classify(rc) -> str:
    if rc is None:
        return "timeout"
    if rc == 0:
        return "survived"
    if rc in (1, 2):        # test failures; 2: interrupted / collection error (e.g. import raises)
        return "killed"
    return "error"          # 3 internal error, 4 usage error, 5 no tests collected, signals


def baseline(mutants, copy: Path, env: dict, workers: int, timeout: float, run_tests: bool, deselect_failing: bool,
             log) -> list:
    """Collect (and, with ``run_tests``, run) every mapped test on the unmutated copy. Returns the node
    ids to deselect from the mutant runs: the tests failing here, with ``deselect_failing``."""
    tests = sorted({t for m in mutants for t in m.tests})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "--collect-only", *tests]
    rc, _, out = run_pytest(cmd, copy, env, timeout)
    if rc != 0:
        raise RuntimeError(f"the mapped tests do not collect on the unmutated tree (exit {rc}):\n{out[-4000:]}")
    if not run_tests:
        return []
    log(f"baseline: running the {len(tests)} mapped test targets on the unmutated tree ...")
    rc, secs, out = run_pytest(pytest_cmd(tests, workers, stop_first=False, basetemp=copy.parent / "pytest-tmp"),
                               copy, env, 3 * timeout)
    if rc == 0:
        log(f"baseline: green ({summary_line(out)}, {secs:.0f} s)")
        return []
    fails = sorted({b for _, b in _FAILED.findall(out)})
    if rc != 1 or not fails or not deselect_failing:
        raise RuntimeError(f"the mapped tests fail without any mutant (exit {rc}); fix them first, or pass "
                           "--deselect-failing to leave them out of every mutant's run:\n"
                           + ("\n".join(fails) or out[-4000:]))
    log(f"baseline: {summary_line(out)} ({secs:.0f} s); deselected from every mutant run (they fail without "
        f"a mutant): " + ", ".join(fails))
    return fails


# --------------------------------------------------------------------------- the report
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def torch_version() -> str:
    try:
        import torch
        return torch.__version__
    except ImportError:
        return "unknown"


def score(results) -> tuple:
    killed = sum(r["status"] == "killed" for r in results)
    survived = sum(r["status"] == "survived" for r in results)
    judged = killed + survived
    return killed, survived, (100.0 * killed / judged if judged else 0.0)


def table(results, fmt="github") -> str:
    from tabulate import tabulate
    rows = [[r["name"] + (" *" if r["audit"] else ""), f"{r['file']}:{r['line']}", r["status"],
             f"{r['seconds']:.0f}", r["killed_by"] if r["status"] == "killed" else r["summary"]] for r in results]
    return tabulate(rows, headers=["mutant", "where", "result", "s", "killed by / pytest summary"], tablefmt=fmt)


def report_md(meta, results) -> str:
    killed, survived, pct = score(results)
    other = [r for r in results if r["status"] not in ("killed", "survived")]
    lines = [
        "# Mutation testing report",
        "",
        "Written by `python -m tests.mutation.mutate` (see `tests/mutation/README.md`); do not edit by hand.",
        "",
        f"- date: {meta['date']}",
        f"- commit: {meta['commit']}",
        f"- torch: {meta['torch']}",
        f"- machine: {meta['machine']}",
        f"- tests: {meta['mode']} (`{meta['pytest']}`)",
        f"- total time: {meta['seconds'] / 60:.1f} min",
    ]
    if meta.get("deselected"):
        lines.append("- deselected from every run (failing on the unmutated tree): "
                     + ", ".join(f"`{d}`" for d in meta["deselected"]))
    lines += [
        "",
        f"**Score: {killed} killed / {killed + survived} = {pct:.1f}%** "
        f"({survived} survived{', ' + str(len(other)) + ' timeout/error (not scored)' if other else ''}).",
        "",
        "`*`: survived an earlier audit of the suite.",
        "",
        table(results),
        "",
    ]
    surv = [r for r in results if r["status"] == "survived"]
    if surv:
        lines += ["## Survivors", ""]
        for r in surv:
            lines.append(f"- **{r['name']}** ({r['file']}:{r['line']}): {r['why']}. Tests run: "
                         + ", ".join(f"`{t}`" for t in r["tests"]))
        lines.append("")
    if other:
        lines += ["## Timeouts and errors", ""]
        for r in other:
            lines.append(f"- **{r['name']}**: {r['status']}: {r['summary']}")
        lines.append("")
    lines += ["## Mutants", ""]
    for r in results:
        lines.append(f"- **{r['name']}** ({r['file']}:{r['line']}): {r['why']}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def run_one(m, copy, env_base, cache_root, tests, workers, timeout, deselect=()) -> dict:
    path = copy / m.file
    original, mutated, line = mutated_source(m, copy)
    cache = cache_root / m.name
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(env_base, POCKC_CACHE=str(cache))
    try:
        write(path, mutated)
        rc, secs, out = run_pytest(pytest_cmd(tests, workers, basetemp=copy.parent / "pytest-tmp", deselect=deselect),
                                   copy, env, timeout)
    finally:
        write(path, original)
        shutil.rmtree(cache, ignore_errors=True)
    status = classify(rc)
    return {"name": m.name, "file": m.file, "line": line, "why": m.why, "audit": m.audit, "tests": list(tests),
            "status": status, "returncode": rc, "seconds": round(secs, 1),
            "killed_by": first_failure(out) if status == "killed" else "",
            "summary": (f"no result after {timeout:.0f} s" if rc is None else summary_line(out)),
            "output_tail": out[-2500:] if status in ("error", "timeout") else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutation.mutate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", metavar="NAME[,NAME]", help="run only these mutants (no report unless --report)")
    ap.add_argument("--full", nargs="?", const="survivors", choices=("survivors", "all"),
                    help="run the whole tests/ instead of the mapped tests: for the survivors of the mapped "
                         "run (default) or for every mutant ('all')")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per mutant run (default 900)")
    ap.add_argument("--workers", "-n", type=int, default=2, help="pytest-xdist workers (default 2)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the mapped tests on the unmutated tree first (they are still collected)")
    ap.add_argument("--deselect-failing", action="store_true",
                    help="when some mapped tests fail on the unmutated tree, deselect them from every mutant run "
                         "(listed in the report) instead of aborting")
    ap.add_argument("--report", metavar="DIR", help=f"write report.md/json here (default: {HERE.relative_to(REPO)} "
                                                    "after a run over every mutant)")
    ap.add_argument("--no-report", action="store_true", help="write no report")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = ap.parse_args(argv)

    try:
        mutants = select(args.only)
        lines = validate(mutants, REPO)
    except MutationListError as e:
        print(f"mutation list out of sync with the code:\n{e}", file=sys.stderr)
        return 2
    if args.list:
        from tabulate import tabulate
        rows = [[m.name + (" *" if m.audit else ""), f"{m.file}:{lines[m.name]}", "\n".join(m.tests)] for m in mutants]
        print(tabulate(rows, headers=["mutant", "where", "tests"], tablefmt="simple"))
        print(f"\n{len(mutants)} mutants (* survived an earlier audit)")
        return 0

    from tqdm import tqdm
    log = tqdm.write
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pockc-mutation-"))
    copy = work / "tree"
    copy.mkdir()
    try:
        n = copy_tree(copy)
        env = child_env(copy, work / "cache")
        self_check(copy, env)
        log(f"copied {n} files to {copy}; self check passed (the copy's pockc, pockc.passes, pockc.runtime are "
            "imported; a canary raising at import is seen)")
        full = ("tests",)
        deselected = []
        if args.full != "all":
            deselected = baseline(mutants, copy, env, args.workers, args.timeout, not args.no_baseline,
                                  args.deselect_failing, log)
        results = []
        bar = tqdm(mutants, unit="mutant", dynamic_ncols=True, disable=None)   # no bar when not a terminal
        for m in bar:
            bar.set_description(m.name[:32])
            tests = full if args.full == "all" else m.tests
            r = run_one(m, copy, env, work / "cache", tests, args.workers, args.timeout, deselected)
            results.append(r)
            k, s, _ = score(results)
            bar.set_postfix(killed=k, survived=s)
            log(f"{r['status']:>8}  {m.name}  ({r['seconds']:.0f} s)  {r['killed_by'] or r['summary']}")
        if args.full == "survivors":
            again = [m for m, r in zip(mutants, results) if r["status"] == "survived"]
            if again:
                log(f"--full: re-running {len(again)} survivor(s) against the whole tests/")
            for m in tqdm(again, unit="mutant", dynamic_ncols=True, disable=None):
                r = run_one(m, copy, env, work / "cache", full, args.workers, args.timeout, deselected)
                r["tests"] = list(m.tests) + ["(then) tests"]
                i = next(i for i, x in enumerate(results) if x["name"] == m.name)
                r["seconds"] += results[i]["seconds"]
                results[i] = r
                log(f"{r['status']:>8}  {m.name}  (whole suite)  {r['killed_by'] or r['summary']}")
    except (MutationListError, RuntimeError) as e:
        print(f"\nmutation run aborted: {e}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept the copy: {copy}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    seconds = time.perf_counter() - t_start
    killed, survived, pct = score(results)
    print()
    print(table(results, fmt="simple"))
    print(f"\nscore: {killed} killed of {killed + survived} ({pct:.1f}%), {survived} survived, "
          f"{len(results) - killed - survived} timeout/error; {seconds / 60:.1f} min")
    surv = [r["name"] for r in results if r["status"] == "survived"]
    if surv:
        print("survivors: " + ", ".join(surv))

    out_dir = Path(args.report) if args.report else (HERE if not args.only else None)
    if out_dir is not None and not args.no_report:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_commit(),
                "torch": torch_version(), "machine": machine(),
                "mode": {"all": "whole tests/ for every mutant", "survivors": "mapped tests, then whole tests/ "
                         "for survivors"}.get(args.full, "mapped tests per mutant"),
                "pytest": " ".join(["python"] + pytest_cmd(["<tests>"], args.workers)[1:]), "seconds": round(seconds, 1),
                "score": {"killed": killed, "survived": survived, "percent": round(pct, 1),
                          "not_scored": len(results) - killed - survived},
                "deselected": deselected}
        atomic_write(out_dir / "report.json", json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        atomic_write(out_dir / "report.md", report_md(meta, results))
        print(f"report: {out_dir / 'report.md'}")
    return 0 if not surv and killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
