"""Errors of the compress package, and the import of optional dependencies with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from serve.bundle.errors import TuneforgeError


class ExportError(TuneforgeError):
    """A run directory cannot be exported (unknown task, missing files, a dependency not installed)."""


class ParityError(ExportError):
    """An exported graph does not reproduce PyTorch within the stated tolerances; nothing was written."""


def require(module: str, *, extra: str = "export") -> ModuleType:
    """Import an optional dependency (onnx, onnxruntime, ...) or say which tuneforge extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module.split('.')[0]} is not installed; pip install 'tuneforge[{extra}]'") from None


class StageError(TuneforgeError):
    """A compression stage (pruning, distillation) cannot run: its settings, the run it starts from, or the recipe
    it runs is at fault; the message says which."""
