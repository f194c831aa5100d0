"""pockc's runtime: executes and stores a compiled step. Imports torch (and safetensors) and this
package only: a saved step (``pockc.load``) runs without the compiler. Names that need torch are
imported on first use."""
__version__ = "0.1.0"

from importlib import import_module

from .errors import ArtifactError, BatchError, StepError  # noqa: E402

_LAZY = {"SGD": ".optim", "AdamW": ".optim", "Optimizer": ".optim", "TrainStep": ".train_step"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pockc.runtime' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def load(path, **kwargs):
    """Load a step saved with ``step.save(path)`` (a directory) or exported with
    ``step.export(path, target="aoti")`` (a ``.pt2``); see runtime/artifact.py for the options."""
    from .artifact import load as _load
    return _load(path, **kwargs)


__all__ = ["ArtifactError", "BatchError", "StepError", "SGD", "AdamW", "Optimizer", "TrainStep", "load",
           "__version__"]
