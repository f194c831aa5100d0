"""The train_step.py that ``pockc compile`` writes is a program that runs on its own.

``pockc compile examples/cnn.py ... -o OUT`` (through ``pockc.cli.main``) writes OUT/train_step.py
(the step's program: ``def forward(self, <trained params>, <frozen params>, <buffers>,
<optimizer state>, <optimizer scalars>, <batch tensors>)``, which updates its inputs in place and
returns the loss) beside OUT/model.safetensors (the model's state dict) and OUT/step/ (the saved
step; its manifest lists the input order, its state file the optimizer state). A fresh Python
process in which importing pockc raises (the compiler and, unless the program imports the paging
calls, the runtime too) executes train_step.py with those files, for a few steps of different
batches; its losses, parameters, buffers and optimizer state equal, bit for bit, those of a
TrainStep compiled in this process from the same model file and run on the same batches.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pockc
from pockc import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "cnn.py")
STEPS = 3

# Runs in the subprocess: torch and safetensors only (pockc.runtime too when ALLOW_RUNTIME, for a
# program that imports the runtime's paging calls).
DRIVER = r'''
import importlib.abc, json, os, sys

out, work, threads, allow_runtime = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"


class NoCompiler(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pockc" or name.startswith("pockc."):
            runtime = name in ("pockc", "pockc.errors") or name.startswith("pockc.runtime")
            if not (allow_runtime and runtime):
                raise ImportError("pockc is not available here: " + name)
        return None


sys.meta_path.insert(0, NoCompiler())
import torch
from safetensors.torch import load_file

torch.set_num_threads(threads)
namespace = {"__name__": "train_step"}
with open(os.path.join(out, "train_step.py")) as f:
    exec(compile(f.read(), os.path.join(out, "train_step.py"), "exec"), namespace)
forward = namespace["forward"]

manifest = json.load(open(os.path.join(out, "step", "manifest.json")))
layout = manifest["step"]["layout"]
model = load_file(os.path.join(out, "model.safetensors"))                # the model's state dict
state = load_file(os.path.join(out, "step", manifest["files"]["state"]["name"]))
tensors = {n: model[n] for n in layout["params"] + layout["frozen"] + layout["buffers"]}
opt_state = {(p, s): state[f"optimizer/{p}/{s}"] for p, s in layout["state"]}
frozen_before = {n: tensors[n].clone() for n in layout["frozen"]}

run = torch.load(os.path.join(work, "run.pt"))
assert [list(x) for x in run["scalar_names"]] == [list(layout["scalars"])], (run["scalar_names"], layout["scalars"])
losses = []
with torch.no_grad():
    for scalars, batch in zip(run["scalars"], run["batches"]):
        inputs = ([tensors[n] for n in layout["params"] + layout["frozen"] + layout["buffers"]]
                  + [opt_state[tuple(k)] for k in layout["state"]]
                  + [torch.tensor(float(v), dtype=torch.float64) for v in scalars] + list(batch))
        result = forward(None, *inputs)
        losses.append(result[0] if isinstance(result, (tuple, list)) else result)
assert all(torch.equal(tensors[n], t) for n, t in frozen_before.items()), "a frozen parameter changed"
loaded = [m for m in sys.modules if m == "pockc" or m.startswith("pockc.")]
assert allow_runtime or not loaded, loaded
torch.save({"losses": [l.clone() for l in losses], "tensors": tensors,
            "state": {f"{p}/{s}": t for (p, s), t in opt_state.items()}, "modules": loaded},
           os.path.join(work, "result.pt"))
print("ran", len(losses))
'''


def load_example(path):
    spec = importlib.util.spec_from_file_location("pockc_example_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def different_batches(example_batch, n):
    x, y = example_batch
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(x.shape, generator=g), torch.randint(0, 10, y.shape, generator=g)) for _ in range(n)]


CASES = {
    # SGD with momentum (the example's optimizer()), batch norm in train mode: running statistics
    "last2-sgd": (["--update", "last:2"], dict(update="last:2")),
    # AdamW (per-step bias corrections) over channel-sparse rows
    "channels-adamw": (["--update", '{"blocks.3.*": "channels:0.5", "fc.*": "full"}', "--optimizer", "adamw",
                        "--lr", "1e-3"],
                       dict(update={"blocks.3.*": "channels:0.5", "fc.*": "full"}, optimizer=pockc.AdamW(lr=1e-3))),
    # over a budget: recomputed and paged activations (the program imports pockc.runtime.paging)
    "paged": (["--update", "full", "--budget", "3.2MB", "--device-profile", "x86-cpu"],
              dict(update="full", budget="3.2MB", device_profile="x86-cpu")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_emitted_train_step_runs_standalone_and_matches(case, tmp_path, capsys):
    cli_args, api_kwargs = CASES[case]
    out = tmp_path / "build"
    assert cli.main(["compile", EXAMPLE, *cli_args, "-o", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    code = (out / "train_step.py").read_text()
    paged = "from pockc.runtime.paging import" in code
    if case == "paged":
        plan = json.loads((out / "plan.json").read_text())
        assert plan["remat"]["paged"] and paged, plan["remat"]
    else:
        assert "import pockc" not in code and "from pockc" not in code

    # the in-process TrainStep: compiled from the same model file, on the same batches
    ex = load_example(EXAMPLE)
    model = ex.model()
    kwargs = dict(api_kwargs)
    kwargs.setdefault("optimizer", ex.optimizer())
    step = pockc.compile(model, ex.loss_fn, ex.example_batch(), **kwargs)
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())    # the CLI saved the start
    manifest = json.loads((out / "step" / "manifest.json").read_text())
    assert manifest["step"]["layout"]["params"] == step.layout.params
    assert manifest["step"]["layout"]["state"] == [list(k) for k in step.layout.state]
    header = next(line for line in code.splitlines() if line.startswith("# Inputs in order:"))
    assert f"{len(step.layout.params)} trained params, {len(step.layout.frozen)} frozen params" in header

    batches = different_batches(ex.example_batch(), STEPS)
    scalars = [[step.optimizer.scalars(i)[s] for s in step.layout.scalars] for i in range(STEPS)]
    torch.save({"batches": batches, "scalars": scalars, "scalar_names": [list(step.layout.scalars)]},
               tmp_path / "run.pt")
    losses = [step(*b) for b in batches]

    r = subprocess.run([sys.executable, "-c", DRIVER, str(out), str(tmp_path), str(torch.get_num_threads()),
                        "1" if paged else "0"], capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["ran", str(STEPS)], r.stdout
    got = torch.load(tmp_path / "result.pt")
    if paged:   # the program needed the runtime's paging calls, nothing of the compiler
        assert got["modules"] and all(m in ("pockc", "pockc.errors") or m.startswith("pockc.runtime")
                                      for m in got["modules"]), got["modules"]
    for i, (a, b) in enumerate(zip(got["losses"], losses)):
        assert torch.equal(a, b), (i, float(a), float(b))
    assert len({float(x) for x in losses}) == STEPS          # different batches, different losses
    ours = model.state_dict()
    for name, t in got["tensors"].items():
        assert torch.equal(t, ours[name]), name
    for name in step.layout.params:
        assert not torch.equal(ours[name], saved[name]), f"{name} was not trained"
    for (p, s), t in step.state.items():
        assert torch.equal(got["state"][f"{p}/{s}"], t), (p, s)
