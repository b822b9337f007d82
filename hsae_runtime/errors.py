"""Typed errors for bad user input.

Every error a user can cause (a bad budget, a foreign file, an unknown hookpoint) is raised as a
subclass of :class:`HSAEError` carrying a one-line message and, where we can offer one, a hint
on what to do instead. They also subclass :class:`ValueError` so generic callers keep working.
The CLI prints them as one line (exit code 2); the gRPC server maps them to status codes in one
place (``hsae_runtime.serving.errors``).
"""

from __future__ import annotations


class HSAEError(ValueError):
    """Base class for errors caused by user input. ``str(err)`` includes the hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} (hint: {hint})" if hint else message)


class ConfigError(HSAEError):
    """An invalid configuration value (names the offending field)."""


class InputError(HSAEError):
    """A tensor or request argument that the SAE cannot accept (shape, dtype, NaN, budget)."""


class ModelFileError(HSAEError):
    """A model file or folder that is missing, truncated, corrupt, foreign or inconsistent."""


class HookpointError(HSAEError):
    """A hookpoint name that does not exist in the language model."""


class DataError(HSAEError):
    """A missing, empty or unreadable training / evaluation data source."""
