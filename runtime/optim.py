"""Optimizers that live inside the compiled training step.

Each optimizer describes, for one trained tensor (a whole parameter or its selected rows):

* ``state_names`` and ``init_state(t)`` -- the state tensors it keeps (zeros, shaped like ``t``);
* ``scalar_names`` and ``scalars(step_count)`` -- host-side numbers that change from step to step
  (learning rate, bias corrections); they enter the graph as 0-d float64 tensors, so changing
  ``optimizer.lr`` between steps takes effect without recompiling;
* ``update(p, g, state, scalars)`` -- plain torch code, traced into the graph, that updates ``p``
  and the state in place;
* ``update_foreach(ps, gs, states, scalars)`` -- the same arithmetic over lists of tensors with
  ``torch._foreach_*`` ops (``states`` maps a state name to a list), one dispatch per operation for
  the whole list: pockc uses it for many small trained tensors (biases, norm affines), whose
  per-tensor updates cost more in per-op overhead than in arithmetic (see passes/insert_optimizer).
  It applies the same elementwise ops as ``update`` to each tensor (on CPU a foreach op loops over
  the list calling them), so the two forms give bit-identical results.

The arithmetic follows torch.optim's single-tensor (``foreach=False``) code path operation by
operation, so one compiled step matches ``torch.optim`` within float rounding.

Gradient accumulation and clipping (``pockc.compile(..., accumulate=K, max_grad_norm=X)``) add,
per trained tensor, the state ``ACCUM_STATE`` (the accumulated gradient of its trained rows) and
two scalars, ``ACCUM_ITEMS`` (the items n_i of the current micro-batch) and ``ACCUM_INV`` (1/N,
N the items of the K micro-batches); ``accumulate_grad``, ``total_grad_norm`` and
``clip_coefficient`` below are the arithmetic passes/insert_optimizer.py traces into the step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch


class Optimizer:
    """Base class: subclasses are dataclasses of hyperparameters."""

    state_names: tuple = ()
    scalar_names: tuple = ()

    def __post_init__(self):
        """Checks of the hyperparameters (subclasses); also run when a step sees them changed."""

    def init_state(self, t: torch.Tensor) -> dict:
        return {n: torch.zeros_like(t, memory_format=torch.contiguous_format) for n in self.state_names}

    def scalars(self, step_count: int) -> dict:
        raise NotImplementedError

    def update(self, p, g, state, s):
        raise NotImplementedError

    def update_foreach(self, ps, gs, states, s):
        raise NotImplementedError

    @property
    def has_foreach(self) -> bool:
        """True when ``update_foreach`` is the list form of this class's ``update`` (a subclass that
        overrides ``update`` alone keeps its per-tensor arithmetic)."""
        def owner(name):
            return next(c for c in type(self).__mro__ if name in c.__dict__)
        return owner("update_foreach") is owner("update") is not Optimizer

    runtime_fields = ("lr",)   # enter the step as per-step scalars; every other field is traced in

    def graph_key(self) -> tuple:
        """What a traced update is specialized to: the class and every hyperparameter that is not a
        per-step scalar (a change recompiles the step; ``lr`` does not)."""
        return (type(self),) + tuple(_hashable(getattr(self, f.name)) for f in fields(self)
                                     if f.name not in self.runtime_fields)

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> "Optimizer":
        d = dict(d)
        cls = {"SGD": SGD, "AdamW": AdamW}[d.pop("type")]
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


ACCUM_STATE = "grad_accum"          # sum over the cycle's micro-batches of n_i * gradient (trained rows)
ACCUM_ITEMS = "accum_items"         # n_i of this call's micro-batch
ACCUM_INV = "accum_inv_items"       # 1 / N, N = sum of n_i over the cycle (read at the update)
CLIP_EPS = 1e-6                     # torch.nn.utils.clip_grad_norm_'s


def accumulate_grad(acc, g, s):
    """``acc += n_i * g``: the micro-batch's loss is a mean over its n_i items, so ``n_i * g`` is
    the gradient of their sum; the update divides the sum by N (``ACCUM_INV``)."""
    acc.addcmul_(g, s[ACCUM_ITEMS])


def total_grad_norm(grads):
    """The L2 norm of all ``grads`` as one vector, as torch.nn.utils.clip_grad_norm_ computes it
    (per-tensor norms, then the norm of their stack)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)


def clip_coefficient(total, max_norm):
    """``min(1, max_norm / (total + 1e-6))``, the factor clip_grad_norm_ multiplies gradients by."""
    return torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)


def checked_optimizer(opt) -> "Optimizer":
    """``opt`` if it is a pockc optimizer (what ``step.optimizer = ...`` accepts), else a TypeError."""
    if not isinstance(opt, Optimizer):
        raise TypeError(f"step.optimizer must be a pockc optimizer (pockc.SGD / pockc.AdamW), "
                        f"not {type(opt).__name__}")
    return opt


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


