"""pockc: a compile-time sparse-backprop fine-tuning compiler for PyTorch.

>>> import pockc
>>> step = pockc.compile(model, loss_fn, example_batch=(x, y), update="last:2",
...                      optimizer=pockc.SGD(lr=0.1, momentum=0.9))   # doctest: +SKIP
>>> loss = step(x, y)                                                  # doctest: +SKIP
>>> step.save("build/step")                                            # doctest: +SKIP
>>> step = pockc.load("build/step")     # torch + pockc.runtime only   # doctest: +SKIP

The compiler (``compile``, ``finetune``, ``score_layers``, ...) is imported on first use, so that
``import pockc`` and ``pockc.load`` run a saved step where only ``pockc.runtime`` is needed; torch itself is imported
when a name that needs it is first used.
"""
from importlib import import_module

from pockc.errors import ArtifactError, BatchError, BudgetError, CompileError, PlanError, StepError
from pockc.runtime import __version__  # noqa: F401

# name -> the module that defines it, imported when the name is first used (``import pockc`` does
# not import torch: the command line answers --help and Ctrl-C at once)
_LAZY = {
    "load": "pockc.runtime", "SGD": "pockc.runtime.optim", "AdamW": "pockc.runtime.optim",
    "Optimizer": "pockc.runtime.optim", "TrainStep": "pockc.runtime.train_step",
    "compile": "pockc.api", "graph_stats": "pockc.api",
    "Rule": "pockc.plan", "UpdatePlan": "pockc.plan", "resolve_update": "pockc.plan",
    "score_layers": "pockc.scoring", "LayerScores": "pockc.scoring",
    "finetune": "pockc.finetune", "FinetuneStep": "pockc.finetune",
    "Distributed": "pockc.distributed",
    "LoraConfig": "pockc.lora", "load_adapter": "pockc.lora", "merge_lora": "pockc.lora",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pockc' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["compile", "graph_stats", "load", "CompileError", "PlanError", "BudgetError", "BatchError", "StepError",
           "ArtifactError", "UpdatePlan", "Rule", "resolve_update", "SGD", "AdamW", "Optimizer", "TrainStep",
           "score_layers", "LayerScores", "finetune", "FinetuneStep", "Distributed", "LoraConfig", "load_adapter", "merge_lora"]
