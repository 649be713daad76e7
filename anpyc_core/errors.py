"""Errors a user can act on.

Every exception raised for bad input derives from :class:`AnpycError` and carries a one-line message that
names the problem and the fix. The CLI turns these into exit code 2 without a traceback; anything else is a
bug in anpyc and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["clip", "AnpycError", "ConfigError", "DataError", "RunDirError", "StateFileError", "ModelError", "TrainingDiverged",
           "InvariantViolation"]


def clip(text: object, limit: int = 160) -> str:
    """``text`` on one line and at most ``limit`` characters: a longer text is cut at the last word boundary before
    the limit and ends in "...", so an error message is never cut mid-word (one word longer than the limit alone is
    cut, and the "..." says so)."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, max(1, limit - 3) + 1)
    head = line[:cut] if cut > 0 else line[:max(1, limit - 3)]
    return head.rstrip(" ,;:(") + "..."


class AnpycError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` says what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} ({fix})" if fix else problem)

    @property
    def one_line(self) -> str:
        text = str(self)
        return " ".join(text.split())


class ConfigError(AnpycError):
    """A configuration value or file is invalid."""


class DataError(AnpycError):
    """A dataset, folder layout or input tensor is invalid."""


class RunDirError(AnpycError):
    """A run directory is missing, incomplete or belongs to something else."""


class StateFileError(AnpycError):
    """A state file (safetensors, JSON) is corrupt, truncated, or of the wrong schema."""


class ModelError(AnpycError):
    """A backbone cannot be created, traced or masked."""


class TrainingDiverged(AnpycError):
    """The loss became NaN/inf; the last good state was kept."""


class InvariantViolation(AnpycError):
    """An operation changed a task that the method promises to keep exact; the run stopped before saving."""
