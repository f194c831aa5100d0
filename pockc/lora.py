"""LoRA adapters as graph-level trainable tensors (no PEFT dependency).

``attach_lora(model, config, modules)`` registers two parameters on every targeted ``nn.Linear``
-- ``lora_A`` (r x in_features) and ``lora_B`` (out_features x r), PEFT's shapes and
initialization (A Kaiming-uniform, B zeros, so the adapted model starts equal to the base model)
-- and a forward hook that adds ``lora_B(lora_A(dropout(x))) * scaling`` to the layer's output,
the same arithmetic as PEFT's ``LoraLayer.forward``. The user's module code is untouched: the
adapters are ordinary parameters, so pockc's tracer sees them as trainable graph inputs while the
base weight stays a frozen input whose gradient is never computed.

``merge_lora`` folds ``B @ A * scaling`` into the base weight and removes the adapters (PEFT's
``merge_and_unload``). ``save_adapter`` writes PEFT's files (``adapter_config.json`` with
``peft_type: "LORA"``, ``adapter_model.safetensors`` with PEFT's key names), so
``PeftModel.from_pretrained(base, dir)`` loads it; what PEFT cannot hold (trained rows, a bias
trained alone, a tied weight; ``layers=``) goes to pockc's side files, which PEFT never reads.
``load_adapter`` reads PEFT's LoRA files, written by ``peft`` or by pockc, and pockc's first format.
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pockc.errors import CompileError, PlanError
from pockc.runtime.fileio import atomic_write

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_PT = "adapter_model.pt"


@dataclass
class LoraConfig:
    """PEFT's LoRA hyperparameters, same names and meaning.

    ``target_modules``: a list of module names or name suffixes (``"q_proj"`` matches
    ``layers.3.self_attn.q_proj``), fnmatch globs (``"*.mlp.*_proj"``), a single string taken as
    a regular expression over full module names (as in PEFT), or ``"all-linear"`` (every
    ``nn.Linear`` in scope except the output layer, as PEFT's: the module
    ``model.get_output_embeddings()`` returns, else one named ``lm_head``). An entry that matches no module is an error.

    >>> cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    >>> cfg.scaling
    2.0
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list | str | None = None
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool = True
    bias: str = "none"
    seed: int | None = None          # for the A initialization; None uses torch's global RNG

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise PlanError(f"LoraConfig: r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PlanError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise PlanError(f"LoraConfig: bias={self.bias!r} is not supported; use bias='none' and train "
                            "biases with update={'*.bias': 'full'}")
        if self.target_modules is None or (not isinstance(self.target_modules, str) and not self.target_modules):
            raise PlanError("LoraConfig: target_modules is required, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj'] "
                            "or 'all-linear'")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self):
        return asdict(self)


@dataclass
class _LoraState:
    """Kept on an adapted module as ``module._pockc_lora``."""
    r: int
    scaling: float
    dropout: float


def _lora_hook(module, args, out):
    st = module._pockc_lora
    x = args[0]
    if st.dropout > 0:
        x = F.dropout(x, st.dropout, module.training)
    # in the adapter's dtype, the sum back in the layer's (PEFT's rule: float32 adapters on a bf16 base)
    return (out + F.linear(F.linear(x.to(module.lora_A.dtype), module.lora_A), module.lora_B) * st.scaling).to(out.dtype)


