"""A compiled step as an AOTInductor package: training without Python.

``step.export("step.pt2", target="aoti")`` (:func:`export_aoti`) packages the step's pruned joint
graph -- forward, the backward the plan needs and the in-place optimizer update -- with
``torch._inductor.aoti_compile_and_package``. ``pockc.load("step.pt2")`` (:func:`load_aoti`) runs it
from Python; ``runtime/cpp/pockc_aoti_runner.cpp`` (:func:`build_runner`) runs it from C++ over
libtorch alone.

How the step becomes a package
------------------------------
The graph takes (trained params, frozen params, buffers, optimizer state, per-step scalars, batch)
and updates the first, third and fourth groups in place. It is wrapped in a module whose *buffers*
are every tensor it reads or writes (copies of the step's current values) and whose ``forward``
takes the per-step scalars and the batch; ``torch.export`` records the in-place writes as buffer
mutations and AOTInductor compiles them into writes to its constants. The per-step scalars (the
learning rate, AdamW's bias corrections) stay *inputs*: baked in, AdamW would go wrong from its
second step on.

The package is a .pt2 (a zip archive) holding AOTInductor's code for the step and, beside it:

``pockc/state.pt``
    ``torch.save`` of ``{constant name: tensor}``, every tensor of the step (and the few that
    ``model.state_dict()`` names but the graph never reads, under ``extra/<name>``). The
    compiled library holds no weights (``aot_inductor.package_constants_in_so=False``): a loader
    hands it these tensors as *user-managed* constants, so the step updates the loader's own
    tensors in place and reading them back is reading them (AOTInductor's Python loader offers no
    way to read constants out of the library). Each tensor is stored once.
``pockc/manifest.json``
    what a loader needs: the tensors in input order (constant name, model name, role), which are
    trained, the optimizer and its hyperparameters, the step count, the batch signature, the pockc
    and torch versions.

The compiled library's own metadata (``loader.get_metadata()``, ``pockc.*`` keys) repeats what the
C++ runner needs as flat strings: the optimizer's hyperparameters, the names of the per-step
scalars, the step count, the record holding the tensors and which constants training writes.

Two torch behaviours this module works around, both checked by tests/test_aoti.py:

* Inductor's joint-graph constant folding evaluates one-element buffers at compile time even when
  the graph writes them (``num_batches_tracked += 1`` became ``= 1``): it is turned off
  (``joint_graph_constant_folding=False``).
* A package whose constants were never loaded crashes the process when run: :class:`AotiStep`
  always loads them first, and the C++ runner does too.

The kernels are specialized to the exported batch shapes and to the intra-op thread count at
export time (``torch.get_num_threads()``). A program that draws random numbers (dropout) draws
them from the default generator of its device, as the aten step does, but with Inductor's own
generator code: other masks than the aten step's for the same seed (same distribution, a new mask
every step). Exporting a CUDA step has not been measured by this project yet. This module imports
torch and pockc.runtime only.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
import zipfile

import torch

from .artifact import _version, check_versions, draws_random, signature_to_json
from .batch import batch_signature, batch_tensors, describe_leaf, signature_difference
from .errors import ArtifactError, BatchError, StepError
from .fileio import atomic_write, fsync_dir, remove_stale_temps
from .layout import Layout
from .optim import Optimizer, checked_optimizer

FORMAT = "pockc-aoti"
FORMAT_VERSION = 1
MODEL_NAME = "model"                      # AOTInductor's name for the one model in the package
MANIFEST_RECORD = "pockc/manifest.json"   # records of the .pt2 archive, under its top folder
STATE_RECORD = "pockc/state.pt"
EXTRA_PREFIX = "extra/"                   # state.pt keys of tensors the graph does not read
RUNNER_NAME = "pockc_aoti_runner"
CPP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpp")

# Inductor settings every export uses (see the module docstring); inductor_configs= adds to them.
BASE_CONFIGS = {"aot_inductor.package_constants_in_so": False, "joint_graph_constant_folding": False}

_ROLES = ("param", "frozen", "buffer", "state")


class RunnerBuildError(RuntimeError):
    """The C++ runner could not be built (no C++ compiler, or the compiler failed)."""


# -- export ---------------------------------------------------------------------------------
class _StepModule(torch.nn.Module):
    """The step's graph over buffers: ``forward(*scalars, *batch_tensors) -> loss``."""

    def __init__(self, gm, names, tensors):
        super().__init__()
        self.gm = gm
        self._names = list(names)
        for name, t in zip(names, tensors):
            self.register_buffer(name, t)

    def forward(self, *args):
        bufs = self._buffers
        return self.gm(*[bufs[n] for n in self._names], *args)


