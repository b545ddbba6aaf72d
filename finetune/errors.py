"""User-facing errors: each names the problem and the fix, and the CLI shows it as one line, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class TuneforgeError(Exception):
    """A problem with the user's input (config, data, model path) that the user can fix."""


class ConfigError(TuneforgeError):
    """The config file or a command-line override is malformed or names an unknown key."""


class DataError(TuneforgeError):
    """A dataset is missing, empty, or lacks the columns / labels the config asks for."""


class ModelError(TuneforgeError):
    """A model source cannot be found or does not match the task."""


class CheckpointError(TuneforgeError):
    """A checkpoint to resume from is missing or incomplete."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a TuneforgeError into `error: <message>` on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except TuneforgeError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