def adapted_modules(model) -> dict:
    """name -> module for every module carrying a pockc LoRA adapter."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "_pockc_lora")}


def adapter_param_names(model) -> list:
    return [f"{n}.{p}" for n in adapted_modules(model) for p in ("lora_A", "lora_B")]


def match_targets(model, target_modules, scope=None) -> list:
    """Module names that ``target_modules`` selects, restricted to ``scope`` (a predicate on
    names). Raises PlanError for an entry that matches nothing, listing available names."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n]
    in_scope = [n for n in linear if scope is None or scope(n)]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            output = _output_layer(model)
            hits = [n for n in in_scope if n != output]
        else:
            rx = re.compile(target_modules)
            hits = [n for n in in_scope if rx.fullmatch(n)]
        if not hits:
            raise PlanError(f"LoRA target_modules {target_modules!r} matches no nn.Linear"
                            f"{' in the fine-tuned layers' if scope else ''}; available: {_available(in_scope or linear)}")
        return hits
    hits = []
    for entry in target_modules:
        if not isinstance(entry, str):
            raise PlanError(f"LoRA target_modules entries must be strings, got {entry!r}")
        found = [n for n in in_scope if n == entry or n.endswith("." + entry) or fnmatch.fnmatchcase(n, entry)]
        if not found:
            other = [n for n in linear if n == entry or n.endswith("." + entry) or fnmatch.fnmatchcase(n, entry)]
            if other:
                raise PlanError(f"LoRA target_modules entry {entry!r} matches only modules outside the fine-tuned "
                                f"layers (e.g. {other[0]}); widen layers= or drop the entry")
            nonlinear = [n for n, m in model.named_modules() if n and (n == entry or n.endswith("." + entry))]
            if nonlinear:
                kind = type(model.get_submodule(nonlinear[0])).__name__
                raise PlanError(f"LoRA target_modules entry {entry!r} matches {nonlinear[0]} ({kind}); pockc adapts "
                                f"nn.Linear layers only")
            close = difflib.get_close_matches(entry, sorted({n.rsplit(".", 1)[-1] for n in linear}), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            raise PlanError(f"LoRA target_modules entry {entry!r} matches no module; {hint}"
                            f"available: {_available(in_scope or linear)}")
        hits += [n for n in found if n not in hits]
    return [n for n in linear if n in hits]


def _output_layer(model):
    """Name of the model's output layer, which PEFT's ``"all-linear"`` leaves out: the module
    ``get_output_embeddings()`` returns (Hugging Face models), else a module named ``lm_head``."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None:
        return next((n for n, m in model.named_modules() if m is out), None)
    return next((n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "lm_head"), None)


def _available(names) -> str:
    """Distinct leaf names of linear layers, e.g. 'q_proj, k_proj, ..., lm_head'."""
    leaves = []
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    return ", ".join(leaves[:20]) + (", ..." if len(leaves) > 20 else "")


def attach_lora(model, config: LoraConfig, modules) -> list:
    """Add adapters to ``modules`` (names of nn.Linear in ``model``); returns the new parameter
    names. Idempotence is refused: a module already adapted is an error."""
    new = []
    gen = None
    if config.seed is not None:
        gen = torch.Generator().manual_seed(config.seed)
    for name in modules:
        mod = model.get_submodule(name)
        if hasattr(mod, "_pockc_lora"):
            raise CompileError(f"module {name!r} already has a LoRA adapter; merge it (pockc.merge_lora) or "
                               "use a fresh model")
        w = mod.weight
        a = torch.empty(config.r, mod.in_features, dtype=w.dtype)
        if config.init_lora_weights:
            # PEFT: nn.init.kaiming_uniform_(lora_A, a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(mod.in_features)
            a.copy_(torch.rand(a.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound)
            b = torch.zeros(mod.out_features, config.r, dtype=w.dtype)
        else:
            bound = 1.0 / math.sqrt(mod.in_features)
            a.copy_(torch.rand(a.shape, generator=gen, dtype=torch.float32) * 2 * bound - bound)
            b = torch.rand(mod.out_features, config.r, generator=gen, dtype=torch.float32).to(w.dtype) * 0.02
        mod.register_parameter("lora_A", torch.nn.Parameter(a.to(w.device)))
        mod.register_parameter("lora_B", torch.nn.Parameter(b.to(w.device)))
        mod._pockc_lora = _LoraState(config.r, config.scaling, config.lora_dropout)
        mod.register_forward_hook(_lora_hook)
        new += [f"{name}.lora_A", f"{name}.lora_B"]
    return new


def _detach(mod):
    # Found by function, not by a stored handle: a handle copied by copy.deepcopy(model) would
    # still point at the original module's hook dict.
    for key, fn in list(mod._forward_hooks.items()):
        if fn is _lora_hook:
            del mod._forward_hooks[key]
    del mod._pockc_lora
    del mod.lora_A
    del mod.lora_B


def remove_lora(model, modules=None) -> None:
    """Remove every adapter (or those on ``modules``, names) without merging (the base model as it was)."""
    for name, mod in adapted_modules(model).items():
        if modules is None or name in modules:
            _detach(mod)


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its base weight (W += B @ A * scaling, computed in fp32) and remove
    the adapters; returns ``model``. PEFT's ``merge_and_unload``."""
    for mod in adapted_modules(model).values():
        st = mod._pockc_lora
        delta = (mod.lora_B.float() @ mod.lora_A.float()) * st.scaling
        mod.weight.copy_((mod.weight.float() + delta).to(mod.weight.dtype))
        _detach(mod)
    return model


# ---------------------------------------------------------------------------------------
# Saving and loading: PEFT's files, plus a pockc side file for what PEFT cannot hold
# ---------------------------------------------------------------------------------------
#
# A directory written by save_adapter:
#   adapter_config.json          PEFT's LoraConfig (peft_type "LORA", r, lora_alpha, target_modules, ...)
#   adapter_model.safetensors    PEFT's keys: base_model.model.<module>.lora_A.weight / .lora_B.weight, and the
#                                whole modules of modules_to_save as base_model.model.<module>.<param>
#   pockc_adapter.json           pockc's extras (format, layers=, trained names, capture, the LoraConfig as given),
#                                tied to that weights file by its sha256; PEFT never reads it
#   pockc_trained.safetensors    only when some trained tensor has no PEFT form (trained rows, a bias alone, a
#                                tied weight): pockc's names, rows as "name@rows:a:b" or "name@rows:i,j,..."
# Without safetensors the weights go to adapter_model.bin (PEFT's torch.save name) and pockc_trained.pt.

PEFT_PREFIX = "base_model.model."
POCKC_META = "pockc_adapter.json"
POCKC_TENSORS = "pockc_trained.safetensors"
POCKC_TENSORS_PT = "pockc_trained.pt"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
FORMAT = "pockc-adapter/2"
_ALL_FILES = (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, ADAPTER_WEIGHTS_PT, POCKC_TENSORS, POCKC_TENSORS_PT)

# PEFT LoraConfig options that change the arithmetic or the base weights: a PEFT adapter using any
# of them is refused rather than loaded into something that computes differently.
_PEFT_UNSUPPORTED = {
    "use_dora": "DoRA", "lora_bias": "a bias on lora_B", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "layer_replication": "layer_replication", "target_parameters": "target_parameters",
    "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "aLoRA", "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA", "megatron_config": "Megatron layers",
}


@dataclass
class Adapter:
    """An adapter read from a directory (PEFT's files or pockc's), in pockc's parameter names."""
    source: str        # "peft" (adapter_config.json written by peft or by pockc) or "pockc-adapter/1"
    modules: dict      # adapted module -> (r, scaling, dropout), in file order
    tensors: dict      # "mod.lora_A" / "mod.lora_B" / a parameter name / "name@rows:..." -> tensor
    lora: LoraConfig | None
    layers: object = None          # finetune's layers= as saved by pockc; None if not recorded
    peft_layers: list | None = None  # PEFT's layers_to_transform (indices in the block container)


def _have_safetensors():
    try:
        import safetensors.torch  # noqa: F401
        return True
    except ImportError:
        return False


def _tensor_bytes(tensors: dict, safetensors: bool) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if safetensors:
        from safetensors.torch import save
        return save(tensors, metadata={"format": "pt"})      # PEFT writes the same metadata
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _tensors_from(path, data: bytes) -> dict:
    try:
        if path.endswith(".safetensors"):
            if not _have_safetensors():
                raise CompileError(f"{path} needs the safetensors package: pip install safetensors")
            from safetensors.torch import load
            return load(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CompileError:
        raise
    except Exception as e:  # noqa: BLE001 -- a damaged file is the user's to fix, in one line
        raise CompileError(f"cannot read adapter tensors from {path}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'damaged file'}") from None


def _read(directory, names):
    """(path, bytes) of the first of ``names`` present in ``directory``, else (None, None)."""
    for n in names:
        path = os.path.join(directory, n)
        if os.path.exists(path):
            with open(path, "rb") as f:
                return path, f.read()
    return None, None


def split_key(key: str):
    """``"w@rows:2:5"`` -> ("w", ("slice", 2, 5)); ``"w@rows:1,4"`` -> ("w", ("index", (1, 4))); a
    plain name -> (name, None)."""
    name, _, rows = key.partition("@rows:")
    if not rows:
        return name, None
    try:
        if ":" in rows:
            a, b = map(int, rows.split(":"))
            return name, ("slice", a, b)
        return name, ("index", tuple(int(i) for i in rows.split(",")))
    except ValueError:
        raise CompileError(f"adapter tensor {key!r}: rows must look like '@rows:a:b' or '@rows:i,j'") from None


# ---------------------------------------------------------------- PEFT's module matching
def _peft_lora_targets(names, target_modules, layers_to_transform=None, layers_pattern=None, modules_to_save=()):
    """The module names PEFT's LoRA would adapt (peft.tuners.tuners_utils.check_target_module_exists,
    list and string forms), for checking that what pockc writes selects exactly its adapters."""
    hits = []
    for key in names:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
            continue
        if isinstance(target_modules, str):
            found = re.fullmatch(target_modules, key) is not None
        elif key in target_modules:
            found = True
        else:
            found = any(key.endswith(f".{t}") for t in target_modules)
            if found and layers_to_transform is not None:
                rx = (rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\." if layers_pattern
                      else r".*?\.[^.]*\.(?P<idx>\d+)\.")
                m = re.match(rx, key)
                found = m is not None and int(m.group("idx")) in layers_to_transform
        if found:
            hits.append(key)
    return hits


def _layer_index(model, names):
    """(block container's last name component, {module: index in the container}) when every one
    of ``names`` lies in a numbered block, else (None, None)."""
    from pockc.plan import find_block_container
    container = find_block_container(model)
    if container is None:
        return None, None
    prefix = container + "." if container else ""
    idx = {}
    for n in names:
        m = re.match(re.escape(prefix) + r"(\d+)\.", n)
        if m is None:
            return None, None
        idx[n] = int(m.group(1))
    return container.rsplit(".", 1)[-1] or None, idx


def _choose_targets(model, adapted: list, modules_to_save: list):
    """PEFT's (target_modules, layers_to_transform, layers_pattern) selecting exactly ``adapted``:
    leaf names (PEFT's usual form), then leaf names + layers_to_transform, then full module names,
    then a regular expression of them; the first that PEFT's matching maps onto ``adapted``."""
    names = [n for n, _ in model.named_modules() if n]
    want = sorted(adapted)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    tries = [(leaves, None, None)]
    pattern, idx = _layer_index(model, adapted)
    if idx is not None:
        layers = sorted(set(idx.values()))
        tries += [(leaves, layers, None), (leaves, layers, pattern)]
    tries.append((want, None, None))
    for t, layers, pat in tries:
        if sorted(_peft_lora_targets(names, t, layers, pat, modules_to_save)) == want:
            return t, layers, pat
    return "(" + "|".join(re.escape(n) for n in want) + ")", None, None


def _choose_modules_to_save(model, full: list, adapted: dict) -> list:
    """Modules whose whole state (every parameter and persistent buffer) is trained in full, with
    no adapter inside, untied, and whose full name PEFT's suffix match (``key.endswith(name)``)
    selects alone: those PEFT can hold as ``modules_to_save``. The rest stays pockc-side."""
    from pockc.plan import canonical_names
    canonical = canonical_names(model)
    tied = {c for n, c in canonical.items() if n != c}
    names = [n for n, _ in model.named_modules() if n]
    by_module = {}
    for n in full:
        mod, _, leaf = n.rpartition(".")
        by_module.setdefault(mod, set()).add(leaf)
    out = []
    for mod, leaves in by_module.items():
        if not mod or mod in adapted or any(a.startswith(mod + ".") for a in adapted):
            continue
        if set(model.get_submodule(mod).state_dict()) != leaves or any(f"{mod}.{p}" in tied for p in leaves):
            continue
        if [k for k in names if k.endswith(mod)] != [mod]:
            continue
        if any(re.match(rf"(^|.*\.){mod}($|\..*)", a) for a in adapted):
            continue
        out.append(mod)
    return out


def _nice(x: float):
    """An alpha computed back from a scaling: an int when it is one (PEFT writes ints)."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def _task_type(model):
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith("ForCausalLM") or name.endswith("LMHeadModel") else None


def peft_config(model, config: LoraConfig | None, modules_to_save=()) -> dict:
    """The ``adapter_config.json`` PEFT writes for the adapters on ``model`` (its LoraConfig keys;
    the keys pockc has no use for are left to PEFT's defaults)."""
    mods = adapted_modules(model)
    rslora = bool(config.use_rslora) if config is not None else False

    def alpha_of(st):
        if config is not None and config.r == st.r and config.scaling == st.scaling:
            return config.lora_alpha
        return _nice(st.scaling * (math.sqrt(st.r) if rslora else st.r))
    pairs = [(st.r, alpha_of(st)) for st in (m._pockc_lora for m in mods.values())]
    if config is not None and ((config.r, config.lora_alpha) in pairs or not pairs):
        r, alpha = config.r, config.lora_alpha
    elif not pairs:
        r, alpha = 8, 8
    else:
        r, alpha = max(set(pairs), key=pairs.count)
    targets, layers, pattern = _choose_targets(model, list(mods), list(modules_to_save)) if mods else ([], None, None)
    hf = getattr(model, "config", None)
    task = _task_type(model)
    dropout = config.lora_dropout if config is not None else next((m._pockc_lora.dropout for m in mods.values()), 0.0)
    return {
        "peft_type": "LORA",
        "task_type": task,
        "auto_mapping": None if task else {"base_model_class": type(model).__name__,
                                           "parent_library": type(model).__module__},
        "base_model_name_or_path": getattr(hf, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": pattern,
        "rank_pattern": {n: st.r for n, st in ((n, m._pockc_lora) for n, m in mods.items()) if st.r != r},
        "alpha_pattern": {n: a for n, (rr, a) in zip(mods, pairs) if a != alpha},
        "modules_to_save": list(modules_to_save) or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": False,
        "init_lora_weights": bool(config.init_lora_weights) if config is not None else True,
    }


def save_adapter(model, directory, trained: dict, config: LoraConfig | None, extra: dict | None = None) -> str:
    """Write ``trained`` (pockc name -> tensor; row selections as ``name@rows:a:b``) in PEFT's
    layout, as ``peft``'s ``save_pretrained`` does, plus pockc's side files; returns the weights
    file's path. Every file is written atomically; the PEFT config last."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    mods = adapted_modules(model)
    lora_names = set(adapter_param_names(model))
    split = {key: split_key(key) for key in trained}
    full = [name for name, sel in split.values() if sel is None and name not in lora_names]
    keep = _choose_modules_to_save(model, full, mods)
    peft_tensors, side = {}, {}
    for key, t in trained.items():
        name, sel = split[key]
        if name in lora_names or (sel is None and name.rpartition(".")[0] in keep):
            peft_tensors[PEFT_PREFIX + (name + ".weight" if name in lora_names else name)] = t
        else:
            side[key] = t
    st = _have_safetensors()
    weights = os.path.join(directory, ADAPTER_WEIGHTS if st else ADAPTER_WEIGHTS_BIN)
    data = _tensor_bytes(peft_tensors, st)
    atomic_write(weights, data)
    written = [weights]
    if side:
        written.append(os.path.join(directory, POCKC_TENSORS if st else POCKC_TENSORS_PT))
        atomic_write(written[-1], _tensor_bytes(side, st))
    meta = {
        "format": FORMAT,
        "weights": os.path.basename(weights),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "pockc_tensors": os.path.basename(written[-1]) if side else None,
        "lora": config.to_dict() if config is not None else None,
        "adapted_modules": {n: {"r": m._pockc_lora.r, "scaling": m._pockc_lora.scaling,
                                "dropout": m._pockc_lora.dropout} for n, m in mods.items()},
        **(extra or {}),
    }
    atomic_write(os.path.join(directory, POCKC_META), json.dumps(meta, indent=1) + "\n")
    for stale in _ALL_FILES:   # a previous save's files would be read as part of this adapter
        path = os.path.join(directory, stale)
        if path not in written and os.path.exists(path):
            os.remove(path)
    cfg = peft_config(model, config, keep)
    atomic_write(os.path.join(directory, ADAPTER_CONFIG), json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return weights


# ---------------------------------------------------------------- reading
def read_adapter(directory) -> Adapter:
    """Read an adapter directory: PEFT's files (written by ``peft`` or by pockc) or pockc's first
    format (``"format": "pockc-adapter/1"``). Every problem is a one-line CompileError."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CompileError(f"no adapter directory {directory!r}")
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(cfg_path):
        raise CompileError(f"no {ADAPTER_CONFIG} in {directory!r}: not an adapter directory (write one with "
                           "step.save_adapter(directory) or peft's save_pretrained)")
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CompileError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(meta, dict):
        raise CompileError(f"{cfg_path} is not a JSON object")
    fmt = meta.get("format")
    if fmt == "pockc-adapter/1":
        return _read_v1(directory, meta)
    if fmt is not None:
        raise CompileError(f"{cfg_path}: unknown adapter format {fmt!r}; this pockc reads PEFT's format and "
                           "'pockc-adapter/1'")
    if "peft_type" not in meta:
        raise CompileError(f"{cfg_path} has no 'peft_type': not a PEFT adapter config")
    return _read_peft(directory, meta)


def _read_v1(directory, meta) -> Adapter:
    path, data = _read(directory, (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PT))
    if path is None:
        raise CompileError(f"no adapter weights in {directory!r}: expected {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_PT}")
    tensors = _tensors_from(path, data)
    modules = {}
    for name, info in (meta.get("adapted_modules") or {}).items():
        try:
            modules[name] = (int(info["r"]), float(info["scaling"]), float(info.get("dropout", 0.0)))
        except (KeyError, TypeError, ValueError):
            raise CompileError(f"{os.path.join(directory, ADAPTER_CONFIG)}: adapted module {name!r} needs r and "
                               "scaling") from None
    lora = None
    if meta.get("lora"):
        try:
            lora = LoraConfig(**meta["lora"])
        except TypeError as e:
            raise CompileError(f"{os.path.join(directory, ADAPTER_CONFIG)}: bad 'lora' entry ({e})") from None
    return Adapter("pockc-adapter/1", modules, tensors, lora, meta.get("layers"))


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft(directory, cfg) -> Adapter:
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise CompileError(f"{directory!r} holds a PEFT {kind} adapter; pockc loads LoRA adapters (peft_type "
                           "'LORA') only")
    for key, what in _PEFT_UNSUPPORTED.items():
        if cfg.get(key):
            raise CompileError(f"{cfg_path}: {key}={cfg[key]!r} ({what}) is not supported by pockc's LoRA")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() != "gaussian":
        raise CompileError(f"{cfg_path}: init_lora_weights={init!r} rewrites the base weights at init; pockc cannot "
                           "load it onto the unmodified base model (convert it with peft first)")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise CompileError(f"{cfg_path}: bias={cfg['bias']!r} is not a PEFT LoRA bias setting")
    try:
        r0, alpha0 = int(cfg.get("r", 8)), cfg.get("lora_alpha", 8)
        dropout = float(cfg.get("lora_dropout") or 0.0)
        rslora = bool(cfg.get("use_rslora", False))
    except (TypeError, ValueError) as e:
        raise CompileError(f"{cfg_path}: bad r / lora_alpha / lora_dropout ({e})") from None
    path, data = _read(directory, (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN))
    if path is None:
        raise CompileError(f"no adapter weights in {directory!r}: expected {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN}")
    raw = _tensors_from(path, data)
    ab, tensors = {}, {}
    for key, t in raw.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", k)
        if m:
            ab.setdefault(m.group(1), {})[m.group(2)] = t
        elif re.search(r"(^|\.)lora_|(^|\.)(lora_magnitude_vector|lora_embedding_[AB])(\.|$)", k):
            raise CompileError(f"adapter tensor {key!r} in {path} is not a LoRA pair on an nn.Linear (lora_A / "
                               "lora_B); pockc adapts nn.Linear layers only")
        else:
            tensors[k] = t                # modules_to_save and trained biases: plain parameters
    modules = {}
    for mod, pair in sorted(ab.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise CompileError(f"adapter module {mod!r} in {path} has {', '.join(pair)} without its partner")
        a, b = pair["lora_A"], pair["lora_B"]
        r = int(_pattern_value(cfg.get("rank_pattern"), mod, r0))
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CompileError(f"adapter module {mod!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                               "a LoRA pair")
        if a.shape[0] != r:
            raise CompileError(f"adapter module {mod!r}: rank mismatch: {ADAPTER_CONFIG} says r={r}, the saved "
                               f"lora_A has rank {a.shape[0]}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), mod, alpha0))
        modules[mod] = (r, alpha / (math.sqrt(r) if rslora else r), dropout)
        tensors[f"{mod}.lora_A"], tensors[f"{mod}.lora_B"] = a, b
    layers = cfg.get("layers_to_transform")
    peft_layers = [layers] if isinstance(layers, int) else (list(layers) if layers else None)
    targets = cfg.get("target_modules")
    lora = None
    if modules:
        lora = LoraConfig(r=r0, lora_alpha=alpha0, lora_dropout=dropout, use_rslora=rslora,
                          target_modules=targets if targets else sorted(modules),
                          init_lora_weights=init is not False)
    ad = Adapter("peft", modules, tensors, lora, None, peft_layers)
    _read_pockc_side(directory, data, ad)
    return ad


def _read_pockc_side(directory, weights: bytes, ad: Adapter) -> None:
    """pockc's side files, when they belong to this weights file (its sha256): the row updates and
    other tensors PEFT cannot hold, layers=, and the LoraConfig as the user gave it."""
    path = os.path.join(directory, POCKC_META)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CompileError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("weights_sha256") != hashlib.sha256(weights).hexdigest():
        warnings.warn(f"pockc: ignoring {path}: it belongs to another {ADAPTER_WEIGHTS} (the adapter was re-saved "
                      "by another tool); its trained rows and layers= are not loaded", stacklevel=4)
        return
    if meta.get("pockc_tensors"):
        side, data = _read(directory, (meta["pockc_tensors"],))
        if side is None:
            raise CompileError(f"{path} names {meta['pockc_tensors']}, which is missing from {directory!r}")
        ad.tensors.update(_tensors_from(side, data))
    if meta.get("lora") and ad.lora is not None:
        try:
            ad.lora = LoraConfig(**meta["lora"])
        except TypeError as e:
            raise CompileError(f"{path}: bad 'lora' entry ({e})") from None
    ad.layers = meta.get("layers")
    ad.source = FORMAT


# ---------------------------------------------------------------- applying
@torch.no_grad()
def apply_adapter(model, ad: Adapter) -> list:
    """Attach the adapter's LoRA modules to ``model`` (kept where already attached with the same
    rank) and copy every saved tensor in; returns the new adapter parameter names. Everything is
    checked before the model is touched."""
    mods = dict(model.named_modules())
    missing = [n for n in ad.modules if not isinstance(mods.get(n), torch.nn.Linear)]
    if missing:
        name, mod = missing[0], mods.get(missing[0])
        what = f"has {name!r} as {type(mod).__name__}" if mod is not None else f"has no module {name!r}"
        count = f"{len(missing)} of the adapter's {len(ad.modules)} modules are not nn.Linear in this model: " \
            if len(missing) > 1 else ""
        close = difflib.get_close_matches(name, [n for n, m in mods.items() if isinstance(m, torch.nn.Linear)], n=1)
        raise CompileError(f"{count}the adapter targets {name!r}, but this model {what}"
                           f"{'; closest nn.Linear: ' + close[0] if close else ''}; load it into the model it was "
                           "trained on")
    for name, (r, _, _) in ad.modules.items():
        mod = mods[name]
        if hasattr(mod, "_pockc_lora") and mod._pockc_lora.r != r:
            raise CompileError(f"module {name!r} has a rank-{mod._pockc_lora.r} adapter, the saved one has rank {r}")
    lora_names = {f"{n}.{p}" for n in ad.modules for p in ("lora_A", "lora_B")}
    params = dict(model.named_parameters())
    params.update((n, b) for n, b in model.named_buffers() if n not in params)
    plan = []
    for key, value in ad.tensors.items():
        name, sel = split_key(key)
        if name in lora_names:
            mod, _, which = name.rpartition(".")
            lin = mods[mod]
            r = ad.modules[mod][0]
            shape = (r, lin.in_features) if which == "lora_A" else (lin.out_features, r)
        else:
            p = params.get(name)
            if p is None:
                close = difflib.get_close_matches(name, list(params), n=1)
                raise CompileError(f"adapter tensor {name!r} has no parameter in this model"
                                   f"{'; closest: ' + close[0] if close else ''}")
            rows = p.shape[0] if p.dim() else 0
            ok = sel is None or (0 <= sel[1] < sel[2] <= rows if sel[0] == "slice"
                                 else bool(sel[1]) and all(0 <= i < rows for i in sel[1]))
            if not ok:
                raise CompileError(f"adapter tensor {key!r}: rows out of range for {name!r} ({rows} rows)")
            shape = tuple(p.shape) if sel is None else \
                (sel[2] - sel[1] if sel[0] == "slice" else len(sel[1]), *p.shape[1:])
        if tuple(value.shape) != tuple(shape):
            raise CompileError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, the model's is {tuple(shape)}")
        plan.append((name, sel, value))
    new = []
    for name, (r, scaling, dropout) in ad.modules.items():
        mod = mods[name]
        if not hasattr(mod, "_pockc_lora"):
            # seeded: the A initialization is overwritten below, so loading leaves torch's RNG alone
            attach_lora(model, LoraConfig(r=r, lora_alpha=scaling * r, target_modules=[name], lora_dropout=dropout,
                                          seed=0), [name])
            new += [f"{name}.lora_A", f"{name}.lora_B"]
        mod._pockc_lora.scaling = scaling
        mod._pockc_lora.dropout = dropout
    params = dict(model.named_parameters())
    params.update((n, b) for n, b in model.named_buffers() if n not in params)
    for name, sel, value in plan:
        p = params[name]
        value = value.to(device=p.device, dtype=p.dtype)
        if sel is None:
            p.copy_(value)
        elif sel[0] == "slice":
            p[sel[1]:sel[2]].copy_(value)
        else:
            p.index_copy_(0, torch.tensor(sel[1], device=p.device), value)
    new = set(new)
    return [n for n in adapter_param_names(model) if n in new]


def load_adapter(model, directory):
    """Load an adapter into ``model`` (a fresh copy of its base model) and return ``model``: one
    saved by ``step.save_adapter(directory)``, by ``peft``'s ``save_pretrained`` (LoRA), or by an
    older pockc (``"format": "pockc-adapter/1"``). The LoRA layers it names are attached, then
    every saved tensor (adapters, modules_to_save, pockc's trained rows) is copied in.

    >>> model = pockc.load_adapter(base_model, "out/")   # doctest: +SKIP
    """
    apply_adapter(model, read_adapter(directory))
    return model
