"""Front end: trace a model + loss into aten graphs with make_fx over torch.func.

``analyze_forward`` runs the loss once under fake tensors to learn the modules' execution order
and validate the loss; ``trace_joint`` records forward and the backward of exactly the trained
tensors (autograd itself only walks paths that reach a tensor that requires grad, so frozen
parameters get no gradient and nothing below the earliest trained layer is differentiated).
Failures become CompileError naming the module, the user's source line and what to do.
"""
from __future__ import annotations

import os
import traceback
import warnings
from contextlib import contextmanager

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from pockc.errors import CompileError
from pockc.runtime.batch import batch_tensors, rebuild_batch
from pockc.runtime.layout import Layout  # noqa: F401  (the step's input order; runtime reads it)

_TORCH_DIR = os.path.dirname(torch.__file__)
_POCKC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _LossModule(torch.nn.Module):
    """Wraps ``loss_fn(model, *batch)`` so torch.func.functional_call can substitute tensors."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.model, *batch)


@contextmanager
def _module_tracker(model):
    """Record module execution order and the stack of modules being run."""
    names = {id(m): n for n, m in model.named_modules()}
    order, stack = [], []

    def pre(mod, args):
        n = names.get(id(mod))
        if n is not None:
            if n not in order:
                order.append(n)
            stack.append((n, type(mod).__name__))

    def post(mod, args, out):
        if names.get(id(mod)) is not None and stack:
            stack.pop()

    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    try:
        yield order, stack
    finally:
        h1.remove()
        h2.remove()


def _user_frame(exc):
    frames = getattr(exc, "pockc_frames", None) or traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        f = os.path.abspath(fr.filename)
        if not f.startswith(_TORCH_DIR) and not f.startswith(os.path.join(_POCKC_DIR, "pockc")) \
                and not f.startswith(os.path.join(_POCKC_DIR, "passes")) and "<" not in fr.filename:
            return f"{os.path.basename(fr.filename)}:{fr.lineno}: {(fr.line or '').strip()}"
    return None


def _explain(exc, stack, what):
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    data_dep = ("DataDependent" in name or "GuardOnDataDependent" in name or "DynamicOutputShape" in name
                or "data-dependent" in str(exc).lower() or "data dependent" in str(exc).lower()
                or "data is not allocated yet" in text)   # a kernel read a traced tensor's values
    if isinstance(exc, _OpCheck):
        reason, hint = exc.reason, exc.hint
    elif data_dep:
        reason = ("data-dependent Python control flow or a tensor value read on the host "
                  "(if on a tensor, .item(), .tolist(), nonzero, boolean-mask indexing)")
        hint = "make the control flow depend on shapes only, or use torch.where / masking instead"
    elif "Unsupported" in name or "no fake" in text.lower() or "meta" in text.lower():
        reason = f"an operation pockc cannot trace ({text})"
        hint = "replace it with standard torch operations or register a fake/meta kernel for it"
    else:
        reason = f"{name}: {text}"
        hint = "check that loss_fn(model, *example_batch) runs in eager PyTorch"
    where = f" in module '{stack[-1][0]}' ({stack[-1][1]})" if stack and stack[-1][0] else (
        f" in the model ({stack[-1][1]})" if stack else "")
    src = _user_frame(exc)
    at = f" at {src}" if src else ""
    return CompileError(f"cannot {what}{where}{at}: {reason}; {hint}")


class _OpCheck(Exception):
    """An op that would fail or be wrong at run time, found while tracing (see _OpChecks)."""

    def __init__(self, reason, hint):
        super().__init__(reason)
        self.reason, self.hint = reason, hint
        self.pockc_frames = traceback.extract_stack()


_F = torch.nn.functional
# Functions whose kernels need every floating-point operand in one dtype (meta kernels do not
# check it, so a traced graph would fail only at its first real step).
_SAME_DTYPE = {_F.linear, _F.bilinear, _F.conv1d, _F.conv2d, _F.conv3d, _F.conv_transpose1d, _F.conv_transpose2d,
               _F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.mv,
               torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.matmul, torch.Tensor.mm,
               torch.Tensor.bmm, torch.einsum}


def _dtype_name(dt):
    return str(dt).replace("torch.", "")


class _OpChecks(torch.overrides.TorchFunctionMode):
    """While the loss is traced under fake tensors: an op whose operands' dtypes differ (an int64 or
    float64 batch into a float32 Linear), and an op whose output shape depends on tensor values
    (nonzero, boolean-mask indexing), become one actionable error naming the module and line."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SAME_DTYPE and not _autocast():
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            kinds = {t.dtype for t in tensors if t.dtype != torch.bool}
            if len(kinds) > 1:
                dts = ", ".join(_dtype_name(t.dtype) for t in tensors)
                raise _OpCheck(f"{getattr(func, '__name__', func)} gets operands of different dtypes ({dts})",
                               "cast the batch to the model's dtype (e.g. x.float()) or the model to the batch's "
                               "(model.double()) before compiling")
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _unbacked(t):
                raise _OpCheck(f"{getattr(func, '__name__', func)} returns a tensor whose shape depends on the "
                               "values of its input (data-dependent shape: nonzero, boolean-mask indexing, "
                               "unique, masked_select)",
                               "a compiled step has static shapes: use torch.where or multiply by a mask "
                               "instead of selecting elements")
        return out


def _autocast():
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _unbacked(t):
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    try:
        return bool(free_unbacked_symbols(t.shape))
    except Exception:  # noqa: BLE001 -- a tensor subclass without symbolic sizes
        return False


