"""pockc.finetune: LoRA and partial fine-tuning of decoder models with a PEFT-like API.

The pipeline is pockc.compile's, with two steps in front:

1. **Scope.** ``layers=`` picks the repeated blocks that are fine-tuned (``"last:K"``, a list of
   block indices, or ``None`` / ``"all"``). Adapters and ``update=`` rules apply only inside them
   and to the modules that run after the last block (final norm, lm_head); nothing below the
   first fine-tuned block is trained, so autograd's walk -- and with it the whole backward pass --
   stops there.
2. **Adapters.** ``lora=LoraConfig(...)`` registers ``lora_A`` / ``lora_B`` on the targeted
   ``nn.Linear`` layers (pockc/lora.py). They are ordinary parameters to the tracer: trainable
   graph inputs, while the base weights are frozen inputs whose gradient is never computed.

Capture is ``make_fx`` (pockc/trace.py); if that cannot trace the model, torch.export
(pockc/capture.py), then the same joint graph.
"""
from __future__ import annotations

import re
import time
import warnings

import torch

from pockc.api import _check_inputs, build_graph
from pockc.capture import export_loss
from pockc.errors import CompileError, PlanError
from pockc.lora import (LoraConfig, adapter_param_names, attach_lora, match_targets, merge_lora,
                        remove_lora)
from pockc.lora import load_adapter as _load_adapter
from pockc.lora import save_adapter as _save_adapter
from pockc.memory import StepMemory
from pockc.passes.plan_memory import plan_memory
from pockc.plan import Rule, UpdatePlan, _blocks, canonical_names, match_pattern, resolve_update, tied_parameters
from pockc.runtime.train_step import TrainStep, selected_rows
from pockc.trace import analyze_forward

CAPTURES = ("auto", "make_fx", "export")


# --------------------------------------------------------------------------- scope
def _select_blocks(model, layers):
    """(all block names, selected block names) for ``layers``."""
    blocks, _ = _blocks(model, [n for n, _ in model.named_modules()])
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == "all"):
        return blocks, list(blocks)
    if isinstance(layers, str):
        m = re.fullmatch(r"\s*last:\s*(\d+)\s*", layers.lower())
        if not m:
            raise PlanError(f"layers={layers!r}: use 'last:K', 'all' or a list of block indices")
        k = int(m.group(1))
        if not 1 <= k <= len(blocks):
            raise PlanError(f"layers={layers!r}: K must be between 1 and {len(blocks)} (the model's blocks)")
        return blocks, blocks[-k:]
    if isinstance(layers, (list, tuple)) and all(isinstance(i, int) for i in layers) and layers:
        bad = [i for i in layers if not -len(blocks) <= i < len(blocks)]
        if bad:
            raise PlanError(f"layers={list(layers)}: index {bad[0]} out of range for {len(blocks)} blocks")
        pick = sorted({i % len(blocks) for i in layers})
        return blocks, [blocks[i] for i in pick]
    raise PlanError(f"layers={layers!r}: use 'last:K', 'all' or a list of block indices")


def _in(name, modules):
    return any(name == m or name.startswith(m + ".") for m in modules)


def _scope(model, blocks, selected, order):
    """Predicate over parameter / module names: inside a selected block, or outside every block
    and run after the first selected block (final norm, lm_head)."""
    if len(selected) == len(blocks):
        return None
    first = selected[0]
    pos = {m: i for i, m in enumerate(order)}
    start = pos.get(first, None)

    def ok(name):
        if _in(name, selected):
            return True
        if _in(name, blocks):
            return False
        mod = name
        while mod and mod not in pos:          # parameter -> its module (or an ancestor that ran)
            mod = mod.rpartition(".")[0]
        return start is not None and mod in pos and pos[mod] > start and mod != ""
    return ok


