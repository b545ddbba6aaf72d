"""User-facing errors: each names the problem and the fix, and the CLI shows it as one line, no traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)
FILE_ONLY = "file_only"  # a log record attribute: for the run's train.log, not the console (which shows the error)


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
    """Turn a TuneforgeError into `error: <message>` on stderr and exit status 2 (no traceback). Any error that ends
    the run is also logged for the run's logs/train.log (when the run has one)."""
    try:
        yield
    except TuneforgeError as err:
        if logging.getLogger().handlers:  # else logging's last resort would print the error a second time
            logger.error("error: %s", err, extra={FILE_ONLY: True})
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    except Exception:
        if logging.getLogger().handlers:
            logger.exception("the run failed", extra={FILE_ONLY: True})
        raise