@dataclass
class SGD(Optimizer):
    """Stochastic gradient descent with torch.optim.SGD's arguments and defaults.

    >>> opt = SGD(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    """

    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def __post_init__(self):
        _check(self.lr >= 0, f"SGD: invalid learning rate {self.lr}")
        _check(self.momentum >= 0, f"SGD: invalid momentum {self.momentum}")
        _check(self.weight_decay >= 0, f"SGD: invalid weight_decay {self.weight_decay}")
        _check(not self.nesterov or (self.momentum > 0 and self.dampening == 0),
               "SGD: nesterov momentum requires a momentum and zero dampening")

    @property
    def state_names(self):
        return ("momentum_buffer",) if self.momentum != 0 else ()

    @property
    def scalar_names(self):
        return ("neg_lr", "grad_scale") if self.momentum != 0 and self.dampening != 0 else ("neg_lr",)

    def scalars(self, step_count):
        s = {"neg_lr": -self.lr}
        if "grad_scale" in self.scalar_names:
            # torch.optim initialises the buffer with the raw gradient on the first step and
            # dampens it afterwards; the buffer starts at zero here, so scale the first gradient by 1.
            s["grad_scale"] = 1.0 if step_count == 0 else 1.0 - self.dampening
        return s

    def update(self, p, g, state, s):
        if self.maximize:
            g = torch.neg(g)
        if self.weight_decay != 0:
            g = g.add(p, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = state["momentum_buffer"]
            # Zero-initialised buffer: momentum * 0 + g == g exactly, as torch.optim's clone(g).
            buf.mul_(self.momentum)
            if "grad_scale" in s:
                buf.addcmul_(g, s["grad_scale"])
            else:
                buf.add_(g)
            g = g.add(buf, alpha=self.momentum) if self.nesterov else buf
        p.addcmul_(g, s["neg_lr"])

    def update_foreach(self, ps, gs, states, s):
        if self.maximize:
            gs = torch._foreach_neg(gs)
        if self.weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=self.weight_decay)
        if self.momentum != 0:
            bufs = states["momentum_buffer"]
            torch._foreach_mul_(bufs, self.momentum)
            if "grad_scale" in s:
                torch._foreach_addcmul_(bufs, gs, [s["grad_scale"]] * len(gs))
            else:
                torch._foreach_add_(bufs, gs)
            gs = torch._foreach_add(gs, bufs, alpha=self.momentum) if self.nesterov else bufs
        # addcmul with the 0-d learning-rate tensor, as update() does, so both forms round alike
        torch._foreach_addcmul_(ps, gs, [s["neg_lr"]] * len(ps))


@dataclass
class AdamW(Optimizer):
    """AdamW with torch.optim.AdamW's arguments and defaults (amsgrad included).

    >>> opt = AdamW(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
    """

    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False
    maximize: bool = False

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        _check(self.lr >= 0, f"AdamW: invalid learning rate {self.lr}")
        _check(self.eps >= 0, f"AdamW: invalid epsilon {self.eps}")
        _check(all(0 <= b < 1 for b in self.betas), f"AdamW: invalid betas {self.betas}")
        _check(self.weight_decay >= 0, f"AdamW: invalid weight_decay {self.weight_decay}")

    @property
    def state_names(self):
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if self.amsgrad else names

    scalar_names = ("decay", "neg_step_size", "bias_correction2_sqrt")

    def scalars(self, step_count):
        step = step_count + 1  # torch.optim increments its step before using it
        beta1, beta2 = self.betas
        return {
            "decay": 1 - self.lr * self.weight_decay,
            "neg_step_size": -self.lr / (1 - beta1 ** step),
            "bias_correction2_sqrt": math.sqrt(1 - beta2 ** step),
        }

    def update(self, p, g, state, s):
        beta1, beta2 = self.betas
        if self.maximize:
            g = torch.neg(g)
        if self.weight_decay != 0:
            p.mul_(s["decay"])
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if self.amsgrad:
            max_sq = state["max_exp_avg_sq"]
            max_sq.copy_(torch.maximum(max_sq, exp_avg_sq))
            second = max_sq
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / s["bias_correction2_sqrt"]).add_(self.eps)
        # p - step_size * exp_avg / denom, without a temporary as large as p: fold the step size
        # into denom (which is ours to overwrite) and use one addcdiv_.
        p.addcdiv_(exp_avg, denom.div_(s["neg_step_size"]))

    def update_foreach(self, ps, gs, states, s):
        beta1, beta2 = self.betas
        if self.maximize:
            gs = torch._foreach_neg(gs)
        if self.weight_decay != 0:
            torch._foreach_mul_(ps, s["decay"])
        exp_avgs, exp_avg_sqs = states["exp_avg"], states["exp_avg_sq"]
        torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, gs, gs, value=1 - beta2)
        if self.amsgrad:
            second = states["max_exp_avg_sq"]
            torch._foreach_maximum_(second, exp_avg_sqs)
        else:
            second = exp_avg_sqs
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, s["bias_correction2_sqrt"])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_div_(denom, s["neg_step_size"])
        torch._foreach_addcdiv_(ps, exp_avgs, denom)
