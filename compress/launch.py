"""Run a tuneforge recipe (recipes/<name>.py) in a subprocess: recovery fine-tunes after pruning and distillation
train with the recipes' own loops, and write ordinary run directories."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from compress.errors import StageError
from serve.bundle.folders import FolderGuard, run_dir_guard
from serve.bundle.tasks import Task

logger = logging.getLogger(__name__)

# The recipe that trains each task's models.
TASK_RECIPES = {Task.TEXT_CLASSIFICATION: "text_classification", Task.TEXT_REGRESSION: "text_classification",
                Task.IMAGE_CLASSIFICATION: "image_classification", Task.CAUSAL_LM: "causal_lm"}
REPO = Path(__file__).resolve().parents[1]


def recipe_path(name: str) -> Path:
    """recipes/<name>.py of this tuneforge checkout (recipes are scripts in the source tree, not in the wheel)."""
    script = REPO / "recipes" / f"{name}.py"
    if not script.is_file():
        raise StageError(f"recipe {script} not found: recovery fine-tunes and distillation run tuneforge's recipes, "
                         "which come with a source checkout of tuneforge (not the wheel)")
    return script


def run_recipe(name: str, args: list[str], *, log: Path) -> None:
    """`python recipes/<name>.py ARGS` from the current directory (relative data paths in a run's config.yaml stay
    valid); its output goes to `log`. A failure raises StageError with the recipe's error line or traceback tail."""
    script = recipe_path(name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, str(script), *args]
    logger.info("running %s (output in %s)", " ".join(cmd), log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        lines = log.read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        detail = errors[-1][len("error: "):] if errors else "\n".join(lines[-15:])
        raise StageError(f"recipes/{name}.py failed (exit {code}): {detail} (full output: {log})")


def output_run_guard() -> FolderGuard:
    """What a stage that writes a run directory (prune, distill) may replace at its output, with `overwrite`."""
    return run_dir_guard(setting="overwrite", key="output folder", error=StageError)


def check_output_run(out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that holds anything unless `overwrite` may replace it."""
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StageError(f"{out} already exists and is not empty; choose another output or pass overwrite")
    output_run_guard().check(out)


def temp_dir_near(path: Path, tag: str) -> Path:
    """A fresh temp folder next to `path` (same file system, so a finished result is renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-{tag}-", dir=path.parent))
