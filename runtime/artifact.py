"""Saved training steps: ``step.save(path)`` and ``pockc.load(path)``.

A saved step is a directory that trains with torch and ``pockc.runtime`` alone (no tracing, no
passes, not even the model's Python class):

``manifest.json``
    what was saved and with what: the pockc and torch versions, the batch signature, the
    optimizer and its step count, the order of the step's inputs, the module tree (each module's
    train/eval mode, each tensor's shape, dtype, strides and aliases), and per data file its
    name, size and sha256 (``content_hash`` covers them all). It is written last: it is the
    commit point of a save.
``program-<hash>.json``
    the step's FX program over aten ops, node by node (runtime/program.py); ``program.py`` beside
    it is the same program as Python source, for reading.
``weights-<hash>.safetensors``
    the frozen parameters (read-only during training).
``state-<hash>.safetensors``
    what training writes: trained parameters, buffers (batch-norm statistics), optimizer state
    (``optimizer/<param>/<state>``; with gradient accumulation also ``optimizer/<param>/grad_accum``,
    the gradients accumulated so far in the cycle) and the program's tensor constants. A step with
    ``accumulate=K`` keeps its update program in the program file (``"apply"``) and its place in
    the cycle in the manifest (``step.accumulate``: K, calls since the last update, their items),
    so a step saved mid-cycle resumes exactly; a custom ``num_items`` function is not saved (set
    ``step.num_items`` again after loading: the first call says so).
``plan-<hash>.json``
    the update plan and the memory plan (with their tables), as reported at compile time.

Data files are named by their content, so saving again into the same directory (a checkpoint
every K steps) writes the new files beside the old ones, then the manifest (atomically: a
temporary file, fsync, rename), then removes the files no manifest names any more. A process
killed at any moment leaves the previous checkpoint loadable. Frozen weights that did not change
are not rewritten.

Loading checks the manifest's versions (another pockc or torch version is an error unless
``strict_versions=False``), every file's size and (``verify=True``) hash, and raises
:class:`~pockc.runtime.errors.ArtifactError` naming the file for anything missing, truncated or
altered. The loaded step is a :class:`~pockc.runtime.train_step.TrainStep` over a stand-in module
tree holding the saved tensors (``step.model``), or over the user's own model (``model=``), into
which the saved values are loaded. It cannot recompile: a batch of another signature is a
:class:`~pockc.runtime.errors.BatchError` naming the artifact.

This module imports torch, safetensors and pockc.runtime only.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re

import torch

from .errors import ArtifactError
from .fileio import atomic_write, fsync_dir, remove_stale_temps
from .layout import Layout
from .optim import Optimizer
from .program import ProgramError, graph_from_json, graph_to_json

FORMAT = "pockc-step"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DATA = re.compile(r"^(program|weights|state|plan)-[0-9a-f]{16}\.(json|safetensors)$")
_KINDS = ("program", "weights", "state", "plan")


def _version():
    from . import __version__
    return __version__


def _torch_release(v: str) -> str:
    return v.split("+")[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- signatures as JSON ---------------------------------------------------------------------
def signature_to_json(sig) -> list:
    spec, leaves = sig
    out = []
    for path, leaf in leaves:
        if leaf[0] == "tensor":
            out.append([path, ["tensor", list(leaf[1]), str(leaf[2]).replace("torch.", ""), leaf[3]]])
        else:
            out.append([path, list(leaf)])
    return [spec, out]


def signature_from_json(d, device_type=None) -> tuple:
    spec, leaves = d
    out = []
    for path, leaf in leaves:
        if leaf[0] == "tensor":
            out.append((path, ("tensor", tuple(leaf[1]), getattr(torch, leaf[2]), device_type or leaf[3])))
        else:
            out.append((path, tuple(leaf)))
    return (spec, tuple(out))


# -- the module tree ------------------------------------------------------------------------
def _canonical(model) -> dict:
    """every name of a parameter or buffer -> its first name (tied tensors share one)."""
    first, out = {}, {}
    for kind, named in (("p", model.named_parameters(remove_duplicate=False)),
                        ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            out[name] = first.setdefault((kind, id(t)), name)
    return out


def _tensor_info(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "stride": list(t.stride()),
            "device": t.device.type}


def _module_tree(model) -> dict:
    persistent = set(model.state_dict(keep_vars=True))
    tree = {"class": type(model).__qualname__, "modules": {}, "parameters": {}, "buffers": {}}
    for path, m in model.named_modules(remove_duplicate=False):
        tree["modules"][path] = {"training": m.training, "class": type(m).__qualname__}
    canon = _canonical(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        tree["parameters"][name] = {**_tensor_info(p), "requires_grad": p.requires_grad, "alias_of": canon[name]}
    for name, b in model.named_buffers(remove_duplicate=False):
        tree["buffers"][name] = {**_tensor_info(b), "persistent": name in persistent, "alias_of": canon[name]}
    return tree


class SavedModule(torch.nn.Module):
    """A module tree rebuilt from a saved step: the original's submodule names, train/eval modes,
    parameters and buffers (tied ones shared), without its Python class or ``forward``."""

    def __init__(self, class_name: str = "Module"):
        super().__init__()
        self._saved_class = class_name

    def extra_repr(self):
        return f"saved {self._saved_class}"

    def forward(self, *args, **kwargs):
        raise TypeError(f"a module loaded from a saved step ({self._saved_class}) has no forward: load its "
                        f"state_dict() into the model's own class to run it")


def _submodule(root, path):
    m = root
    for part in path.split(".") if path else ():
        m = m._modules[part]
    return m


def _build_module_tree(tree) -> SavedModule:
    root = SavedModule(tree["class"])
    for path, info in sorted(tree["modules"].items(), key=lambda kv: kv[0].count(".") if kv[0] else -1):
        if path:
            parent, _, leaf = path.rpartition(".")
            _submodule(root, parent).add_module(leaf, SavedModule(info["class"]))
    for path, info in tree["modules"].items():
        _submodule(root, path).training = bool(info["training"])
    return root


# -- save -----------------------------------------------------------------------------------
def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def _plan_document(step) -> dict:
    plan, memory = step.update_plan, getattr(step, "memory", None)
    budget = getattr(step, "budget", None)
    doc = {"update_plan": plan.to_dict() if plan is not None else None,
           "update_table": plan.table() if plan is not None else "",
           "update_summary": plan.summary() if plan is not None else "",
           "budget_bytes": budget}
    if memory is not None:
        doc["memory"] = memory.to_dict()
        doc["memory_table"] = memory.table(budget)
        doc["memory_summary"] = memory.summary(budget)
        doc["required_bytes"] = getattr(memory, "required_bytes", memory.peak_bytes)
    return doc


def save(step, path, *, extra: dict | None = None) -> str:
    """Write ``step`` (its program, every tensor it reads or writes, its plans) to the directory
    ``path``; returns the manifest's path. ``extra``: JSON-ready data stored in the manifest
    (read back as ``step.saved_extra``)."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ArtifactError(f"{path}: exists and is not a directory")
    if os.path.isdir(path):
        foreign = [n for n in os.listdir(path) if not (n == MANIFEST or n == "program.py" or _DATA.match(n)
                                                       or n.startswith("."))]
        if foreign and not os.path.exists(os.path.join(path, MANIFEST)):
            raise ArtifactError(f"{path}: is a directory with other files ({', '.join(sorted(foreign)[:3])}) and "
                                "not a saved pockc step; save into a new or empty directory")
    os.makedirs(path, exist_ok=True)
    model, layout = step.model, step.layout
    gm, sig = _current_program(step)
    program, constants = graph_to_json(gm)
    apply = gm.meta.get("pockc.apply")
    if apply is not None:     # gradient accumulation: the update program of the K-th call
        program["apply"], apply_constants = graph_to_json(apply)
    else:
        apply_constants = {}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trained = set(layout.params)
    weights = {n: p for n, p in params.items() if n not in trained}
    state = {n: p for n, p in params.items() if n in trained}
    state.update({f"buffer/{n}": b for n, b in buffers.items()})
    for (name, s), t in step.state.items():
        state[f"optimizer/{name}/{s}"] = t
    state.update({f"constant/{n}": t for n, t in constants.items()})
    state.update({f"{APPLY_CONSTANT}{n}": t for n, t in apply_constants.items()})
    device = _device_of(step)
    if draws_random(gm):      # dropout: the generator's state, so that a resumed run draws the same masks
        state["rng/" + device.type] = _rng_get(device)
    blobs = {"program": json.dumps(program, separators=(",", ":")).encode(),
             "state": _safetensors_bytes(state),
             "plan": json.dumps(_plan_document(step), indent=1, default=str).encode()}
    files = {}
    reused = _reusable_weights(step, path, weights)
    if reused is not None:
        files["weights"] = reused
    else:
        blobs["weights"] = _safetensors_bytes(weights)
    for kind, data in blobs.items():
        digest = _sha256(data)
        name = f"{kind}-{digest[:16]}.{'safetensors' if kind in ('weights', 'state') else 'json'}"
        full = os.path.join(path, name)
        if not (os.path.isfile(full) and os.path.getsize(full) == len(data) and _file_sha(full) == digest):
            atomic_write(full, data)
        files[kind] = {"name": name, "bytes": len(data), "sha256": digest}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "pockc": _version(), "torch": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "content_hash": _sha256("".join(files[k]["sha256"] for k in _KINDS).encode()),
        "files": files,
        "step": {"kind": type(step).__name__, "step_count": step.step_count, "backend": step.backend,
                 "optimizer": step.optimizer.to_dict(), "layout": layout.to_json(),
                 "batch_signature": signature_to_json(sig), "batch_args": step._nargs,
                 **_accumulation_json(step)},
        "model": _module_tree(model),
        "extra": extra or {},
    }
    atomic_write(os.path.join(path, "program.py"), _readable(step, gm))
    out = atomic_write(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    keep = {f["name"] for f in files.values()}
    for name in os.listdir(path):
        if _DATA.match(name) and name not in keep:
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass
    remove_stale_temps(path)
    fsync_dir(path)
    step._frozen_saved = (os.path.abspath(path), files["weights"], _frozen_versions(weights))
    return out


APPLY_CONSTANT = "constant_apply/"   # tensor constants of the update program (accumulate=K)


def _accumulation_json(step) -> dict:
    """Gradient accumulation and clipping settings and where the step is in its cycle: its
    accumulated gradients are optimizer state (``optimizer/<param>/grad_accum``), so a step saved
    mid-cycle continues exactly."""
    k = getattr(step, "accumulate", 1)
    d = {"update_count": getattr(step, "update_count", step.step_count),
         "max_grad_norm": getattr(step, "max_grad_norm", None)}
    comm = getattr(step, "comm", None)
    if comm is not None:      # data parallel: the process group and buckets its collectives use
        d["distributed"] = comm.to_json()
    if k > 1:
        d["accumulate"] = {"k": k, "micro_step": step.micro_step, "pending_items": step.pending_items,
                           "num_items": "default" if step.num_items is None else "custom"}
    return d


def draws_random(gm) -> bool:
    """Whether the program draws from the default generator (dropout, random fills)."""
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_function" and ((isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded
                                         in t.tags) or getattr(t, "__module__", "") == "pockc.runtime.rng"):
            return True
    return False