def _synthetic_batch(signature) -> list:
    """Flat batch tensors of ``signature`` (zeros: export needs shapes, not values)."""
    out = []
    for _, leaf in signature[1]:
        if leaf[0] == "tensor":
            out.append(torch.zeros(leaf[1], dtype=leaf[2], device=leaf[3]))
    return out


def check_export_path(path, suffix, what):
    """``(path, its directory)`` for a file an export writes; ValueError / FileNotFoundError for
    another suffix, a directory, or a missing directory."""
    path = os.fspath(path)
    if not path.endswith(suffix):
        raise ValueError(f"{path}: {what}'s file name must end in {suffix}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; give the {suffix} file to write")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory (for {path})")
    return path, directory


def _tensor_plan(step, gm_inputs):
    """(constant name, model name, role, state name or None) per tensor input of the graph, in
    order: the names the tensors have in the package (``param000``, ``frozen003``, ...)."""
    lay = step.layout
    rows = [(f"param{i:03d}", n, "param", None) for i, n in enumerate(lay.params)]
    rows += [(f"frozen{i:03d}", n, "frozen", None) for i, n in enumerate(lay.frozen)]
    rows += [(f"buffer{i:03d}", n, "buffer", None) for i, n in enumerate(lay.buffers)]
    rows += [(f"state{i:03d}", p, "state", s) for i, (p, s) in enumerate(map(tuple, lay.state))]
    if len(rows) > len(gm_inputs):
        raise StepError(f"export: the step takes {len(gm_inputs)} inputs, its layout names {len(rows)} tensors")
    return rows


def _output_key(row) -> str:
    """The name the C++ runner writes a trained tensor under (as in a saved step's state file)."""
    _, name, role, state = row
    return {"param": name, "buffer": f"buffer/{name}", "state": f"optimizer/{name}/{state}"}[role]


def _runner_metadata(step, rows, signature_tensors, step_count) -> dict:
    """Flat strings for the C++ runner (stored in the compiled library's metadata)."""
    opt = step.optimizer
    meta = {"pockc.format": f"{FORMAT}/{FORMAT_VERSION}", "pockc.version": _version(),
            "pockc.torch": torch.__version__, "pockc.optimizer": type(opt).__name__,
            "pockc.scalars": " ".join(step.layout.scalars), "pockc.step_count": str(step_count),
            "pockc.batch_tensors": str(signature_tensors), "pockc.state_record": STATE_RECORD}
    for k, v in opt.to_dict().items():
        if k == "type":
            continue
        if k == "betas":
            meta["pockc.opt.beta1"], meta["pockc.opt.beta2"] = repr(float(v[0])), repr(float(v[1]))
        elif isinstance(v, bool):
            meta[f"pockc.opt.{k}"] = "1" if v else "0"
        else:
            meta[f"pockc.opt.{k}"] = repr(float(v))
    outs = []
    for row in rows:
        if row[2] != "frozen":
            key = _output_key(row)
            if any(c.isspace() or c == ";" for c in key):
                key = row[0]
            outs.append(f"{row[0]} {key}")
    meta["pockc.outputs"] = ";".join(outs)
    return meta


