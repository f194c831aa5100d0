"""LoRA adapters as graph-level trainable tensors (no PEFT dependency).

``attach_lora(model, config, modules)`` registers two parameters on every targeted ``nn.Linear``
-- ``lora_A`` (r x in_features) and ``lora_B`` (out_features x r), PEFT's shapes and
initialization (A Kaiming-uniform, B zeros, so the adapted model starts equal to the base model)
-- and a forward hook that adds ``lora_B(lora_A(dropout(x))) * scaling`` to the layer's output,
the same arithmetic as PEFT's ``LoraLayer.forward``. The user's module code is untouched: the
adapters are ordinary parameters, so pockc's tracer sees them as trainable graph inputs while the
base weight stays a frozen input whose gradient is never computed.

``merge_lora`` folds ``B @ A * scaling`` into the base weight and removes the adapters (PEFT's
``merge_and_unload``); ``save_adapter`` / ``load_adapter`` store the trained tensors and the
config in a directory (safetensors when installed, else ``torch.save``).
"""
from __future__ import annotations

import difflib
import fnmatch
import io
import json
import math
import os
import re
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
    ``nn.Linear`` inside the fine-tuned blocks). An entry that matches no module is an error.

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
    return out + F.linear(F.linear(x.to(module.lora_A.dtype), module.lora_A), module.lora_B) * st.scaling


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
            hits = in_scope
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


def remove_lora(model) -> None:
    """Remove every adapter without merging (the base model as it was)."""
    for mod in adapted_modules(model).values():
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
# Saving and loading
# ---------------------------------------------------------------------------------------

def _have_safetensors():
    try:
        import safetensors.torch  # noqa: F401
        return True
    except ImportError:
        return False


def save_tensors(tensors: dict, directory) -> str:
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if _have_safetensors():
        from safetensors.torch import save
        path = os.path.join(directory, ADAPTER_WEIGHTS)
        atomic_write(path, save(tensors))         # bytes in memory, then one atomic write
    else:
        path = os.path.join(directory, ADAPTER_WEIGHTS_PT)
        buf = io.BytesIO()
        torch.save(tensors, buf)
        atomic_write(path, buf.getvalue())
    return path


def load_tensors(directory) -> dict:
    st = os.path.join(directory, ADAPTER_WEIGHTS)
    pt = os.path.join(directory, ADAPTER_WEIGHTS_PT)
    if os.path.exists(st):
        if not _have_safetensors():
            raise CompileError(f"{st} needs the safetensors package: pip install safetensors")
        from safetensors.torch import load_file
        return load_file(st)
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise CompileError(f"no adapter in {directory!r}: expected {ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_PT}")


def save_adapter(model, directory, trained: dict, config: LoraConfig | None, extra: dict | None = None) -> str:
    """Write ``trained`` (name -> tensor; row selections as ``name@rows:a:b``) and the adapter
    layout to ``directory``; returns the weights file's path."""
    mods = adapted_modules(model)
    meta = {
        "format": "pockc-adapter/1",
        "lora": config.to_dict() if config is not None else None,
        "adapted_modules": {n: {"r": m._pockc_lora.r, "scaling": m._pockc_lora.scaling,
                                "dropout": m._pockc_lora.dropout} for n, m in mods.items()},
        **(extra or {}),
    }
    path = save_tensors(trained, directory)
    atomic_write(os.path.join(directory, ADAPTER_CONFIG), json.dumps(meta, indent=1) + "\n")
    return path


@torch.no_grad()
def load_adapter(model, directory):
    """Load an adapter saved by ``step.save_adapter(directory)`` into ``model`` (a fresh copy of
    the base model): attach the LoRA adapters it names, then copy every saved tensor in.
    Returns ``model``.

    >>> model = pockc.load_adapter(base_model, "out/")   # doctest: +SKIP
    """
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(cfg_path):
        raise CompileError(f"no {ADAPTER_CONFIG} in {directory!r}; save one with step.save_adapter(directory)")
    with open(cfg_path) as f:
        meta = json.load(f)
    tensors = load_tensors(directory)
    mods = dict(model.named_modules())
    for name, info in meta.get("adapted_modules", {}).items():
        mod = mods.get(name)
        if not isinstance(mod, torch.nn.Linear):
            raise CompileError(f"adapter names module {name!r}, which this model does not have as nn.Linear; "
                               "load it into the model it was trained on")
        if hasattr(mod, "_pockc_lora"):
            if mod._pockc_lora.r != info["r"]:
                raise CompileError(f"module {name!r} has a rank-{mod._pockc_lora.r} adapter, the saved one has "
                                   f"rank {info['r']}")
            continue
        cfg = LoraConfig(r=info["r"], lora_alpha=info["scaling"] * info["r"], target_modules=[name],
                         lora_dropout=info["dropout"])
        attach_lora(model, cfg, [name])
        mod._pockc_lora.scaling = info["scaling"]
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, _, rows = key.partition("@rows:")
        p = params.get(name)
        if p is None:
            close = difflib.get_close_matches(name, list(params), n=1)
            raise CompileError(f"adapter tensor {name!r} has no parameter in this model"
                               f"{'; closest: ' + close[0] if close else ''}")
        target = p
        if rows:
            idx = [int(i) for i in rows.split(",")] if "," in rows or ":" not in rows else None
            if idx is None:
                a, b = map(int, rows.split(":"))
                target = p[a:b]
            else:
                p.index_copy_(0, torch.tensor(idx, device=p.device), value.to(p.dtype).to(p.device))
                continue
        if tuple(target.shape) != tuple(value.shape):
            raise CompileError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, the model's is "
                               f"{tuple(target.shape)}")
        target.copy_(value.to(target.dtype))
    return model
