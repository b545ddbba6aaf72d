"""Errors of the serving runtime: each names the problem and what to pass instead."""

from __future__ import annotations

from serve.bundle.errors import TuneforgeError


class ServeError(TuneforgeError):
    """A bundle or run directory cannot be served (unknown task, missing dependency, unusable graph)."""


class InputError(ServeError, ValueError):
    """An input of the wrong type or shape was passed to a predictor (e.g. a str where a list of texts is expected)."""