def export_aoti(step, path, example_batch=None, *, inductor_configs: dict | None = None) -> str:
    """Package ``step`` (a :class:`~pockc.runtime.train_step.TrainStep`), optimizer update included,
    as the AOTInductor package ``path`` (a ``.pt2``); returns the path written.

    ``example_batch``: export the program specialized to this batch's signature (default: the one
    the step was compiled for). The package holds copies of the step's current tensors and its
    step count: loading it (:func:`load_aoti`) continues training from there. The write is atomic
    (a process killed meanwhile leaves any previous file at ``path`` intact).

    >>> step.export("step.pt2", target="aoti")        # doctest: +SKIP
    >>> loaded = pockc.load("step.pt2"); loss = loaded(x, y)
    """
    path, directory = check_export_path(path, ".pt2", "an AOTInductor package")
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.aot_inductor, "package_constants_in_so"):
        raise RuntimeError(f"export_aoti needs AOTInductor's package_constants_in_so setting, which torch "
                           f"{torch.__version__} lacks (use torch >= 2.11)")
    t0 = time.perf_counter()
    with step._lock:
        if example_batch is None:
            gm, signature, nargs = step.graph, step._signature, step._nargs
            flat = _synthetic_batch(signature)
        else:
            batch = tuple(example_batch)
            gm, signature, nargs = step._graph_for(batch), batch_signature(batch), len(batch)
            flat = [t.detach().contiguous() for t in batch_tensors(batch)]
        inputs = step.inputs(tuple(flat))     # step.inputs only flattens the batch: flat is that
        lay = step.layout
        rows = _tensor_plan(step, inputs)
        n_tensors, n_scalars = len(rows), len(lay.scalars)
        if len(inputs) != n_tensors + n_scalars + len(flat):
            raise StepError(f"export_aoti: the step takes {len(inputs)} inputs, its layout names "
                            f"{n_tensors + n_scalars + len(flat)}")
        tensors = [t.detach().clone() for t in inputs[:n_tensors]]
        step_count = step.step_count
        scalars = step.optimizer.scalars(step_count)
        scalar_inputs = [torch.tensor(scalars[s], dtype=torch.float64) for s in lay.scalars]
        extra = _state_dict_plan(step.model, inputs[:n_tensors], rows)
        sig_json = signature_to_json(signature)
        opt_dict = step.optimizer.to_dict()
        meta = _runner_metadata(step, rows, len(flat), step_count)
    module = _StepModule(gm, [r[0] for r in rows], tensors)
    configs = {**BASE_CONFIGS, **(inductor_configs or {})}
    configs["aot_inductor.metadata"] = {**meta, **configs.get("aot_inductor.metadata", {})}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's own deprecation notices while exporting
        ep = torch.export.export(module, tuple(scalar_inputs + flat), strict=False)
        torch._inductor.aoti_compile_and_package(ep, package_path=buf, inductor_configs=configs)
    constants = {r[0]: t for r, t in zip(rows, tensors)}
    for name, t in list(ep.constants.items()) + list(ep.state_dict.items()):
        if name not in constants and isinstance(t, torch.Tensor):
            constants[name] = t.detach()   # tensor constants of the graph itself (lifted by export)
    stored = dict(constants)
    for key, (src, t) in extra["tensors"].items():
        stored[EXTRA_PREFIX + key] = t.detach().clone()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "pockc": _version(), "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step_count": step_count, "optimizer": opt_dict, "layout": lay.to_json(),
        "batch_signature": sig_json, "batch_args": nargs, "batch_tensors": len(flat),
        "device": tensors[0].device.type if tensors else "cpu",
        "tensors": [{"constant": r[0], "name": r[1], "role": r[2], "state": r[3],
                     "trained": r[2] == "param", "shape": list(t.shape),
                     "dtype": str(t.dtype).replace("torch.", "")} for r, t in zip(rows, tensors)],
        "graph_constants": sorted(set(constants) - {r[0] for r in rows}),
        "state_dict": extra["keys"],
        "scalars": list(lay.scalars),
        "records": {"state": STATE_RECORD},
        "inductor_configs": {k: v for k, v in configs.items() if k != "aot_inductor.metadata"},
        "threads": torch.get_num_threads(),
        "draws_random": draws_random(gm),
    }
    state_bytes = io.BytesIO()
    torch.save({k: v.cpu() for k, v in stored.items()}, state_bytes)
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_STORED) as z:
        top = z.namelist()[0].split("/")[0]
        z.writestr(f"{top}/{STATE_RECORD}", state_bytes.getvalue())
        manifest["export_seconds"] = round(time.perf_counter() - t0, 3)
        z.writestr(f"{top}/{MANIFEST_RECORD}", json.dumps(manifest, indent=1, default=str) + "\n")
    out = atomic_write(path, buf.getvalue())
    remove_stale_temps(directory)
    fsync_dir(directory)
    return out


