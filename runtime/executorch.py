"""A compiled step as an ExecuTorch program (``.pte``): on-device training where PyTorch does not run.

``step.export("step.pte", target="executorch")`` (:func:`export_executorch`) writes the step's
pruned joint graph -- forward, only the backward its plan needs, and the optimizer update -- as an
ExecuTorch program with these methods:

``train_step(*scalars, *batch_tensors) -> loss``
    one training step; updates the trained weights, the optimizer state and the batch-norm
    statistics held by the program. ``scalars`` are the optimizer's per-step numbers (float64
    0-dim tensors, named by the manifest's ``scalars``: ``neg_lr`` for SGD; ``decay``,
    ``neg_step_size``, ``bias_correction2_sqrt`` for AdamW, computed from the step count as
    ``runtime/optim.py`` computes them).
``forward(*inputs) -> outputs``
    the model in eval mode over the same weights (``predict=``), so it sees what training wrote.
``get_state() -> tensors``
    copies of every tensor training writes, in the manifest's order (how a host reads the
    trained weights back).
``pockc_manifest() -> uint8 tensor``
    the manifest as JSON bytes: the tensors in order (name, role, shape), the optimizer and its
    hyperparameters, the step count at export, the batch signature, the planned memory.

How the step becomes a program (each point fails, silently or loudly, otherwise; executorch 1.5):

* the graph is rebuilt without pockc's CPU-specific passes (no channels-last layout, no oneDNN
  1x1 convolutions, no ``_foreach_*`` updates: ``TrainStep.portable_graph``);
* every tensor the step reads is a *buffer* of the exported module; those it writes are mutable
  buffers marked ``et_init_buffer`` (exact names), so that they keep their initial values --
  otherwise training silently starts from zeros -- and frozen ones become the program's read-only
  constants (flash on a microcontroller). The per-step scalars are method inputs;
* ``torch.export(strict=False)`` of the joint graph; train-mode batch norm
  (``_native_batch_norm_legit_functional``, not core ATen) decomposed, keeping
  ``var_mean.correction``, which ExecuTorch's portable kernels have;
* the methods share the mutable buffers (``share_mutable_buffers=True``) and
  ``emit_mutable_buffer_names`` stays off: with it, executorch 1.5.1 gives a mutable buffer whose
  initial bytes equal a constant's (a zero bias, a batch norm's unit weight) that constant's data
  index, and training reads garbage (observed: NaN losses, or a program that fails to load).

Memory. ExecuTorch's graph is functional: each update computes the new value and a ``copy_``
writes it back. Its ``copy_``\\ s come at the end of the program, so every new value would live to
the end; :func:`write_back_early` moves each right after the last read of the old value, as pockc's
own schedule updates a tensor right after its gradient, and :func:`late_from_inputs` computes
what depends on weights only right before its use. Offsets are then planned by
:func:`pockc_memory_algo`: pockc's arena search (runtime/arena.py) and ExecuTorch's greedy
planner, the smaller layout kept. The planned arena is read back from the program (``non_const_buffer_sizes``): memory id
1 holds the method's activations and temporaries, id 2 the shared mutable state. ``budget=``
bounds the train step's arena (both ids).

Speed: ExecuTorch's portable kernels are plain loops; ``xnnpack=True`` (experimental) delegates
to XNNPACK what it takes among the ops that read no trained or updated tensor (frozen layers'
convolutions, linears, element-wise ops); the backward ops (``convolution_backward``, the batch
norm's backward arithmetic) stay on portable kernels. ``program_report`` lists which kernels and
delegates each method uses. With XNNPACK, pockc's planning (its graph passes and its arena
search) gave losses that drift from the aten step's (1e-3 after 3 steps, observed on a small CNN,
not understood yet), and a partition over a trained weight crashed the runtime; so an XNNPACK
program is planned by ExecuTorch's own greedy planner, and its losses agree with the aten step's
to about 1e-4 (XNNPACK's own float arithmetic).

This module imports torch, numpy and pockc.runtime only; executorch is imported when used.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import time
import warnings

import torch

from .aoti import ExportedStep, _StepModule, _tensor_plan, check_export_path
from .arena import pack
from .artifact import _version, check_versions, draws_random, signature_to_json
from .batch import batch_signature, batch_tensors
from .errors import ArenaOverBudget, ArtifactError, BatchError, StepError
from .fileio import atomic_write, fsync_dir, remove_stale_temps
from .memory import format_bytes, parse_size

FORMAT = "pockc-executorch"
FORMAT_VERSION = 1
TRAIN, PREDICT, STATE, MANIFEST = "train_step", "forward", "get_state", "pockc_manifest"
TESTED_EXECUTORCH = "1.5.1"
INSTALL_HINT = ("pip install --no-deps executorch==1.5.1 && pip install 'pockc[executorch]' "
                "(see the README: executorch's own dependency list pulls in packages it does not need to "
                "export or run a program)")

_ROLES = ("param", "frozen", "buffer", "state")
_ALIASING = ("view", "alias", "squeeze", "unsqueeze", "expand", "permute", "slice", "select", "transpose",
             "_copy", "t.default", "as_strided", "unfold", "narrow", "split", "chunk", "unbind", "diagonal")


class ExecutorchUnavailable(ImportError):
    """executorch is not installed (or is a release pockc cannot use)."""


def available() -> bool:
    try:
        _import()
    except ExecutorchUnavailable:
        return False
    return True


def _import():
    try:
        import executorch.exir  # noqa: F401  (import check)
        from executorch.runtime import Runtime  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- ImportError, or a broken install's own error
        raise ExecutorchUnavailable(f"exporting or running an ExecuTorch program needs executorch "
                                    f"({type(e).__name__}: {e}); install it with {INSTALL_HINT}") from None


def executorch_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("executorch")
    except Exception:  # noqa: BLE001
        return None


# -- memory ---------------------------------------------------------------------------------
def write_back_early(gm: torch.fx.GraphModule):
    """Move each write-back ``copy_(buffer, new)`` that ExecuTorch puts at the end of the program
    right after the last node that reads the buffer's old value (through views too) or makes
    ``new``: the new value then dies at once instead of living to the end of the step."""
    from executorch.exir.pass_base import PassResult
    graph = gm.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    changed = False
    for n in nodes:
        if not (n.op == "call_function" and "copy_" in str(n.target) and len(n.args) >= 2
                and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "placeholder"):
            continue
        buf, src = n.args[0], n.args[1]
        last = index.get(src, -1) if isinstance(src, torch.fx.Node) else -1
        todo, seen = [buf], {buf}
        while todo:      # every reader of the buffer or of a view of it, except this copy
            t = todo.pop()
            for u in t.users:
                if u is n or u in seen or u.op == "output":
                    continue
                seen.add(u)
                last = max(last, index[u])
                if any(a in str(u.target) for a in _ALIASING):
                    todo.append(u)
        if last >= 0 and last + 1 < index[n]:
            nodes[last].append(n)
            changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


_VIEW_COPIES = ("permute_copy", "t_copy", "view_copy", "expand_copy", "transpose_copy", "unsqueeze_copy",
                "squeeze_copy", "alias_copy", "slice_copy", "select_copy")


def late_from_inputs(gm: torch.fx.GraphModule):
    """Compute what depends on program inputs only right before it is used.

    ExecuTorch's graph is functional and materializes views: ``t(W)`` is a ``permute_copy``
    (a full copy of the weight) that the forward makes and the backward reads again, and pockc's
    in-place ``momentum.mul_(0.9)`` -- free in the aten step, scheduled early -- is a new tensor
    living until the gradient arrives. A node whose tensor inputs are all program inputs (weights,
    state, constants: alive anyway) or such nodes can run anywhere before its use, so: view copies
    are made again for each use, and every such node moves right before its first use. Its
    output then lives only at its use; nothing else lives longer."""
    from executorch.exir.pass_base import PassResult
    graph = gm.graph

    def is_view_copy(n):
        return n.op == "call_function" and any(v in str(n.target) for v in _VIEW_COPIES)

    def movable(n):
        return (n.op == "call_function" and "copy_" not in str(n.target).replace("_copy.", ".")
                and not str(n.target).endswith("copy_.default"))

    roots = {}      # derived node -> the program inputs it reads
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            roots[n] = frozenset([n])
        elif movable(n) and all(a in roots for a in n.all_input_nodes):
            roots[n] = frozenset().union(*(roots[a] for a in n.all_input_nodes))
    derived = roots

    def written(dest) -> bool:      # a copy_ into one of these inputs
        return dest.op == "call_function" and "copy_" in str(dest.target) and not movable(dest)

    def clear_between(n, u) -> bool:
        """No write into an input ``n`` reads between ``n`` and ``u`` (the position it moves to)."""
        r, m = roots[n], n.next
        while m is not u and m.op != "root":
            if written(m) and m.args and m.args[0] in r:
                return False
            m = m.next
        return True

    def remake(n, made):
        """A copy of the view-copy chain ending at ``n``, over the same program input."""
        if n in made:
            return made[n]
        made[n] = graph.node_copy(n, lambda a: remake(a, made) if a in derived and is_view_copy(a) else a)
        roots[made[n]] = roots[n]
        return made[n]

    changed = False
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in list(graph.nodes):       # a view copy per use
        if n in derived and is_view_copy(n) and len(n.users) > 1:
            for u in sorted(n.users, key=order.get)[1:]:
                if u.op == "output" or not clear_between(n, u):
                    continue
                with graph.inserting_before(u):
                    fresh = remake(n, {})
                u.replace_input_with(n, fresh)
                changed = True
    for n in reversed(list(graph.nodes)):   # each right before its first use (users moved first)
        if n.op != "call_function" or n not in derived or not n.users:
            continue
        users, first = n.users, n.next
        while first.op != "root" and first not in users:
            first = first.next
        if first.op in ("root", "output") or first is n.next or not clear_between(n, first):
            continue
        first.prepend(n)
        changed = True
    if changed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return PassResult(gm, changed)


def pockc_memory_algo(alignment, specs, graph_module, graph_signature, extra_padding=0):
    """ExecuTorch memory-planning algorithm (``MemoryPlanningPass(memory_planning_algo=...)``):
    places the tensors of each memory id with pockc's arena search (runtime/arena.py: the best of
    several greedy orders) and with ExecuTorch's own greedy planner, and keeps the smaller layout
    (ExecuTorch's MemoryPlanningAlgorithmSuite picks it). Returns the size of each memory id."""
    from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite, greedy
    return MemoryPlanningAlgorithmSuite([_pockc_layout, greedy])(alignment, specs, graph_module, graph_signature,
                                                                  extra_padding)


def _pockc_layout_sizes(alignment, specs, graph_module, graph_signature, extra_padding=0):
    """pockc's arena search alone, as a memory_planning_algo (for tests: ExecuTorch's verifier)."""
    from executorch.exir.memory_planning import MemoryPlanningAlgorithmSuite
    return MemoryPlanningAlgorithmSuite([_pockc_layout])(alignment, specs, graph_module, graph_signature, extra_padding)


def _pockc_layout(alignment, specs, graph_module, graph_signature, extra_padding=0):
    """pockc's arena search over ExecuTorch's tensor specs, as an ExecuTorch MemoryAlgoResult."""
    from executorch.exir.memory_planning import MemoryAlgoResult, SpecAllocResult
    result = MemoryAlgoResult({}, [])
    by_mem, based = {}, []
    for spec in specs:
        mem_id = 1 if spec.mem_id is None else spec.mem_id
        result.spec_dict[spec] = SpecAllocResult(mem_id, 0, 0)
        spec.realign(alignment)
        (based if spec.storage_base is not None else by_mem.setdefault(mem_id, [])).append(spec)
    start_sizes = getattr(graph_module, "input_mem_buffer_sizes", None) or []
    sizes = [0] * (max(list(by_mem) + [1]) + 1)
    for mem_id, group in by_mem.items():
        base = start_sizes[mem_id] if mem_id < len(start_sizes) else 0
        items = [(int(s.lifetime[0]), int(s.lifetime[1]), int(s.allocated_memory)) for s in group]
        top, order, offsets = pack(items)
        for k, (i, off) in enumerate(zip(order, offsets)):
            r = result.spec_dict[group[i]]
            r.mem_offset, r.mem_obj_id = base + off, k
        sizes[mem_id] = base + top + extra_padding
    todo = based
    while todo:     # views planned inside their base: its offset plus theirs
        left = [s for s in todo if s.storage_base in todo]
        for spec in todo:
            if spec not in left:
                r, rb = result.spec_dict[spec], result.spec_dict[spec.storage_base]
                r.mem_id, r.mem_obj_id = rb.mem_id, rb.mem_obj_id
                r.mem_offset = rb.mem_offset + spec.storage_base_offset
        if len(left) == len(todo):
            raise StepError("ExecuTorch memory planning: a circular storage_base chain")
        todo = left
    result.bufsizes = sizes
    return result


def _frozen_xnnpack_partitioner():
    """XNNPACK's partitioner, keeping only the partitions that read no tensor the step trains or
    updates: XNNPACK packs the weights it is handed when the program loads, and a partition over a
    trained weight crashed the runtime (executorch 1.5.1, observed: a segmentation fault on the
    first call for a trained convolution with its batch norm)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class FrozenXnnpackPartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep):
            sig = ep.graph_signature
            mutated = set(sig.buffers_to_mutate.values()) | set(sig.parameters_to_mutate.values())
            written = {name for name, fqn in sig.inputs_to_buffers.items() if fqn in mutated}
            return [p for p in super().generate_partitions(ep)
                    if not any(a.op == "placeholder" and a.name in written for n in p.nodes for a in n.all_input_nodes)]
    return FrozenXnnpackPartitioner()


def _exact_init_pass(names):
    """Mark the mutable buffers ``names`` (exactly: ``b_<name>`` placeholders) to keep their
    initial values (ExecuTorch's InitializedMutableBufferPass matches substrings)."""
    from executorch.exir.pass_base import ExportPass
    wanted = {f"b_{n}" for n in names} | set(names)

    class _InitBuffers(ExportPass):
        def placeholder(self, name, arg, meta):
            if name in wanted:
                meta["et_init_buffer"] = True
            return super().placeholder(name, arg, meta)
    return _InitBuffers()


# -- export ---------------------------------------------------------------------------------
class _TensorsModule(torch.nn.Module):
    """Holds the step's tensors as buffers under their manifest names."""

    def __init__(self, names, tensors):
        super().__init__()
        self._names = list(names)
        for name, t in zip(names, tensors):
            self.register_buffer(name, t)


class _PredictModule(_TensorsModule):
    """The model in eval mode over the step's tensors (``functional_call``)."""

    def __init__(self, model, names, tensors, model_names):
        super().__init__(names, tensors)
        self.model = model
        self._model_names = dict(zip(model_names, names))

    def forward(self, *args):
        bufs = self._buffers
        return torch.func.functional_call(self.model, {k: bufs[v] for k, v in self._model_names.items()}, args,
                                          strict=False)


class _StateModule(_TensorsModule):
    def forward(self):
        return tuple(self._buffers[n].clone() for n in self._names)


def _decompose(ep):
    from torch._decomp import get_decompositions
    aten = torch.ops.aten
    return ep.run_decompositions(get_decompositions([aten._native_batch_norm_legit_functional.default,
                                                     aten._native_batch_norm_legit.default,
                                                     aten._native_batch_norm_legit.no_stats]))


def _set_modes(model, training: bool):
    saved = [(m, m.training) for m in model.modules()]
    for m, _ in saved:
        m.training = training
    return lambda: [setattr(m, "training", t) for m, t in saved]


def export_executorch(step, path, example_batch=None, *, predict=True, predict_inputs=None, xnnpack: bool = False,
                      memory_planning: str = "pockc", budget=None) -> str:
    """Write ``step`` (a :class:`~pockc.runtime.train_step.TrainStep`) as the ExecuTorch program
    ``path`` (a ``.pte``, see the module docstring); returns the path written.

    ``example_batch``: the batch the program is specialized to (default: the step's compile-time
    example; shapes are static). ``predict``: add the ``forward`` method, the model in eval mode
    over ``predict_inputs`` (default: the batch's first element, when it is a tensor).
    ``xnnpack``: delegate what XNNPACK takes to it. ``memory_planning``: ``"pockc"`` (default:
    pockc's arena search) or ``"greedy"`` (ExecuTorch's own). ``budget`` (bytes or ``"256KB"``):
    an ArenaOverBudget error, and nothing written, when the train step's planned arena is larger. The
    program holds copies of the step's current tensors and its step count; the write is atomic.
    """
    _import()
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    path, directory = check_export_path(path, ".pte", "an ExecuTorch program")
    if memory_planning not in ("pockc", "greedy"):
        raise ValueError(f"memory_planning must be 'pockc' or 'greedy', not {memory_planning!r}")
    budget_bytes = None if budget is None else parse_size(budget)   # ValueError for a malformed one
    if step.comm is not None:
        raise StepError("step.export(target='executorch') cannot export a data-parallel step (its program calls "
                        "torch.distributed collectives): compile it with distributed=False to export it")
    if step.accumulate > 1:
        raise StepError(f"step.export(target='executorch') cannot export a step with accumulate={step.accumulate} "
                        "(it runs two programs): compile the model without accumulate= to export it")
    if getattr(step, "precision", "fp32") != "fp32":
        raise StepError("step.export(target='executorch') exports float32 steps; compile with precision='fp32'")
    t0 = time.perf_counter()
    with step._lock:
        batch = tuple(step._example if example_batch is None else example_batch)
        if not batch_tensors(batch):
            raise StepError("export(target='executorch') needs an example batch: pass example_batch=(x, y)")
        gm = step.portable_graph(batch)
        if draws_random(gm):
            raise StepError("the step draws random numbers (dropout): ExecuTorch's kernels draw them with their own "
                            "generator; put the dropout layers in eval mode (model.eval() on them) and compile again "
                            "to export it")
        flat = [t.detach().contiguous() for t in batch_tensors(batch)]
        inputs = step.inputs(tuple(flat))
        rows = _tensor_plan(step, inputs)
        lay = step.layout
        n_tensors = len(rows)
        tensors = [t.detach().clone().contiguous() for t in inputs[:n_tensors]]
        step_count = step.step_count
        scalars = step.optimizer.scalars(step.update_count if step.accumulate > 1 else step_count)
        scalar_inputs = [torch.tensor(scalars[s], dtype=torch.float64) for s in lay.scalars]
        opt_dict = step.optimizer.to_dict()
        sig_json = signature_to_json(batch_signature(batch))
    names = [r[0] for r in rows]
    mutable = [r[0] for r in rows if r[2] != "frozen"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # torch's and executorch's deprecation notices while exporting
        programs = {TRAIN: _decompose(torch.export.export(_StepModule(gm, names, tensors),
                                                          tuple(scalar_inputs + flat), strict=False))}
        pred_rows, pred_args = [], None
        if predict:
            pred_args = _predict_args(batch, predict_inputs)
            pred_rows = [(r, t) for r, t in zip(rows, tensors) if r[2] != "state"]
            model = copy.deepcopy(step.model)
            restore = _set_modes(model, False)
            try:
                pm = _PredictModule(model, [r[0] for r, _ in pred_rows], [t for _, t in pred_rows],
                                    [r[1] for r, _ in pred_rows])
                try:
                    programs[PREDICT] = _decompose(torch.export.export(pm, pred_args, strict=False))
                except Exception as e:  # noqa: BLE001 -- the user's model on the given inputs
                    raise StepError(f"export(target='executorch'): the model in eval mode does not run on the predict "
                                    f"inputs ({type(e).__name__}: {str(e).splitlines()[0][:300]}); pass "
                                    f"predict_inputs=(x,) or predict=False") from None
            finally:
                restore()
        state_rows = [(r, t) for r, t in zip(rows, tensors) if r[2] != "frozen"]
        programs[STATE] = torch.export.export(_StateModule([r[0] for r, _ in state_rows],
                                                           [t for _, t in state_rows]), (), strict=False)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "pockc": _version(), "torch": torch.__version__,
            "executorch": executorch_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "step_count": step_count, "optimizer": opt_dict, "layout": lay.to_json(),
            "batch_signature": sig_json, "batch_args": len(batch), "batch_tensors": len(flat),
            "tensors": [{"constant": r[0], "name": r[1], "role": r[2], "state": r[3], "shape": list(t.shape),
                         "dtype": str(t.dtype).replace("torch.", "")} for r, t in zip(rows, tensors)],
            "state_method": [r[0] for r, _ in state_rows], "scalars": list(lay.scalars),
            "predict": None if pred_args is None else {
                "inputs": [{"shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")} for a in pred_args]},
            "xnnpack": bool(xnnpack), "memory_planning": "greedy" if xnnpack else memory_planning,
        }
        config = EdgeCompileConfig(_core_aten_ops_exception_list=[torch.ops.aten.var_mean.correction])
        manifest["export_seconds"] = round(time.perf_counter() - t0, 3)
        data = json.dumps(manifest, default=str).encode()
        consts = {MANIFEST: torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()}
        if xnnpack:
            edge = to_edge_transform_and_lower(programs, partitioner=[_frozen_xnnpack_partitioner()],
                                               compile_config=config, constant_methods=consts)
        else:
            edge = to_edge(programs, compile_config=config, constant_methods=consts)
        ours = memory_planning == "pockc" and not xnnpack   # see the module docstring (XNNPACK)
        algo = pockc_memory_algo if ours else None
        passes = [_exact_init_pass(mutable)] + ([late_from_inputs, write_back_early] if ours else [])
        et = edge.to_executorch(ExecutorchBackendConfig(
            passes=passes, memory_planning_pass=MemoryPlanningPass(memory_planning_algo=algo,
                                                                   share_mutable_buffers=True)))
        buffer = et.buffer
    rep = program_report(buffer)
    missing = _missing_kernels(rep["methods"])
    if missing:
        raise StepError(f"export(target='executorch'): the program needs ops that ExecuTorch's runtime has no "
                        f"kernel for: {', '.join(missing)}")
    arena = rep["methods"][TRAIN]["arena"]
    if budget_bytes is not None and arena > budget_bytes:
        raise ArenaOverBudget(f"the ExecuTorch program's train_step arena is {format_bytes(arena)} "
                          f"({rep['methods'][TRAIN]['activations']:,} B of activations and temporaries, "
                          f"{rep['methods'][TRAIN]['state']:,} B of trained state), over the budget of "
                          f"{format_bytes(budget_bytes)}; nothing was written")
    out = atomic_write(path, buffer)
    remove_stale_temps(directory)
    fsync_dir(directory)
    return out


def _predict_args(batch, predict_inputs):
    if predict_inputs is not None:
        args = tuple(predict_inputs) if isinstance(predict_inputs, (tuple, list)) else (predict_inputs,)
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise StepError("predict_inputs must be a tensor or a tuple of tensors (the model's forward arguments)")
        return tuple(a.detach().contiguous() for a in args)
    if not isinstance(batch[0], torch.Tensor):
        raise StepError("export(target='executorch'): the batch's first element is not a tensor, so pockc cannot "
                        "tell the model's inputs: pass predict_inputs=(...) or predict=False")
    return (batch[0].detach().contiguous(),)


def program_report(data) -> dict:
    """What an ExecuTorch program (its bytes, or a path) holds, read back from its flatbuffer:
    per method the planned arena (``non_const_buffer_sizes``: id 1 activations and temporaries,
    id 2 the mutable state its methods share; ``arena`` is their sum), the kernels it calls and
    the delegates (XNNPACK) it hands work to; and the program's size."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            data = f.read()
    prog = deserialize_pte_binary(bytes(data)).program
    methods = {}
    for plan in prog.execution_plan:
        sizes = [int(x) for x in plan.non_const_buffer_sizes]
        act = sizes[1] if len(sizes) > 1 else 0
        state = sum(sizes[2:])
        methods[plan.name] = {
            "activations": act, "state": state, "arena": act + state, "buffer_sizes": sizes,
            "kernels": sorted({f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}),
            "delegates": sorted({d.id for d in plan.delegates})}
    return {"methods": methods, "program_bytes": len(data)}


def _missing_kernels(methods) -> list:
    try:
        from executorch.extension.pybindings import portable_lib
        have = set(portable_lib._get_operator_names())
    except Exception:  # noqa: BLE001 -- no Python runtime: nothing to check against
        return []
    need = {k for m in methods.values() for k in m["kernels"]}
    return sorted(k for k in need if k not in have)


# -- load -----------------------------------------------------------------------------------
def load_executorch(path, *, strict_versions: bool = True) -> "ExecutorchStep":
    """An :class:`ExecutorchStep` that continues training from the program ``path`` (written by
    :func:`export_executorch`), run by ExecuTorch's Python runtime (``executorch.runtime``)."""
    _import()
    from executorch.runtime import Runtime
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ArtifactError(f"{path}: is a directory, not an ExecuTorch program (.pte)")
    try:
        program = Runtime.get().load_program(path)
    except Exception as e:  # noqa: BLE001 -- the runtime's RuntimeError with an error code
        raise ArtifactError(f"{path}: not a loadable ExecuTorch program ({str(e).splitlines()[0][:200]})") from None
    if MANIFEST not in program.method_names or TRAIN not in program.method_names:
        raise ArtifactError(f"{path}: an ExecuTorch program, but not a pockc training step (it has no {MANIFEST} "
                            f"and {TRAIN} methods; write one with step.export(path, target='executorch'))")
    try:
        raw = program.load_method(MANIFEST).execute([])[0]
        manifest = json.loads(bytes(raw.numpy()).decode("utf-8"))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: its manifest is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: its {MANIFEST} is not a pockc ExecuTorch manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: program format version {manifest.get('format_version')}, this pockc reads "
                            f"{FORMAT_VERSION}")
    if strict_versions:
        check_versions(manifest, path, tied="export the step again with this pockc")
    return ExecutorchStep(path, program, manifest)


