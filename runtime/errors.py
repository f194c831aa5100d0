"""Errors the runtime raises; pockc re-exports them."""


class BatchError(ValueError):
    """A batch whose structure, rank or dtype differs from what the step was compiled for."""


class StepError(ValueError):
    """A change after compiling that the compiled step cannot follow (another optimizer's state)."""