def _state_dict_plan(model, graph_tensors, rows) -> dict:
    """``model.state_dict()``'s keys, in order, each mapped to the tensor that holds its value:
    ``["param", name]`` etc. for a graph input (tied names share one), ``["extra", key]`` for a
    tensor the graph never reads (stored apart, returned as it was)."""
    by_id = {id(t): (r[2], r[1]) for r, t in zip(rows, graph_tensors) if r[2] != "state"}
    keys, tensors = [], {}
    for key, t in model.state_dict(keep_vars=True).items():
        hit = by_id.get(id(t))
        if hit is None:
            tensors[key] = ("extra", t)
            keys.append([key, "extra", key])
        else:
            keys.append([key, hit[0], hit[1]])
    return {"keys": keys, "tensors": tensors}


# -- load -----------------------------------------------------------------------------------
def _read_records(path) -> tuple[dict, dict]:
    """(manifest, {key: tensor}) from the package ``path``; ArtifactError naming it if unreadable."""
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ArtifactError(f"{path}: is a directory, not an AOTInductor package (.pt2)")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            man = next((n for n in names if n.endswith("/" + MANIFEST_RECORD)), None)
            if man is None:
                raise ArtifactError(f"{path}: not a pockc AOTInductor package (it has no {MANIFEST_RECORD}; "
                                    "write one with step.export(path, target='aoti'))")
            manifest = json.loads(z.read(man).decode("utf-8"))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise ArtifactError(f"{path}: {MANIFEST_RECORD} is not a pockc AOTInductor manifest")
            if manifest.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(f"{path}: package format version {manifest.get('format_version')}, this "
                                    f"pockc reads {FORMAT_VERSION}")
            top = man[: -len(MANIFEST_RECORD)]
            record = top + manifest.get("records", {}).get("state", STATE_RECORD)
            if record not in names:
                raise ArtifactError(f"{path}: lacks its tensors ({record[len(top):]})")
            data = z.read(record)
    except ArtifactError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path}: not a readable AOTInductor package, truncated or damaged "
                            f"({type(e).__name__}: {_first_line(e)})") from None
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 -- zlib.error and the like: still a damaged file
        raise ArtifactError(f"{path}: damaged ({type(e).__name__}: {_first_line(e)})") from None
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types for a damaged file
        raise ArtifactError(f"{path}: its tensors ({STATE_RECORD}) are unreadable ({_first_line(e)})") from None
    if not isinstance(tensors, dict):
        raise ArtifactError(f"{path}: {STATE_RECORD} is not a dict of tensors")
    return manifest, tensors


def _first_line(e) -> str:
    s = str(e).strip()
    return (s.splitlines() or [type(e).__name__])[0][:300]


