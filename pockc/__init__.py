"""pockc: a compile-time sparse-backprop fine-tuning compiler for PyTorch.

>>> import pockc
>>> step = pockc.compile(model, loss_fn, example_batch=(x, y), update="last:2",
...                      optimizer=pockc.SGD(lr=0.1, momentum=0.9))   # doctest: +SKIP
>>> loss = step(x, y)                                                  # doctest: +SKIP
"""
from pockc.api import compile, graph_stats
from pockc.errors import BatchError, CompileError, PlanError
from pockc.plan import Rule, UpdatePlan, resolve_update
from pockc.runtime.optim import SGD, AdamW, Optimizer
from pockc.runtime.train_step import TrainStep

__version__ = "0.1.0"
__all__ = ["compile", "graph_stats", "CompileError", "PlanError", "BatchError", "UpdatePlan", "Rule",
           "resolve_update", "SGD", "AdamW", "Optimizer", "TrainStep"]
