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
   ``adapter=dir`` does the same from a saved adapter (PEFT's or pockc's), loading its values.

Capture is ``make_fx`` (pockc/trace.py); if that cannot trace the model, torch.export
(pockc/capture.py), then the same joint graph.
"""
from __future__ import annotations

import re
import time
import warnings

import torch

from pockc.runtime.distributed import Comm
from pockc.api import (_check_inputs, build_graph, check_backend_option, check_num_items, check_training_options,
                       plan_step_memory, step_backend_for)
from pockc.precision import apply_precision, autocast_loss, check_precision
from pockc.capture import export_loss
from pockc.errors import CompileError, PlanError
from pockc.lora import (Adapter, LoraConfig, adapter_param_names, apply_adapter, attach_lora, match_targets,
                        merge_lora, read_adapter, remove_lora, split_key)
from pockc.lora import load_adapter as _load_adapter
from pockc.lora import save_adapter as _save_adapter
from pockc.memory import StepMemory
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
        to ``directory`` in PEFT's format (``PeftModel.from_pretrained(base, directory)`` loads
        it), with pockc's side files for what PEFT cannot hold; returns the weights file's path.
        Load it into a fresh base model with ``pockc.load_adapter(model, directory)``, or keep
        training it with ``pockc.finetune(..., adapter=directory)``."""
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
        layers = "all" if self.layers is None else self.layers
        extra = {"layers": list(layers) if isinstance(layers, tuple) else layers,
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


def finetune(model: torch.nn.Module, loss_fn, example_batch, lora: LoraConfig | None = None, layers=None,
             update=None, optimizer=None, *, adapter=None, capture: str = "auto",
             verbose: bool = False, accumulate: int = 1, max_grad_norm: float | None = None,
             num_items=None, head_chunk_rows: int | None = None, precision: str = "fp32",
             backend: str | None = None, distributed="auto") -> FinetuneStep:
    """Compile a fine-tuning step: LoRA adapters and/or partial updates, limited to ``layers``.

    ``lora``: a :class:`LoraConfig` (PEFT's names); adapters go on the matching ``nn.Linear``
    layers inside ``layers``. ``layers``: ``"last:K"``, a list of block indices, or ``"all"`` (``None``, the default).
    ``update``: extra trained parameters in pockc.compile's policy language (e.g.
    ``{"*norm*": "full"}``), limited to ``layers`` and the modules after them; without ``lora``
    it defaults to every parameter of the selected blocks. ``capture``: ``"auto"`` (make_fx, then
    torch.export if make_fx cannot trace the model), ``"make_fx"`` or ``"export"``.

    ``adapter``: a directory written by ``step.save_adapter`` or by ``peft``'s ``save_pretrained``
    (LoRA): training continues from it, with its config (r, alpha, dropout, target modules, the
    layers it was trained on, its partially trained tensors) in place of ``lora=``; a ``lora=`` or
    ``layers=`` that contradicts it is an error. The optimizer state starts fresh (adapters carry
    none), as it does after ``PeftModel.from_pretrained(base, dir, is_trainable=True)``.

    ``accumulate``, ``max_grad_norm``, ``num_items``: gradient accumulation over K calls (the loss
    normalized over the items of all K micro-batches) and clipping, as in :func:`pockc.compile`.
    ``head_chunk_rows``: tokens per chunk of the fused output layer + cross-entropy (the full
    logits never exist; ``step.fused_head`` reports it); None: about 16 MiB of float32 logits per
    chunk; 0: no fusion.
    ``precision="bf16"``: the frozen weights (the base model) are converted to bfloat16 in
    ``model``, the trained tensors (LoRA adapters, trained layers) stay float32 master copies with
    float32 optimizer state, and the loss is traced under bfloat16 autocast (pockc/precision.py):
    what users run with PEFT on a bf16 base model. ``"fp32"`` (default): the model's own dtypes.
    ``backend``: ``"aten"`` (the default) or ``"inductor"`` (lowered through torch._inductor on
    the first call: tens of seconds, fused kernels after), as in :func:`pockc.compile`.
    ``distributed``: data parallel on torch.distributed, as in :func:`pockc.compile` (default
    ``"auto"``: on under torchrun with more than one rank): the LoRA factors' gradients (and any
    trained rows) are all-reduced in the step; every rank holds rank 0's adapters after compiling.

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
    from pockc.distributed import compile_collectively, resolve_distributed
    comm = resolve_distributed(distributed)
    if comm is not None:
        return compile_collectively(comm, lambda: finetune(
            model, loss_fn, example_batch, lora, layers, update, optimizer, adapter=adapter, capture=capture,
            verbose=verbose, accumulate=accumulate, max_grad_norm=max_grad_norm, num_items=num_items,
            head_chunk_rows=head_chunk_rows, precision=precision, backend=backend, distributed=comm), model)
    batch, optimizer = _check_inputs(model, loss_fn, example_batch, optimizer)
    check_training_options(accumulate, max_grad_norm, num_items, head_chunk_rows)
    if num_items is not None:
        check_num_items(num_items, batch)
    precision = check_precision(precision)
    check_backend_option(backend)
    if capture not in CAPTURES:
        raise CompileError(f"capture={capture!r}: use one of {', '.join(CAPTURES)}")
    if lora is not None and not isinstance(lora, LoraConfig):
        raise CompileError(f"lora must be a pockc.LoraConfig(...), got {type(lora).__name__}")
    t0 = time.perf_counter()
    saved = read_adapter(adapter) if adapter is not None else None
    if saved is not None:
        layers = _adapter_layers(model, saved, layers, adapter)
    blocks, selected = _select_blocks(model, layers)
    if not blocks and layers not in (None, "all"):
        raise PlanError("layers=: the model has no repeated blocks (an nn.ModuleList of layers); use layers='all'")
    names_order = [n for n, _ in model.named_modules()]
    pre_scope = _scope(model, blocks, selected, names_order)
    saved_rules, backup = None, {}
    if saved is not None:
        lora, saved_rules = _adapter_plan(model, saved, lora, pre_scope, adapter)
        params = dict(model.named_parameters())
        backup = {n: params[n].detach().clone() for n in saved_rules if n in params}   # restored on failure
        new = apply_adapter(model, saved)
        adapters = [n for n in adapter_param_names(model) if n.rpartition(".")[0] in saved.modules]
    else:
        targets = match_targets(model, lora.target_modules, pre_scope) if lora is not None else []
        adapters = attach_lora(model, lora, targets) if lora is not None else []
    try:
        step = _build(model, loss_fn, batch, lora, layers, update, optimizer, capture, blocks, selected,
                      adapters, t0, saved_rules, opts={"accumulate": accumulate, "max_grad_norm": max_grad_norm},
                      num_items=num_items, head_chunk_rows=head_chunk_rows, precision=precision, backend=backend,
                      comm=distributed if isinstance(distributed, Comm) else None)
    except BaseException:
        if saved is not None:  # leave the user's model as it was
            remove_lora(model, {n.rpartition(".")[0] for n in new})
        elif adapters:
            remove_lora(model)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, v in backup.items():
                params[n].copy_(v)
        raise
    if verbose:
        print(step.update_plan.table())
        print(f"compiled in {step.compile_seconds:.2f}s ({step.capture}), {len(step.graph.graph.nodes)} graph nodes")
    return step


def _adapter_layers(model, saved: Adapter, layers, where):
    """finetune's layers= for a saved adapter: the one it was trained with; a ``layers=`` that
    selects other blocks is an error."""
    own = saved.layers
    if own is None and saved.peft_layers is not None and not saved.tensors.keys() - _lora_keys(saved):
        # PEFT's layers_to_transform numbers the block container's children; pockc's layers= its blocks
        blocks, _ = _blocks(model, [n for n, _ in model.named_modules()])
        pos = {b.rsplit(".", 1)[-1]: i for i, b in enumerate(blocks)}
        if all(str(i) in pos for i in saved.peft_layers):
            own = [pos[str(i)] for i in saved.peft_layers]
    if own is None:
        return layers
    if layers is not None and _select_blocks(model, layers)[1] != _select_blocks(model, own)[1]:
        raise PlanError(f"finetune: layers={layers!r} conflicts with the adapter in {str(where)!r}, trained with "
                        f"layers={own!r}; drop layers= (the adapter's is used)")
    return own if layers is None else layers


def _lora_keys(saved: Adapter) -> set:
    return {f"{m}.{p}" for m in saved.modules for p in ("lora_A", "lora_B")}


def _adapter_plan(model, saved: Adapter, lora, scope, where):
    """(the LoraConfig the step reports, {parameter: Rule} for the adapter's non-LoRA tensors).
    A ``lora=`` passed as well must agree with the adapter on every hyperparameter and select the
    same modules."""
    where = str(where)
    if lora is not None:
        if saved.lora is None:
            raise PlanError(f"finetune: lora= was given, but the adapter in {where!r} has no LoRA layers; drop one")
        for field, mine, theirs in (("r", lora.r, [r for r, _, _ in saved.modules.values()]),
                                    ("lora_alpha / r", lora.scaling, [s for _, s, _ in saved.modules.values()]),
                                    ("lora_dropout", lora.lora_dropout, [d for _, _, d in saved.modules.values()])):
            if set(theirs) != {mine}:
                shown = theirs[0] if len(set(theirs)) == 1 else sorted(set(theirs))
                raise PlanError(f"finetune: lora= has {field} = {mine!r}, the adapter in {where!r} has {shown!r}; "
                                "pass lora= or adapter=, not both")
        picked = match_targets(model, lora.target_modules, scope)
        if sorted(picked) != sorted(saved.modules):
            diff = sorted(set(picked) ^ set(saved.modules))
            raise PlanError(f"finetune: lora= target_modules={lora.target_modules!r} selects other modules than the "
                            f"adapter in {where!r} (e.g. {diff[0]}); pass lora= or adapter=, not both")
    lora_keys = _lora_keys(saved)
    names = list(saved.modules) + [split_key(k)[0] for k in saved.tensors if k not in lora_keys]
    canonical = canonical_names(model)       # a tied tensor is in scope when any of its names is
    aliases = {}
    for n, c in canonical.items():
        aliases.setdefault(c, []).append(n)
    outside = [n for n in names
               if scope is not None and not any(scope(a) for a in aliases.get(canonical.get(n, n), [n]))]
    if outside:
        raise PlanError(f"finetune: the adapter in {where!r} trains {outside[0]}, outside the fine-tuned layers; "
                        "widen layers= or drop it")
    rows = {}
    for key in saved.tensors:
        if key in lora_keys:
            continue
        name, sel = split_key(key)
        if sel is None:
            rows[name] = None
        elif rows.get(name, ()) is not None:
            picked = range(sel[1], sel[2]) if sel[0] == "slice" else sel[1]
            rows[name] = sorted(set(rows.get(name, ())) | set(picked))
    rules = {n: Rule("full") if r is None else Rule.parse(r) for n, r in rows.items()}
    return (saved.lora if saved.lora is not None else lora), rules


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


def _build(model, loss_fn, batch, lora, layers, update, optimizer, capture, blocks, selected, adapters, t0,
           saved_rules=None, opts=None, num_items=None, head_chunk_rows=None, precision="fp32", backend=None,
           comm=None):
    opts = opts or {}      # accumulate=, max_grad_norm= (pockc.compile's)
    gopts = dict(opts, head_chunk_rows=head_chunk_rows, comm=comm)
    traced_fn, order, used = _capture(model, loss_fn, batch, capture)
    scope = _scope(model, blocks, selected, order)
    if update is None:
        update = [] if lora is not None or saved_rules is not None else [{f"{b}.*": "full" for b in selected}]
    rules = {n: Rule("full") for n in adapters}
    rules.update(saved_rules or {})
    for n, rule in (_rules_for(update, model, order, scope, set(adapters)) if update != [] else {}).items():
        if n in (saved_rules or {}) and str(rule) != str(saved_rules[n]):
            raise PlanError(f"finetune: update= trains {n} as {rule}, the adapter in adapter= as {saved_rules[n]}; "
                            "drop it from update=")
        rules[n] = rule
    params = dict(model.named_parameters())
    plan = UpdatePlan({n: rules.get(n, Rule("frozen")) for n in params}, {n: tuple(p.shape) for n, p in params.items()},
                      tied_parameters(canonical_names(model)))
    if not plan.trainable_names():
        raise PlanError("finetune trains nothing: pass lora=LoraConfig(...) or an update= policy")
    for n in plan.trainable_names():
        if not params[n].is_floating_point():
            raise PlanError(f"parameter {n!r} has dtype {params[n].dtype} and cannot be trained")
    restore = apply_precision(model, set(plan.trainable_names()), precision)
    try:
        step = _build_plan(model, loss_fn, batch, plan, optimizer, capture, traced_fn, used, gopts, opts, num_items,
                           precision)
        step.backend = step_backend_for(backend, step.graph, batch)
    except BaseException:
        restore()     # the model's dtypes as they were
        raise
    step.lora_config = lora
    step.layers = layers
    step.compile_seconds = time.perf_counter() - t0
    return step


def _build_plan(model, loss_fn, batch, plan, optimizer, capture, traced_fn, used, gopts, opts, num_items, precision):
    """The FinetuneStep of ``plan`` (the model already in its ``precision``)."""
    loss_fn = autocast_loss(loss_fn, precision, batch)
    if precision != "fp32":            # trace again under autocast, with the converted weights
        traced_fn = export_loss(model, loss_fn, batch)[0] if used == "export" else loss_fn
    try:
        gm, layout = build_graph(model, traced_fn, batch, plan, optimizer, **gopts)
    except CompileError:
        if capture != "auto" or used != "make_fx":
            raise
        traced_fn, _, used = *export_loss(model, loss_fn, batch), "export"
        gm, layout = build_graph(model, traced_fn, batch, plan, optimizer, **gopts)
    if layout.unused:
        warnings.warn(f"pockc: trained parameters with no path to the loss get no update: {layout.unused}",
                      stacklevel=4)
    how = used

    def recompile(new_batch, opt, portable=False):
        new_batch = tuple(new_batch)
        fn = export_loss(model, loss_fn, new_batch)[0] if how == "export" else loss_fn
        g, lay = build_graph(model, fn, new_batch, plan, opt, **gopts, portable=portable)
        if lay.to_dict() != layout.to_dict():
            raise CompileError("recompiling for a new batch, model mode or optimizer setting changed the step's "
                               "inputs; call finetune again")
        return g

    step = FinetuneStep(model, gm, layout, optimizer, plan, batch, recompile, num_items=num_items, **opts)
    # The planned memory of the step, as pockc.compile reports it (step.memory.peak_bytes, ...).
    step.memory = StepMemory(step, plan_step_memory(gm, layout), gm.meta.get("pockc.peak_before"),
                             gm.meta.get("pockc.schedule"))
    step.fused_head = gm.meta.get("pockc.fused_head", [])
    step.precision = precision
    step.capture = used
    return step