def _device_of(step) -> torch.device:
    for t in step.model.parameters():
        return t.device
    return torch.device("cpu")


def _rng_get(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _rng_set(state, device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
    else:
        torch.set_rng_state(state.cpu())


def restore_rng_state(step) -> bool:
    """Set the default generator of a loaded step's device to the state saved with it (where its
    program draws random numbers); returns whether there was one."""
    state = getattr(step, "saved_rng_state", None)
    if state is None:
        return False
    _rng_set(state, _device_of(step))
    return True


def _current_program(step):
    """(program, batch signature) that the step runs for the model's modules and modes and the
    optimizer's settings as they are now, and the batch it ran last (else the compiled one)."""
    from .train_step import module_key
    sig = step._last[0][0] if step._last is not None else step._signature
    key = (sig, module_key(step.model), step.optimizer.graph_key())
    gm = step._graphs.get(key)
    if gm is None:
        raise ArtifactError("the model's train/eval modes or submodules, or the optimizer's settings, changed since "
                            "the step last ran, and it has no program for them yet: run one step (or restore them) "
                            "before saving")
    return gm, sig


def _frozen_versions(weights: dict) -> tuple:
    return tuple((n, id(t), t._version) for n, t in weights.items())


def _reusable_weights(step, path, weights):
    """The manifest entry of the frozen weights' file this step saved into ``path`` before, when
    no frozen tensor was replaced or written since (same objects, same version counters) and the
    file is still there with its size: a checkpoint every K steps does not rewrite them."""
    last = getattr(step, "_frozen_saved", None)
    if last is None or last[0] != os.path.abspath(path) or last[2] != _frozen_versions(weights):
        return None
    entry = last[1]
    full = os.path.join(path, entry["name"])
    return entry if os.path.isfile(full) and os.path.getsize(full) == entry["bytes"] else None


def _readable(step, gm) -> str:
    lay = step.layout
    head = [f"# pockc {_version()}: the saved step's program (for reading; pockc.load runs program-*.json).",
            f"# Inputs in order: {len(lay.params)} trained params, {len(lay.frozen)} frozen params, "
            f"{len(lay.buffers)} buffers, {len(lay.state)} optimizer state tensors, {len(lay.scalars)} "
            f"optimizer scalars, {lay.batch} batch tensors.", "import torch", ""]
    apply = gm.meta.get("pockc.apply")
    tail = ("\n# The update program, run after the program above on every accumulate-th call "
            "(same inputs):\n" + apply.code.replace("def forward(", "def apply_update(", 1)) if apply is not None else ""
    return "\n".join(head) + gm.code + tail


def _file_sha(full: str) -> str:
    h = hashlib.sha256()
    with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# -- load -----------------------------------------------------------------------------------
def read_manifest(path) -> dict:
    path = os.fspath(path)
    full = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: no such saved step (not a directory)")
    try:
        with open(full, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{full}: missing; {path} is not a saved pockc step") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{full}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtifactError(f"{full}: not a pockc step manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{full}: format version {m.get('format_version')}, this pockc reads {FORMAT_VERSION}")
    return m


def check_versions(m, where, tied="aten programs are tied to a torch release"):
    """ArtifactError naming ``where`` when manifest ``m`` was written by another pockc or torch release."""
    if m.get("pockc") != _version():
        raise ArtifactError(f"{where}: saved by pockc {m.get('pockc')}, this is pockc {_version()}; load it with "
                            f"that version (or pass strict_versions=False to try)")
    if _torch_release(str(m.get("torch"))) != _torch_release(torch.__version__):
        raise ArtifactError(f"{where}: saved with torch {m.get('torch')}, this is torch {torch.__version__}; {tied} "
                            f"(or pass strict_versions=False to try)")


def _read_file(path, entry, verify) -> bytes:
    name = entry.get("name", "")
    if not _DATA.match(name):
        raise ArtifactError(f"{os.path.join(path, MANIFEST)}: names an invalid data file {name!r}")
    full = os.path.join(path, name)
    try:
        with open(full, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ArtifactError(f"{full}: missing (the manifest lists it); the saved step is incomplete") from None
    except OSError as e:
        raise ArtifactError(f"{full}: unreadable ({e.strerror or e})") from None
    if len(data) != entry.get("bytes"):
        how = "truncated" if len(data) < entry.get("bytes", 0) else "longer than saved"
        raise ArtifactError(f"{full}: {how} ({len(data):,} bytes, the manifest says {entry.get('bytes'):,})")
    if verify and _sha256(data) != entry.get("sha256"):
        raise ArtifactError(f"{full}: its content differs from what was saved (sha256 mismatch); the file was "
                            "altered or damaged")
    return data


def _tensors(data: bytes, full: str, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        out = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{full}: not a readable safetensors file ({e})") from None
    return {k: v.to(device) if device is not None else v for k, v in out.items()}


def _restride(t, info, full, name):
    shape, stride = list(info["shape"]), list(info["stride"])
    if list(t.shape) != shape or str(t.dtype).replace("torch.", "") != info["dtype"]:
        raise ArtifactError(f"{full}: tensor {name!r} is {t.dtype} {list(t.shape)}, the manifest says "
                            f"{info['dtype']} {shape}")
    if list(t.stride()) != stride and t.numel() > 1:
        try:
            out = torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device)
            out.copy_(t)
            return out
        except RuntimeError:
            pass
    return t


def load(path, *, model: torch.nn.Module | None = None, device=None, verify: bool = True,
         strict_versions: bool = True, restore_rng: bool = True):
    """A TrainStep that continues training from the step saved in ``path``.

    ``model``: train this module (of the saved model's class) instead of a stand-in tree: the saved
    values are loaded into it and its modules are put in the saved train/eval modes. ``device``:
    load the tensors onto this device (default: the device they were saved from). ``verify``:
    check each file's sha256 (sizes are always checked). ``strict_versions``: refuse a step saved
    by another pockc or torch release. ``restore_rng``: where the program draws random numbers
    (dropout), set the default generator of its device to the state it had when the step was
    saved, so that the resumed run draws what the uninterrupted one would have (as a trainer's
    resume does); the saved state stays available as ``step.saved_rng_state``."""
    from .train_step import TrainStep

    path = os.fspath(path)
    if path.endswith(".pt2") and not os.path.isdir(path):
        from .aoti import load_aoti
        return load_aoti(path)
    if path.endswith(".pte") and not os.path.isdir(path):
        from .executorch import load_executorch
        return load_executorch(path, strict_versions=strict_versions)
    m = read_manifest(path)
    full = os.path.join(path, MANIFEST)
    if strict_versions:
        check_versions(m, full)
    try:
        files, st, tree = m["files"], m["step"], m["model"]
        raw = {k: _read_file(path, files[k], verify) for k in _KINDS}
        layout = Layout.from_json(st["layout"])
        optimizer = Optimizer.from_dict(st["optimizer"])
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{full}: malformed ({type(e).__name__}: {e})") from None
    dev = torch.device(device) if device is not None else None
    weights = _tensors(raw["weights"], os.path.join(path, files["weights"]["name"]), dev)
    state = _tensors(raw["state"], os.path.join(path, files["state"]["name"]), dev)
    state_file = os.path.join(path, files["state"]["name"])
    try:
        program = json.loads(raw["program"].decode("utf-8"))
        constants = {k[len("constant/"):]: v for k, v in state.items() if k.startswith("constant/")}
        gm = graph_from_json(program, constants)
        if "apply" in program:
            gm.meta["pockc.apply"] = graph_from_json(program["apply"], {
                k[len(APPLY_CONSTANT):]: v for k, v in state.items() if k.startswith(APPLY_CONSTANT)})
    except (ValueError, ProgramError) as e:
        raise ArtifactError(f"{os.path.join(path, files['program']['name'])}: {e}") from None
    values = {}
    for name, info in tree["parameters"].items():
        if info["alias_of"] != name:
            continue
        src, key = (state, name) if name in layout.params else (weights, name)
        fname = state_file if src is state else os.path.join(path, files["weights"]["name"])
        if key not in src:
            raise ArtifactError(f"{fname}: lacks parameter {name!r}")
        values[name] = _restride(src[key], info, fname, name)
    for name, info in tree["buffers"].items():
        if info["alias_of"] != name:
            continue
        if f"buffer/{name}" not in state:
            raise ArtifactError(f"{state_file}: lacks buffer {name!r}")
        values[name] = _restride(state[f"buffer/{name}"], info, state_file, name)
    opt_state = {}
    for pname, s in layout.state:
        key = f"optimizer/{pname}/{s}"
        if key not in state:
            raise ArtifactError(f"{state_file}: lacks optimizer state {key!r}")
        opt_state[(pname, s)] = state[key]
    target = _build_module_tree(tree) if model is None else model
    if model is None:
        _fill_tree(target, tree, values)
    else:
        _load_into(model, tree, values, full)
    acc = st.get("accumulate")
    if acc is not None and "apply" not in program:
        raise ArtifactError(f"{full}: a step with accumulate={acc.get('k')} whose program lacks its update program")
    from .train_step import _NOT_SAVED
    step = TrainStep(target, gm, layout, optimizer, update_plan=None, example_batch=(), state=opt_state,
                     accumulate=int(acc["k"]) if acc else 1, max_grad_norm=st.get("max_grad_norm"),
                     num_items=_NOT_SAVED if acc and acc.get("num_items") == "custom" else None)
    sig = signature_from_json(st["batch_signature"], dev.type if dev is not None else None)
    step._restore_signature(sig, int(st["batch_args"]), source=path)
    step.step_count = int(st["step_count"])
    step.update_count = int(st.get("update_count", step.step_count))
    if acc:
        step.micro_step, step.pending_items = int(acc["micro_step"]), int(acc["pending_items"])
    step.backend = st.get("backend", "aten")
    if st.get("distributed") is not None:   # bound to this process's group at its first call
        from .distributed import Comm
        step.comm = Comm.from_json(st["distributed"])
    doc = json.loads(raw["plan"].decode("utf-8"))
    step.update_plan = SavedUpdatePlan(doc)
    step.memory = SavedMemory(doc) if "memory" in doc else None
    step.budget = doc.get("budget_bytes")
    rng = next((k for k in state if k.startswith("rng/")), None)
    step.saved_rng_state = state[rng] if rng is not None else None
    if restore_rng:
        restore_rng_state(step)
    step.saved_extra = m.get("extra") or {}
    step.saved_manifest = m
    step.source = path
    return step


def _fill_tree(root, tree, values):
    shared = {}
    for name, info in tree["parameters"].items():
        canon = info["alias_of"]
        if canon not in shared:
            shared[canon] = torch.nn.Parameter(values[canon], requires_grad=bool(info["requires_grad"]))
        parent, _, leaf = name.rpartition(".")
        _submodule(root, parent).register_parameter(leaf, shared[canon])
    for name, info in tree["buffers"].items():
        parent, _, leaf = name.rpartition(".")
        _submodule(root, parent).register_buffer(leaf, values[info["alias_of"]], persistent=bool(info["persistent"]))


def _load_into(model, tree, values, full):
    """Load the saved tensors into the user's ``model``, which must have the saved structure."""
    mine = _module_tree(model)
    for kind in ("parameters", "buffers"):
        a, b = mine[kind], tree[kind]
        missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        if missing or extra:
            raise ArtifactError(f"{full}: model= does not have the saved model's {kind}: "
                                + "; ".join(x for x in (f"lacks {', '.join(missing[:3])}" if missing else "",
                                                        f"has {', '.join(extra[:3])} in addition" if extra else "") if x))
        for name, info in b.items():
            if a[name]["shape"] != info["shape"] or a[name]["dtype"] != info["dtype"]:
                raise ArtifactError(f"{full}: model= {kind[:-1]} {name!r} is {a[name]['dtype']} {a[name]['shape']}, "
                                    f"saved {info['dtype']} {info['shape']}")
            if a[name]["alias_of"] != info["alias_of"]:
                raise ArtifactError(f"{full}: model= ties {name!r} to {a[name]['alias_of']!r}, the saved model to "
                                    f"{info['alias_of']!r}")
    if set(mine["modules"]) != set(tree["modules"]):
        raise ArtifactError(f"{full}: model= has other submodules than the saved model")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = values[name].to(p.device)
        for name, _ in model.named_buffers():
            parent, _, leaf = name.rpartition(".")
            _submodule(model, parent)._buffers[leaf] = values[name].to(_submodule(model, parent)._buffers[leaf].device)
    for path, info in tree["modules"].items():
        _submodule(model, path).training = bool(info["training"])


class SavedUpdatePlan:
    """The update plan of a loaded step, as reported when it was compiled."""

    def __init__(self, doc):
        self._doc = doc

    def to_dict(self):
        return self._doc.get("update_plan")

    def table(self, fmt="simple") -> str:
        return self._doc.get("update_table", "")

    def summary(self) -> str:
        return self._doc.get("update_summary", "")

    def trainable_names(self):
        rules = (self.to_dict() or {}).get("rules", {})
        return sorted(n for n, r in rules.items() if r != "frozen")

    def __str__(self):
        return self.table()


class SavedMemory:
    """The memory plan of a loaded step (its figures as planned at compile time)."""

    def __init__(self, doc):
        self._doc = doc
        self._plan = doc["memory"]

    peak_bytes = property(lambda self: self._plan["peak_bytes"])
    arena_bytes = property(lambda self: self._plan["arena_bytes"])
    readonly_bytes = property(lambda self: self._plan.get("readonly_bytes", 0))
    paged_bytes = property(lambda self: self._plan.get("paged_bytes", 0))
    breakdown = property(lambda self: dict(self._plan.get("breakdown", {})))
    required_bytes = property(lambda self: self._doc.get("required_bytes", self.peak_bytes))

    def table(self, budget=None) -> str:
        return self._doc.get("memory_table", "")

    def summary(self, budget=None) -> str:
        return self._doc.get("memory_summary", "")

    def to_dict(self) -> dict:
        return dict(self._plan)

    def __repr__(self):
        return f"SavedMemory(peak_bytes={self.peak_bytes:,}, arena_bytes={self.arena_bytes:,})"