# --------------------------------------------------------------------------- plan
def _rules_for(update, model, order, scope, adapters):
    """Rules of ``update`` (compile's policy language), limited to ``scope``. A dict pattern that
    only matches parameters outside the scope is an error, not a silent no-op."""
    params = dict(model.named_parameters())
    canonical = canonical_names(model)     # a tied weight answers to each of its names
    names = [n for n in canonical if canonical[n] not in adapters]
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    aliases = {}
    for n, c in canonical.items():
        aliases.setdefault(c, []).append(n)

    def in_scope(n):   # a tied tensor is in scope when any of its names is
        return scope is None or any(scope(a) for a in aliases[canonical[n]])
    rules = {}
    items = update if isinstance(update, list) else [update]
    for item in items:
        if isinstance(item, dict):
            for pattern, value in item.items():
                rule = Rule.parse(value)
                hits = match_pattern(pattern, names)
                kept = list(dict.fromkeys(canonical[n] for n in hits if in_scope(n)))
                if not kept:
                    raise PlanError(f"update pattern {pattern!r} matches only parameters outside the fine-tuned "
                                    f"layers (e.g. {hits[0]}); widen layers= or drop the pattern")
                for n in kept:
                    rule.selection(shapes[n])
                    rules[n] = rule
        else:
            plan = resolve_update(item, model, order)
            for n in dict.fromkeys(canonical[a] for a in names):
                r = plan.rule(n)
                if (isinstance(item, UpdatePlan) and n in item.rules) or r.kind != "frozen":
                    if in_scope(n) or r.kind == "frozen":
                        rules[n] = r
    return rules


# --------------------------------------------------------------------------- the step
class FinetuneStep(TrainStep):
    """A TrainStep with PEFT-style extras: ``save_adapter``, ``load_adapter``,
    ``merge_and_unload``. ``trainable_parameters()`` includes the LoRA adapters."""

    lora_config: LoraConfig | None = None
    capture: str = "make_fx"
    layers = None
    _merged = False

    @property
    def adapter_names(self) -> list:
        return adapter_param_names(self.model)

    def __call__(self, *batch):
        if self._merged:
            raise CompileError("the adapters were merged into the base weights; call pockc.finetune again "
                               "to keep training")
        return super().__call__(*batch)

    def save_adapter(self, directory) -> str:
        """Save only the trained state (adapters and partially trained tensors: the trained rows)
        and the adapter layout to ``directory``; returns the weights file's path. Load it into a
        fresh base model with ``pockc.load_adapter(model, directory)``."""
        params = dict(self.model.named_parameters())
        trained = {}
        for name, sel in self.layout.grads:
            if sel is None:
                key = name
            elif sel[0] == "slice":
                key = f"{name}@rows:{sel[1]}:{sel[2]}"
            else:
                key = f"{name}@rows:{','.join(str(int(i)) for i in sel[1])}"
            trained[key] = selected_rows(params[name].detach(), sel)
        extra = {"layers": self.layers if not isinstance(self.layers, tuple) else list(self.layers),
                 "trained": [n for n, _ in self.layout.grads], "capture": self.capture}
        return _save_adapter(self.model, directory, trained, self.lora_config, extra)

    def load_adapter(self, directory):
        """Load a saved adapter into this step's model (same adapter layout); optimizer state is kept."""
        _load_adapter(self.model, directory)
        return self

    def merge_and_unload(self):
        """Fold the LoRA adapters into the base weights and remove them; returns the model. The
        step cannot run afterwards (its graph trains the adapters)."""
        merge_lora(self.model)
        self._merged = True
        return self.model

    def __repr__(self):
        lora = f", LoRA r={self.lora_config.r} on {len(self.adapter_names) // 2} modules" if self.lora_config else ""
        return super().__repr__().replace("TrainStep(", "FinetuneStep(", 1)[:-1] + f"{lora})"


