"""Errors pockc raises for problems a user can act on.

Every message is one line that says what is wrong and what to do; the CLI prints it without a
traceback and exits non-zero.
"""


class CompileError(Exception):
    """The model, loss, batch or update policy cannot be compiled as given."""


class PlanError(CompileError, ValueError):
    """The update policy is malformed or names parameters that do not exist."""


class BudgetError(CompileError):
    """No update plan fits the memory budget, or the budget is malformed."""



from pockc.runtime.errors import ArtifactError, BatchError, StepError  # noqa: E402,F401  (raised by the runtime)