def load_aoti(path, *, strict_versions: bool = True, device=None) -> "AotiStep":
    """An :class:`AotiStep` that continues training from the package ``path`` (written by
    :func:`export_aoti`), run by AOTInductor's runtime (``torch._inductor.aoti_load_package``).

    ``strict_versions``: refuse a package written by another pockc or torch release (its compiled
    code is tied to the torch it was built against). ``device``: where to put the tensors (default:
    the device they were exported from; a package compiled for CPU runs only on CPU)."""
    path = os.fspath(path)
    manifest, stored = _read_records(path)
    if strict_versions:
        check_versions(manifest, path, tied="an AOTInductor package is tied to its torch release: export it again")
    dev = torch.device(device if device is not None else manifest.get("device", "cpu"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch._inductor.aoti_load_package(path)
        fqns = list(compiled.get_constant_fqns())
    except Exception as e:  # noqa: BLE001 -- the C++ loader raises RuntimeError with a long trace
        raise ArtifactError(f"{path}: AOTInductor cannot load it ({_first_line(e)})") from None
    missing = [f for f in fqns if f not in stored]
    if missing:
        raise ArtifactError(f"{path}: {STATE_RECORD} lacks constants the compiled step needs: "
                            f"{', '.join(missing[:5])}")
    constants = {k: (v.to(dev) if v.device != dev else v) for k, v in stored.items()}
    try:
        compiled.load_constants({f: constants[f] for f in fqns}, check_full_update=True, user_managed=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: AOTInductor refused its tensors ({_first_line(e)})") from None
    return AotiStep(path, compiled, manifest, constants)


class ExportedStep:
    """What a step run by another runtime from an exported file shares (AOTInductor's
    :class:`AotiStep`, ExecuTorch's runtime/executorch.py ``ExecutorchStep``): the optimizer,
    checked; a call that checks the batch signature and the optimizer, passes the per-step
    scalars for ``step_count`` and the batch tensors to ``_execute`` and counts the step; errors
    naming the file. Subclasses set ``source``, ``manifest``, ``_signature``, ``_nargs``,
    ``_scalar_names``, ``_opt_key``, ``step_count``, ``_lock`` and ``_what`` (the file's kind)."""

    _what = "package"

    def _read_manifest(self, path, manifest):
        """The fields every loaded step takes from its manifest."""
        from .artifact import signature_from_json
        self.source = path
        self.manifest = manifest
        self.layout = Layout.from_json(manifest["layout"])
        self.optimizer = Optimizer.from_dict(manifest["optimizer"])
        self._opt_key = self.optimizer.graph_key()
        self._scalar_names = list(manifest["scalars"])
        self._signature = signature_from_json(manifest["batch_signature"])
        self._nargs = int(manifest["batch_args"])
        self.step_count = int(manifest["step_count"])
        self._lock = threading.Lock()

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, opt):
        self._optimizer = checked_optimizer(opt)

    def __call__(self, *batch):
        with self._lock:
            sig = batch_signature(batch)
            if sig != self._signature:
                raise BatchError(self._batch_mismatch(batch, sig))
            opt = self._optimizer
            if opt.graph_key() != self._opt_key:
                raise StepError(self._optimizer_mismatch(opt))
            s = opt.scalars(self.step_count)
            inputs = [torch.tensor(s[n], dtype=torch.float64) for n in self._scalar_names]
            inputs += [t if t.is_contiguous() else t.contiguous() for t in batch_tensors(batch)]
            out = self._execute(inputs)
            self.step_count += 1
        return out[0] if isinstance(out, (list, tuple)) else out

    def _batch_mismatch(self, batch, sig) -> str:
        where, what = f"{self.source}: ", self._what
        ref = self._signature
        if len(batch) != self._nargs:
            return (f"{where}batch has {len(batch)} elements, the {what} was exported for {self._nargs}: "
                    + ", ".join(f"batch{p}: {describe_leaf(s)}" for p, s in ref[1]))
        why = signature_difference(sig, ref)
        if not why:
            for (p, a), (_, b) in zip(sig[1], ref[1]):
                if a != b:
                    why = (f"batch{p} is a {describe_leaf(a)}, the {what} was exported for a {describe_leaf(b)}; "
                           f"an exported {what} runs only the shapes and constants it was exported for")
                    break
        return where + (why.replace("the step was compiled for", f"the {what} was exported for")
                        or f"the batch differs from the one the {what} was exported for")

    def _optimizer_mismatch(self, opt) -> str:
        saved = Optimizer.from_dict(self.manifest["optimizer"])
        what = self._what
        if type(opt) is not type(saved):
            return (f"{self.source}: step.optimizer is {type(opt).__name__}, the {what} was exported with "
                    f"{type(saved).__name__}; export the step again for it")
        changed = [k for k, v in opt.to_dict().items() if k not in opt.runtime_fields and v != saved.to_dict().get(k)]
        return (f"{self.source}: step.optimizer's {', '.join(changed)} changed since export (only lr can change: "
                f"the others are compiled into the {what}); export the step again for them")


class AotiStep(ExportedStep):
    """A training step run by AOTInductor's runtime; call it like ``loss = step(*batch)``.

    Each call passes the optimizer's per-step scalars for ``step_count`` (so ``step.optimizer.lr``
    may change between calls) and increments ``step_count``. The package is specialized to its
    batch signature (shapes included) and to the optimizer's hyperparameters other than ``lr``:
    anything else is a :class:`~pockc.runtime.errors.BatchError` / ``StepError`` naming the file.
    ``state_dict()`` is the model's state dict with the values the runtime has trained (the
    runtime writes into these very tensors)."""

    def __init__(self, path, compiled, manifest, constants):
        self._read_manifest(path, manifest)
        self._compiled = compiled
        self._run = getattr(compiled, "loader", None)
        self._run = self._run.run if self._run is not None else (lambda xs: compiled(*xs))
        self._constants = constants           # the runtime's constants (user-managed: ours)
        self.backend = "aoti"
        self._by_role = {role: {} for role in _ROLES}
        self.state = {}
        for row in manifest["tensors"]:
            t = constants[row["constant"]]
            if row["role"] == "state":
                self.state[(row["name"], row["state"])] = t
            else:
                self._by_role[row["role"]][row["name"]] = t

    def _execute(self, inputs):
        return self._run(inputs)

    def state_dict(self) -> dict:
        """The model's full state dict (the keys ``model.state_dict()`` had at export), with the
        values the runtime has trained; tied names share one tensor."""
        out = {}
        for key, role, name in self.manifest["state_dict"]:
            out[key] = self._constants[EXTRA_PREFIX + name] if role == "extra" else self._by_role[role][name]
        return out

    def trainable_parameters(self) -> dict:
        """name -> the trained tensor (only the selected rows, copied, for a channel-sparse one)."""
        from .train_step import selected_rows
        return {name: selected_rows(self._by_role["param"][name], sel) for name, sel in self.layout.grads}

    def named_tensors(self, role: str) -> dict:
        """name -> tensor for ``role`` in param (trained), frozen, buffer."""
        return dict(self._by_role[role])

    def __repr__(self):
        return (f"AotiStep({os.path.basename(self.source)}, trains {len(self.layout.grads)} tensors, "
                f"{type(self.optimizer).__name__}, step {self.step_count})")


# -- the C++ runner -------------------------------------------------------------------------
def write_batches(path, batches) -> str:
    """Write ``batches`` (a list of batches, each a tuple as the step takes it) for the C++ runner:
    ``torch.save`` of a list of lists of the batches' tensor leaves (``torch::pickle_load`` reads
    it). Atomic, like every file pockc writes."""
    flat = [[t.detach().contiguous().cpu() for t in batch_tensors(tuple(b))] for b in batches]
    buf = io.BytesIO()
    torch.save(flat, buf)
    return atomic_write(path, buf.getvalue())


def read_runner_output(path) -> dict:
    """What the C++ runner wrote: ``{"tensors": {key: tensor}, "losses": [float, ...],
    "step_count": int}``; keys are a trained parameter's name, ``buffer/<name>`` and
    ``optimizer/<param>/<state>``."""
    path = os.fspath(path)
    # torch::pickle_save tags a typed dict with torch.jit._pickle.restore_type_tag (harmless: it
    # only records the element types); weights_only loading must be told it is allowed.
    try:
        from torch.jit._pickle import restore_type_tag as tag
    except ImportError:
        tag = None
    try:
        if tag is not None and hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals([tag]):
                d = torch.load(path, map_location="cpu", weights_only=True)
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file (the runner wrote nothing)") from None
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: not a runner output ({_first_line(e)})") from None
    tensors = {k[len("tensor/"):]: v for k, v in d.items() if k.startswith("tensor/")}
    return {"tensors": tensors, "losses": d["losses"].tolist(), "step_count": int(d["step_count"])}


def find_compiler():
    """The C++ compiler to build the runner with: $CXX, else c++, g++ or clang++ on PATH (None)."""
    for c in filter(None, [os.environ.get("CXX"), "c++", "g++", "clang++"]):
        exe = shutil.which(c.split()[0]) if c else None
        if exe:
            return exe
    return None


def runner_command(out_path, compiler=None, source=None) -> list:
    """The compiler command line that builds the runner against the installed torch."""
    tdir = os.path.dirname(os.path.abspath(torch.__file__))
    inc, lib = os.path.join(tdir, "include"), os.path.join(tdir, "lib")
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    cmd = [compiler or find_compiler() or "c++", "-std=c++17", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           source or os.path.join(CPP_DIR, f"{RUNNER_NAME}.cpp"), "-o", os.fspath(out_path),
           f"-I{inc}", f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}",
           f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10"]
    if sys.platform == "darwin":
        cmd.remove(f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
    return cmd


def build_runner(out_dir, *, compiler=None, force: bool = False) -> str:
    """Build the C++ runner (runtime/cpp/pockc_aoti_runner.cpp) into ``out_dir`` against the
    libtorch inside the installed torch wheel; returns the binary's path. A binary built from the
    same source with the same torch and command is reused unless ``force``. Raises
    :class:`RunnerBuildError` (one line) when no C++ compiler is found or the build fails."""
    out_dir = os.fspath(out_dir)
    source = os.path.join(CPP_DIR, f"{RUNNER_NAME}.cpp")
    if not os.path.isfile(source):
        raise RunnerBuildError(f"{source}: the runner's source is missing from this installation")
    exe = compiler or find_compiler()
    if exe is None:
        raise RunnerBuildError("no C++ compiler found (set CXX, or install g++ or clang++) to build "
                               f"{RUNNER_NAME}")
    os.makedirs(out_dir, exist_ok=True)
    binary = os.path.join(out_dir, RUNNER_NAME)
    cmd = runner_command(binary, exe, source)
    import hashlib
    with open(source, "rb") as f:
        stamp = hashlib.sha256(f.read() + json.dumps([cmd, torch.__version__]).encode()).hexdigest()
    stamp_file = binary + ".stamp"
    if not force and os.path.isfile(binary):
        try:
            with open(stamp_file) as f:
                if f.read().strip() == stamp:
                    return binary
        except OSError:
            pass
    tmp = f"{binary}.{os.getpid()}.tmp"
    cmd[cmd.index(binary)] = tmp
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RunnerBuildError(f"cannot run the C++ compiler {exe} ({e.strerror or e})") from None
    if r.returncode != 0:
        err = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[-300:])
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise RunnerBuildError(f"building {RUNNER_NAME} failed ({exe} exit {r.returncode}): {err.strip()}")
    os.replace(tmp, binary)
    atomic_write(stamp_file, stamp + "\n")
    return binary


def main(argv=None):
    """``python -m pockc.runtime.aoti build-runner [DIR]``: build the C++ runner, print its path."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m pockc.runtime.aoti", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-runner", help="build runtime/cpp/pockc_aoti_runner.cpp against this torch")
    b.add_argument("out_dir", nargs="?", default="build")
    b.add_argument("--force", action="store_true")
    c = sub.add_parser("command", help="print the compiler command that builds the runner")
    c.add_argument("out", nargs="?", default=RUNNER_NAME)
    a = ap.parse_args(argv)
    if a.cmd == "command":
        print(" ".join(runner_command(a.out)))
        return 0
    try:
        print(build_runner(a.out_dir, force=a.force))
    except RunnerBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