class ExecutorchStep(ExportedStep):
    """A training step run by ExecuTorch's runtime from a ``.pte``: ``step(*batch) -> loss``
    trains (the program holds the tensors), ``predict(*inputs)`` runs the model in eval mode over
    the trained weights, ``named_tensors(role)`` / ``trainable_parameters()`` read the trained
    tensors back (``get_state``). ``report`` (:func:`program_report`) is the program's planned
    arena and kernels per method, read from the file; ``table()`` shows them."""

    _what = "program"

    def __init__(self, path, program, manifest):
        self._read_manifest(path, manifest)
        self._program = program
        self._train = program.load_method(TRAIN)
        self._predict = program.load_method(PREDICT) if PREDICT in program.method_names else None
        self._state = program.load_method(STATE)
        self.report = program_report(path)      # arenas, kernels and delegates per method, from the file
        self.backend = "executorch"

    def _execute(self, inputs):
        return self._train.execute(inputs)

    def predict(self, *inputs):
        """The model in eval mode on ``inputs`` (the shapes given at export), over the trained weights."""
        if self._predict is None:
            raise StepError(f"{self.source}: exported without a predict method (predict=False)")
        want = self.manifest["predict"]["inputs"]
        if len(inputs) != len(want) or any(list(a.shape) != w["shape"] for a, w in zip(inputs, want)):
            raise BatchError(f"{self.source}: predict takes {len(want)} tensor(s) of shape(s) "
                             f"{', '.join(str(w['shape']) for w in want)} (static shapes), got "
                             f"{', '.join(str(list(a.shape)) for a in inputs)}")
        with self._lock:
            out = self._predict.execute([a.detach().contiguous() for a in inputs])
        return out[0] if len(out) == 1 else tuple(out)

    def _tensors(self) -> dict:
        with self._lock:
            values = self._state.execute([])
        return dict(zip(self.manifest["state_method"], values))

    def named_tensors(self, role: str) -> dict:
        """name -> a copy of the program's current tensor for ``role`` in param (trained), buffer,
        state (``(name, state name)`` keys); frozen tensors are the program's constants."""
        if role not in ("param", "buffer", "state"):
            raise ValueError(f"role must be 'param', 'buffer' or 'state' (frozen tensors are constants of the "
                             f"program), not {role!r}")
        vals = self._tensors()
        out = {}
        for row in self.manifest["tensors"]:
            if row["role"] == role:
                key = (row["name"], row["state"]) if role == "state" else row["name"]
                out[key] = vals[row["constant"]]
        return out

    @property
    def state(self) -> dict:
        return self.named_tensors("state")

    def trainable_parameters(self) -> dict:
        """name -> the trained tensor (only the selected rows, for a channel-sparse one)."""
        from .train_step import selected_rows
        params = self.named_tensors("param")
        return {name: selected_rows(params[name], sel) for name, sel in self.layout.grads}

    def table(self) -> str:
        """The program's methods: planned arena (activations, shared trained state) and where
        their ops run (portable kernels, XNNPACK)."""
        from tabulate import tabulate
        rows = [[name, f"{m['activations']:,}", f"{m['state']:,}", f"{m['arena']:,}", len(m["kernels"]),
                 ", ".join(m["delegates"]) or "-"] for name, m in self.report["methods"].items() if name != MANIFEST]
        return tabulate(rows, headers=["method", "activations B", "shared state B", "arena B", "kernels", "delegates"])

    def __repr__(self):
        return (f"ExecutorchStep({os.path.basename(self.source)}, trains {len(self.layout.grads)} tensors, "
                f"{type(self.optimizer).__name__}, step {self.step_count})")
