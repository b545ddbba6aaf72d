"""Training for the compress stages that need it: recovery fine-tunes after pruning, distillation.

compress never locates or starts scripts on its own: the caller passes a `Trainer`. `ScriptTrainer(recipes_dir)`
runs tuneforge's recipe scripts in a subprocess (the recipes of a source checkout, or your copies of them):
recipes/compression.py passes its own folder, `python -m compress run --recipes DIR` the one named. The recipes
write ordinary run directories, with their own loops.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from compress.errors import StageError
from serve.bundle.folders import run_dir_guard
from serve.bundle.tasks import Task

logger = logging.getLogger(__name__)

# The recipe that trains each task's models.
TASK_RECIPES = {Task.TEXT_CLASSIFICATION: "text_classification", Task.TEXT_REGRESSION: "text_classification",
                Task.IMAGE_CLASSIFICATION: "image_classification", Task.CAUSAL_LM: "causal_lm"}


class Trainer(Protocol):
    """Runs a training recipe to completion, or raises StageError with the recipe's own error line."""

    def __call__(self, recipe: str, args: Sequence[str], *, log: Path | None) -> None:
        """Run recipe `recipe` (e.g. "distill") with command-line `args`; its output goes to `log` (None: to this
        process's terminal)."""

    def config(self, name: str) -> Path:
        """A config shipped with the recipes, e.g. "distill/default.yaml"."""


@dataclass(frozen=True)
class ScriptTrainer:
    """`python <recipes>/<recipe>.py ARGS` in a subprocess, from the current directory (relative data paths in a
    run's config.yaml stay valid)."""

    recipes: Path

    def __call__(self, recipe: str, args: Sequence[str], *, log: Path | None) -> None:
        script = self.recipes / f"{recipe}.py"
        if not script.is_file():
            raise StageError(f"recipe {script} not found; pass the recipes folder of a tuneforge checkout "
                             "(python -m compress run --recipes DIR)")
        root = str(self.recipes.resolve().parent)  # the checkout's packages, as the recipes expect them
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, str(script), *args]
        if log is None:  # the recipe prints its own progress and error line
            code = subprocess.run(cmd, env=env).returncode
            if code:
                raise StageError(f"{script} failed (exit {code}); its error is printed above")
            return
        logger.info("running %s (output in %s)", " ".join(cmd), log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            lines = log.read_text(errors="replace").strip().splitlines()
            errors = [line for line in lines if line.startswith("error: ")]
            detail = errors[-1][len("error: "):] if errors else "\n".join(lines[-15:])
            raise StageError(f"{script} failed (exit {code}): {detail} (full output: {log})")

    def config(self, name: str) -> Path:
        path = self.recipes / "configs" / name
        if not path.is_file():
            raise StageError(f"recipe config {path} not found; name one with config_file")
        return path


def require_trainer(trainer: Trainer | None, what: str) -> Trainer:
    """`trainer`, or a StageError saying how to pass one."""
    if trainer is None:
        raise StageError(f"{what} trains with tuneforge's recipes: pass trainer=ScriptTrainer(Path('recipes')) "
                         "(the command line: python recipes/compression.py, or python -m compress run --recipes DIR)")
    return trainer


# What a stage that writes a run directory (prune, distill) may replace at its output, with `overwrite`.
OUTPUT_RUN_GUARD = run_dir_guard(setting="overwrite", key="output folder", error=StageError)


def check_output_run(out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that holds anything unless `overwrite` may replace it."""
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StageError(f"{out} already exists and is not empty; choose another output or pass overwrite")
    OUTPUT_RUN_GUARD.check(out)


def temp_dir_near(path: Path, tag: str) -> Path:
    """A fresh temp folder next to `path` (same file system, so a finished result is renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-{tag}-", dir=path.parent))