def finetune(model: torch.nn.Module, loss_fn, example_batch, lora: LoraConfig | None = None, layers="all",
             update=None, optimizer=None, *, capture: str = "auto", verbose: bool = False) -> FinetuneStep:
    """Compile a fine-tuning step: LoRA adapters and/or partial updates, limited to ``layers``.

    ``lora``: a :class:`LoraConfig` (PEFT's names); adapters go on the matching ``nn.Linear``
    layers inside ``layers``. ``layers``: ``"last:K"``, a list of block indices, or ``"all"``.
    ``update``: extra trained parameters in pockc.compile's policy language (e.g.
    ``{"*norm*": "full"}``), limited to ``layers`` and the modules after them; without ``lora``
    it defaults to every parameter of the selected blocks. ``capture``: ``"auto"`` (make_fx, then
    torch.export if make_fx cannot trace the model), ``"make_fx"`` or ``"export"``.

    >>> import pockc
    >>> from pockc import zoo
    >>> ex = zoo.llama(layers=4)
    >>> step = pockc.finetune(ex.model, ex.loss_fn, ex.example_batch,
    ...                       lora=pockc.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    ...                       layers="last:2", optimizer=pockc.AdamW(lr=1e-3))
    >>> step.print_trainable_parameters()
    trainable params: 1,024 || all params: 62,752 || trainable%: 1.6318
    >>> loss = step(*ex.example_batch)
    >>> sorted(step.trainable_parameters())[:2]
    ['layers.2.q_proj.lora_A', 'layers.2.q_proj.lora_B']
    """
    batch, optimizer = _check_inputs(model, loss_fn, example_batch, optimizer)
    if capture not in CAPTURES:
        raise CompileError(f"capture={capture!r}: use one of {', '.join(CAPTURES)}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise CompileError(f"lora must be a pockc.LoraConfig(...), got {type(lora).__name__}")
    t0 = time.perf_counter()
    blocks, selected = _select_blocks(model, layers)
    if not blocks and layers not in (None, "all"):
        raise PlanError("layers=: the model has no repeated blocks (an nn.ModuleList of layers); use layers='all'")
    names_order = [n for n, _ in model.named_modules()]
    pre_scope = _scope(model, blocks, selected, names_order)
    targets = match_targets(model, lora.target_modules, pre_scope) if lora is not None else []
    adapters = attach_lora(model, lora, targets) if lora is not None else []
    try:
        step = _build(model, loss_fn, batch, lora, layers, update, optimizer, capture, blocks, selected,
                      adapters, t0)
    except BaseException:
        remove_lora(model) if adapters else None  # leave the user's model as it was
        raise
    if verbose:
        print(step.update_plan.table())
        print(f"compiled in {step.compile_seconds:.2f}s ({step.capture}), {len(step.graph.graph.nodes)} graph nodes")
    return step


def _capture(model, loss_fn, batch, capture):
    """(loss function to trace, module order, capture used)."""
    if capture in ("auto", "make_fx"):
        try:
            return loss_fn, analyze_forward(model, loss_fn, batch), "make_fx"
        except CompileError:
            if capture == "make_fx":
                raise
    replay, order = export_loss(model, loss_fn, batch)
    return replay, order, "export"


def _build(model, loss_fn, batch, lora, layers, update, optimizer, capture, blocks, selected, adapters, t0):
    traced_fn, order, used = _capture(model, loss_fn, batch, capture)
    scope = _scope(model, blocks, selected, order)
    if update is None:
        update = [] if lora is not None else [{f"{b}.*": "full" for b in selected}]
    rules = {n: Rule("full") for n in adapters}
    rules.update(_rules_for(update, model, order, scope, set(adapters)) if update != [] else {})
    params = dict(model.named_parameters())
    plan = UpdatePlan({n: rules.get(n, Rule("frozen")) for n in params}, {n: tuple(p.shape) for n, p in params.items()},
                      tied_parameters(canonical_names(model)))
    if not plan.trainable_names():
        raise PlanError("finetune trains nothing: pass lora=LoraConfig(...) or an update= policy")
    for n in plan.trainable_names():
        if not params[n].is_floating_point():
            raise PlanError(f"parameter {n!r} has dtype {params[n].dtype} and cannot be trained")
    try:
        gm, layout = build_graph(model, traced_fn, batch, plan, optimizer)
    except CompileError:
        if capture != "auto" or used != "make_fx":
            raise
        traced_fn, order, used = *export_loss(model, loss_fn, batch), "export"
        gm, layout = build_graph(model, traced_fn, batch, plan, optimizer)
    if layout.unused:
        warnings.warn(f"pockc: trained parameters with no path to the loss get no update: {layout.unused}",
                      stacklevel=3)
    how = used

    def recompile(new_batch, opt):
        new_batch = tuple(new_batch)
        fn = export_loss(model, loss_fn, new_batch)[0] if how == "export" else loss_fn
        g, lay = build_graph(model, fn, new_batch, plan, opt)
        if lay.to_dict() != layout.to_dict():
            raise CompileError("recompiling for a new batch, model mode or optimizer setting changed the step's "
                               "inputs; call finetune again")
        return g

    step = FinetuneStep(model, gm, layout, optimizer, plan, batch, recompile)
    # The planned memory of the step, as pockc.compile reports it (step.memory.peak_bytes, ...).
    step.memory = StepMemory(step, plan_memory(gm, layout), gm.meta.get("pockc.peak_before"),
                             gm.meta.get("pockc.schedule"))
    step.lora_config = lora
    step.capture = used
    step.layers = layers
    step.compile_seconds = time.perf_counter() - t0
    return step
