"""The base of every user-facing tuneforge error, the bundle format's own error, and the command-line wrapper that
shows them as one line. Standard library only."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)
FILE_ONLY = "file_only"  # a log record attribute: for the run's train.log, not the console (which shows the error)


class TuneforgeError(Exception):
    """A problem with the user's input (config, data, model path, bundle) that the user can fix; the message names
    the problem and the fix, and command lines show it as one line, no traceback."""


class DataError(TuneforgeError):
    """Data is missing, empty or malformed: a dataset without the columns or labels the config asks for, an image
    that does not decode."""


class BundleError(TuneforgeError):
    """A bundle folder is missing, malformed, of an unknown format version, or fails its checksums."""


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
