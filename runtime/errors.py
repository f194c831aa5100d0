"""Errors the runtime raises; pockc re-exports them."""


class BatchError(ValueError):
    """A batch whose structure, rank or dtype differs from what the step was compiled for."""


class StepError(ValueError):
    """A change after compiling that the compiled step cannot follow (another optimizer's state)."""


class ArtifactError(ValueError):
    """A saved step that cannot be loaded: a missing, truncated or altered file, or one written by
    another pockc or torch version. The message names the file."""


class ArenaOverBudget(StepError):
    """An exported program's planned arena is larger than the budget it was given."""
