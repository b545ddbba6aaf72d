"""Checkpoints for resume: accelerate state + the loop's position, written atomically, rotated, best tracked.

A checkpoint is `checkpoints/step_N/` holding accelerate's `save_state` output (model as safetensors, optimizer,
scheduler, RNG states of every process) and `train_state.json` (step, epoch, position in the epoch, best metric,
early-stopping counter). It is written under `checkpoints/.tmp-step_N/` and renamed into place only when complete,
so a run killed mid-save leaves nothing that `resume_from=latest` could pick up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from finetune.config import check_bounds
from finetune.errors import CheckpointError, ConfigError
from finetune.rundir import MODEL_DIR, write_json
from serve.bundle.folders import RUN_PART, clear_folder, move_into_place, remove_temp, replace_folder
from serve.bundle.records import RUN_RECORD

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointConfig:
    """When to write checkpoints, how many to keep, where to resume from, and which metric picks the best model."""

    every_n_steps: int = 0  # optimizer steps between checkpoints; 0: only at epoch ends
    at_epoch_end: bool = True
    keep_last: int = 2  # older step_N folders are deleted
    resume_from: str | None = None  # "latest" or a checkpoint folder
    select_best: bool = True  # the run's model/ is the best evaluated one; false: the last one
    best_metric: str = "eval_loss"  # a key of the eval metrics
    best_mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        check_bounds(self, ">= 1", "keep_last")
        check_bounds(self, ">= 0", "every_n_steps")


@dataclass
class EarlyStoppingConfig:
    """Stop when `metric` has not improved by `min_delta` for `patience` evaluations (checked at every eval)."""

    patience: int = 0  # 0: off
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        check_bounds(self, ">= 0", "patience", "min_delta")


@dataclass
class TrainState:
    """Where the loop is: everything besides model/optimizer/scheduler/RNG that a resume needs."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    samples_seen: int = 0  # training samples over all processes
    best_metric: float | None = None
    best_step: int | None = None
    stale_evals: int = 0  # evaluations since early_stopping.metric last improved
    early_stopping_best: float | None = None


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` (NaN never does; anything else
    beats no best)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def update_early_stopping(state: TrainState, metrics: dict[str, float], cfg: EarlyStoppingConfig) -> bool:
    """Record one evaluation; return True when training should stop."""
    if cfg.patience <= 0:
        return False
    value = metric_value(metrics, cfg.metric, "early_stopping.metric")
    if improved(value, state.early_stopping_best, cfg.mode, cfg.min_delta):
        state.early_stopping_best, state.stale_evals = value, 0
    else:
        state.stale_evals += 1
    return state.stale_evals >= cfg.patience


def stopped_early(state: TrainState, cfg: EarlyStoppingConfig) -> bool:
    """Whether a resumed run had already been stopped by early stopping (with the patience configured now)."""
    return 0 < cfg.patience <= state.stale_evals


def metric_value(metrics: dict[str, Any], name: str, key: str) -> float:
    """`metrics[name]` as a float, or a ConfigError listing the metric names there are."""
    if name not in metrics or not isinstance(metrics[name], (int, float)):
        names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
        raise ConfigError(f"{key} is {name!r}, which the evaluation does not report; use one of {', '.join(names)}")
    return float(metrics[name])


class CheckpointManager:
    """Save (atomically, rotating old ones) and load checkpoints of one run; every process calls both."""

    def __init__(self, accelerator: Any, run_dir: str | Path, cfg: CheckpointConfig):
        self.accelerator = accelerator
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg

    def save(self, state: TrainState) -> Path:
        """Write `checkpoints/step_N` atomically (temp folder + rename), then delete those beyond `keep_last`."""
        acc = self.accelerator
        final = self.dir / f"step_{state.global_step}"
        tmp = self.dir / f".tmp-step_{state.global_step}"
        if acc.is_main_process:
            remove_temp(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json(tmp / STATE_FILE, dataclasses.asdict(state))
            replace_folder(tmp, final, RUN_PART)  # a step saved again after a resume replaces its old copy
            self._rotate()
            logger.info("checkpoint saved: %s", final)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> TrainState:
        """Restore model, optimizer, scheduler and RNG states from `path`; return the loop position.

        Checkpoints of this run newer than `path` belong to the abandoned continuation: they move to
        `checkpoints/superseded/`, so that rotation and `resume_from=latest` see the resumed line only.
        """
        state = resume_state(self.dir.parent, path)  # a corrupt train_state.json fails before the weights load
        try:
            self.accelerator.load_state(str(path))
        except Exception as err:  # safetensors, torch and accelerate each raise their own kind for a damaged file
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); resume from an "
                                  "older one with checkpoint.resume_from=<run>/checkpoints/step_N, or drop "
                                  "checkpoint.resume_from to start fresh") from None
        if self.accelerator.is_main_process:
            self._supersede_after(state.global_step)
        self.accelerator.wait_for_everyone()
        logger.info("resumed from %s at step %d", path, state.global_step)
        return state

    def _supersede_after(self, step: int) -> None:
        for later in complete_checkpoints(self.dir.parent):
            if int(_STEP_DIR.match(later.name).group(1)) > step:
                aside = self.dir / "superseded" / later.name
                while aside.exists():
                    aside = aside.with_name(aside.name + "+")
                aside.parent.mkdir(exist_ok=True)
                move_into_place(later, aside)
                logger.warning("resumed at step %d: the later checkpoint %s moved to %s (delete it when no longer "
                               "needed)", step, later.name, aside)

    def _rotate(self) -> None:
        for old in complete_checkpoints(self.dir.parent)[:-self.cfg.keep_last]:
            clear_folder(old, RUN_PART)
        for stale in self.dir.glob(".tmp-step_*"):  # left by a killed run
            remove_temp(stale)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written temp folders are never listed)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(run_dir: str | Path, resume_from: str) -> Path:
    """`latest` -> the run's newest complete checkpoint; a path -> that folder, if it is complete."""
    if resume_from == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"resume_from=latest but {Path(run_dir) / 'checkpoints'} holds no complete "
                                  "checkpoint; drop checkpoint.resume_from to start fresh")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{resume_from!r} is not a complete checkpoint (no {STATE_FILE}); use "
                              "checkpoint.resume_from=latest or a checkpoints/step_N folder")
    return path


def resume_state(run_dir: str | Path, checkpoint: str | Path | None) -> TrainState:
    """The loop position a run starts from: fresh, or the checkpoint's. The best metric is forgotten when the run
    directory has no saved model (a checkpoint of another run, or a model save cut short), so that the first
    evaluation writes model/."""
    if checkpoint is None:
        return TrainState()
    state = read_train_state(checkpoint)
    if not (Path(run_dir) / MODEL_DIR / RUN_RECORD).is_file():
        state.best_metric = state.best_step = None
    return state


def read_train_state(checkpoint: str | Path) -> TrainState:
    """The loop position stored in a checkpoint; a CheckpointError when the file is unreadable or malformed."""
    path = Path(checkpoint) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        state = TrainState(**data)
        ints = [state.global_step, state.epoch, state.step_in_epoch, state.samples_seen, state.stale_evals]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise ValueError("steps and counts must be non-negative integers")
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}); resume from an older checkpoint with checkpoint."
                              "resume_from=<run>/checkpoints/step_N, or drop checkpoint.resume_from to start fresh"
                              ) from None
    return state
