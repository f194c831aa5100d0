"""pockc's runtime: executes a compiled step. Imports torch and this package only."""
from .errors import BatchError
from .optim import SGD, AdamW, Optimizer
from .train_step import TrainStep

__all__ = ["BatchError", "SGD", "AdamW", "Optimizer", "TrainStep"]
