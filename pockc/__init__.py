"""pockc: a compile-time sparse-backprop fine-tuning compiler for PyTorch.

>>> import pockc
>>> step = pockc.compile(model, loss_fn, example_batch=(x, y), update="last:2",
...                      optimizer=pockc.SGD(lr=0.1, momentum=0.9))   # doctest: +SKIP
>>> loss = step(x, y)                                                  # doctest: +SKIP
"""
from pockc.api import compile, graph_stats
from pockc.errors import BatchError, BudgetError, CompileError, PlanError, StepError
from pockc.plan import Rule, UpdatePlan, resolve_update
from pockc.runtime.optim import SGD, AdamW, Optimizer
from pockc.scoring import LayerScores, score_layers
from pockc.runtime.train_step import TrainStep
from pockc.finetune import FinetuneStep, finetune  # noqa: E402  (LLM fine-tuning API, issue 5)
from pockc.lora import LoraConfig, load_adapter, merge_lora  # noqa: E402

__version__ = "0.1.0"
__all__ = ["compile", "graph_stats", "CompileError", "PlanError", "BudgetError", "BatchError", "StepError", "UpdatePlan", "Rule",
           "resolve_update", "SGD", "AdamW", "Optimizer", "TrainStep"]
__all__ += ["score_layers", "LayerScores"]
__all__ += ["finetune", "FinetuneStep", "LoraConfig", "load_adapter", "merge_lora"]
