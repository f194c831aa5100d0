"""pockc's runtime: executes and stores a compiled step. Imports torch (and safetensors) and this
package only: a saved step (``pockc.load``) runs without the compiler."""
__version__ = "0.1.0"

from .errors import ArtifactError, BatchError, StepError  # noqa: E402
from .optim import SGD, AdamW, Optimizer  # noqa: E402
from .train_step import TrainStep  # noqa: E402


def load(path, **kwargs):
    """Load a step saved with ``step.save(path)`` (a directory) or exported with
    ``step.export(path, target="aoti")`` (a ``.pt2``); see runtime/artifact.py for the options."""
    from .artifact import load as _load
    return _load(path, **kwargs)


__all__ = ["ArtifactError", "BatchError", "StepError", "SGD", "AdamW", "Optimizer", "TrainStep", "load",
           "__version__"]
