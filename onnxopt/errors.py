"""Error types that map to the CLI's exit codes.

Every error a user can cause carries a message that names the file, input, node or pass at fault; the CLI prints
the message (never a traceback) and exits with ``exit_code``.
"""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base of all errors the product reports to users."""

    exit_code = 2


class BadInputError(OnnxoptError):
    """The user's model, data, recipe or paths cannot be used (exit code 2)."""


class DataError(BadInputError):
    """Calibration/evaluation data does not fit the model (shape, dtype, NaN/Inf, empty)."""


class RecipeError(BadInputError):
    """A recipe names an unknown pass or parameter, or a parameter has a bad value."""


class PassFailedError(OnnxoptError):
    """A pass raised or produced a model that fails validation; the message names pass and node."""

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        self.pass_name = pass_name
        self.node = node
        where = f" at node '{node}'" if node else ""
        super().__init__(f"pass '{pass_name}' failed{where}: {message}")


class MissingDependencyError(OnnxoptError):
    """An optional dependency (e.g. torch) is needed by the requested pass but not installed."""