def _check_loss(loss):
    if not isinstance(loss, torch.Tensor):
        raise CompileError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise CompileError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}; "
                           "reduce it with .mean() or .sum()")
    if not loss.is_floating_point():
        raise CompileError(f"loss_fn must return a floating-point scalar, got {loss.dtype}")


def _make_fx(fn, args, model, what):
    with _module_tracker(model) as (order, stack), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _OpChecks():
                gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
        except CompileError:
            raise
        except Exception as e:  # noqa: BLE001 -- translated into an actionable message
            raise _explain(e, stack, what) from e
    return gm, list(order)


def _state_values(model):
    """Parameters and buffers as detached aliases, keyed for functional_call on _LossModule."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [f"model.{n}" for n, _ in named], [t.detach() for _, t in named]


def analyze_forward(model, loss_fn, batch):
    """Trace the loss once (fake tensors, no compute, the model's tensors untouched).
    Returns the module execution order."""
    wrapper = _LossModule(model, loss_fn)
    batch = tuple(batch)       # loss_fn's positional arguments (functional_call wants a tuple)
    tensors = batch_tensors(batch)
    keys, values = _state_values(model)

    def fwd(*flat):
        state = dict(zip(keys, flat[:len(keys)]))
        loss = torch.func.functional_call(wrapper, state, rebuild_batch(batch, flat[len(keys):]),
                                          strict=False, tie_weights=True)
        _check_loss(loss)
        return loss

    with torch.no_grad():
        _, order = _make_fx(fwd, values + tensors, model, "trace the model")
    return order


def trace_joint(model, loss_fn, batch, plan):
    """Joint graph ``(params, frozen, buffers, batch) -> (loss, *grads)``.

    Gradients of channel-sparse tensors are emitted as a row selection of the full gradient;
    passes.prune_backward pushes that selection into the op that computes the gradient.
    """
    wrapper = _LossModule(model, loss_fn)
    named_p = dict(model.named_parameters())
    named_b = dict(model.named_buffers())
    trained = plan.trainable_names()
    if not trained:
        raise CompileError("the update plan trains nothing; choose a policy such as 'full', 'bias' or 'last:1'")
    frozen = [n for n in named_p if n not in trained]
    buffers = list(named_b)
    batch = tuple(batch)       # loss_fn's positional arguments (functional_call wants a tuple)
    tensors = batch_tensors(batch)
    layout = Layout(params=trained, frozen=frozen, buffers=buffers, batch=len(tensors))
    sels = {n: plan.selection(n) for n in trained}
    n_p, n_f, n_b = len(trained), len(frozen), len(buffers)

    def joint(*flat):
        tp = flat[:n_p]
        values = {f"model.{n}": t for n, t in zip(trained + frozen + buffers, flat[:n_p + n_f + n_b])}
        bt = flat[n_p + n_f + n_b:]
        with torch.enable_grad():
            loss = torch.func.functional_call(wrapper, values, rebuild_batch(batch, bt), strict=False,
                                              tie_weights=True)
            _check_loss(loss)
            grads = torch.autograd.grad(loss, tp, allow_unused=True)
        outs = []
        layout.grads.clear()
        layout.unused.clear()
        for name, g in zip(trained, grads):
            if g is None:
                layout.unused.append(name)
                continue
            if g.layout != torch.strided:
                raise CompileError(f"the gradient of '{name}' is a {str(g.layout).replace('torch.', '')} tensor "
                                   "(nn.Embedding / F.embedding with sparse=True?); pockc updates dense tensors "
                                   "only: use sparse=False")
            sel = sels[name]
            if sel is not None:
                if sel[0] == "slice":
                    g = torch.ops.aten.slice.Tensor(g, 0, sel[1], sel[2])
                else:
                    g = torch.ops.aten.index_select.default(g, 0, torch.tensor(sel[1], dtype=torch.long))
            outs.append(g)
            layout.grads.append((name, sel))
        return (loss.detach(), *outs)

    args = ([named_p[n].detach().requires_grad_(True) for n in trained]
            + [named_p[n].detach() for n in frozen] + [named_b[n].detach() for n in buffers] + tensors)
    gm, _ = _make_fx(joint, args, model, "differentiate the model")
    if not layout.grads:
        raise CompileError("none of the trained parameters affects the loss; choose layers the loss depends on")
    _name_placeholders(gm, layout)
    _mark_roles(gm)
    return gm, layout


def _safe(name):
    return "".join(c if c.isalnum() else "_" for c in name)


def _name_placeholders(gm: fx.GraphModule, layout: Layout):
    names = ([f"p_{_safe(n)}" for n in layout.params] + [f"frozen_{_safe(n)}" for n in layout.frozen]
             + [f"buf_{_safe(n)}" for n in layout.buffers] + [f"batch_{i}" for i in range(layout.batch)])
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(phs) == len(names), (len(phs), len(names))
    for node, name in zip(phs, names):
        node._rename(name)
        node.target = node.name
    gm.recompile()


def _mark_roles(gm: fx.GraphModule):
    """node.meta['pockc.role']: 'forward' up to the loss, 'backward' from the first node that
    depends on the loss (autograd starts there; make_fx records in execution order)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    loss_detach = out.args[0][0]
    loss = loss_detach.args[0]
    role = "forward"
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["pockc.role"] = "input"
            continue
        if role == "forward" and node is not loss and _depends_on(node, loss) and node is not loss_detach:
            role = "backward"
        node.meta["pockc.role"] = role
    loss_detach.meta["pockc.role"] = "forward"


def _depends_on(node, target):
    return any(a is target for a in node.all_input_nodes)
