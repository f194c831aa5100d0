"""Errors the runtime raises; pockc re-exports them."""


class BatchError(ValueError):
    """A batch whose structure, rank or dtype differs from what the step was compiled for."""
