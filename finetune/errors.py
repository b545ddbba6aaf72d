"""Training's user-facing errors: each names the problem and the fix; the CLI shows it as one line, no traceback."""

from __future__ import annotations

from serve.bundle.errors import FILE_ONLY, DataError, TuneforgeError, exit_on_user_error

# The ground floor's errors and CLI wrapper, re-exported for the recipes' imports.
__all__ = ["FILE_ONLY", "CheckpointError", "ConfigError", "DataError", "ModelError", "TuneforgeError",
           "exit_on_user_error"]


class ConfigError(TuneforgeError):
    """The config file or a command-line override is malformed or names an unknown key."""


class ModelError(TuneforgeError):
    """A model source cannot be found or does not match the task."""


class CheckpointError(TuneforgeError):
    """A checkpoint to resume from is missing or incomplete."""
