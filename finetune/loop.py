"""What every training recipe shares around its loop: settings, start-up, the step clock, model selection, results.

The loop itself (forward, backward, clip, optimizer step, when to evaluate and save) stays in each recipe, where a
reader sees it; these pieces keep the bookkeeping the same in all of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from finetune.checkpoint import (
    CheckpointConfig,
    EarlyStoppingConfig,
    TrainState,
    improved,
    metric_value,
    read_train_state,
    resolve_checkpoint,
    update_early_stopping,
)
from finetune.config import check_bounds, save_config
from finetune.errors import ConfigError
from finetune.plots import plot_confusion_matrix, plot_curves
from finetune.rundir import MODEL_DIR, check_run_dir, open_run_dir, write_json
from finetune.tracking import build_trackers, log_to_file, read_metrics_log, setup_logging
from serve.bundle.records import read_run_record

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Loop settings shared by the recipes: where the run goes, how long, batch sizes, precision, cadences."""

    output_dir: str = "runs/run"
    overwrite: bool = False  # replace an existing run in output_dir
    seed: int = 42
    epochs: int = 3
    batch_size: int = 32  # per process; the global batch is batch_size x processes x accumulation steps
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"  # auto: bf16 where the hardware computes it natively
    max_steps: int | None = None  # stop after this many optimizer steps in all; null: no limit
    max_steps_per_epoch: int | None = None
    eval_every_n_steps: int = 0  # 0: evaluate at epoch ends only
    log_every_n_steps: int = 10

    def __post_init__(self) -> None:
        check_bounds(self, ">= 1", "epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps",
                     "log_every_n_steps")
        for name in ("max_steps", "max_steps_per_epoch"):  # no limit is null, never 0 (which read as no limit)
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, or null for no limit; got {getattr(self, name)}")
        check_bounds(self, ">= 0", "seed", "max_grad_norm", "eval_every_n_steps")


def start_run(cfg: Any, train: TrainConfig, checkpoint: CheckpointConfig) -> tuple[Accelerator, Path | None]:
    """The accelerator (hardware and processes come from `accelerate launch`), logging to the console, the seed set,
    and the checkpoint to resume from, if any. Writes nothing: `open_run` creates the run directory once the data and
    model have loaded, so that a bad input leaves nothing behind."""
    train.mixed_precision = resolve_mixed_precision(train.mixed_precision)  # config.yaml records what the run uses
    run_dir = Path(train.output_dir)
    resume = resolve_checkpoint(run_dir, checkpoint.resume_from) if checkpoint.resume_from else None
    check_run_dir(run_dir, resume=resume is not None, overwrite=train.overwrite)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # several processes on a CPU-only machine: gloo, not N lone runs
        gradient_accumulation_steps=train.gradient_accumulation_steps, mixed_precision=train.mixed_precision,
        step_scheduler_with_optimizer=False,  # recipes step the scheduler once per optimizer step
        project_dir=str(run_dir),
        log_with=build_trackers(run_dir, resume_step=read_train_state(resume).global_step if resume else None))
    setup_logging(is_main_process=accelerator.is_main_process)
    if train.mixed_precision == "bf16" and not native_bf16():
        logger.warning("train.mixed_precision=bf16: no bf16 hardware here (a GPU with bf16, or a CPU with AVX-512 BF16 "
                       "or AMX), so bf16 is emulated and slow; set train.mixed_precision=auto (or no) for fp32")
    set_seed(train.seed)
    return accelerator, resume


def open_run(accelerator: Accelerator, cfg: Any, train: TrainConfig, resume: Path | None) -> Path:
    """Create (or reopen, when resuming) the run directory: logs/train.log from here on, and the resolved
    `config.yaml`. Recipes call it after loading data and model, before the loop."""
    run_dir = open_run_dir(accelerator, train.output_dir, resume=resume is not None, overwrite=train.overwrite)
    log_to_file(run_dir, is_main_process=accelerator.is_main_process)
    logger.info("run directory %s (mixed precision: %s)", run_dir, train.mixed_precision)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


def native_bf16() -> bool:
    """Whether this machine computes bf16 in hardware: a GPU with bf16, or a CPU with AVX-512 BF16 or AMX. Elsewhere
    PyTorch emulates bf16 on the CPU: scoring SmolLM2-135M took 148 s on an AVX2-only EPYC, 12.6 s with AVX-512 BF16."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch 2.13; absent reads as no
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_mixed_precision(requested: str) -> str:
    """`auto` becomes bf16 where the hardware has it and `no` elsewhere; fp16 without a GPU is refused."""
    if requested == "auto":
        return "bf16" if native_bf16() else "no"
    if requested == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16, auto or no on this machine")
    return requested


@dataclass
class Due:
    """What is due after an optimizer step."""

    log: bool
    evaluate: bool
    checkpoint: bool
    epoch_end: bool
    last: bool  # the step budget (epochs x steps per epoch, or max_steps) is spent


class StepClock:
    """Counts optimizer steps into `state`, feeds each epoch's batches (skipping those done before a resume), times
    training (evaluation and checkpoints excluded) and says what is due after each step.

    `num_batches` is the per-process length of the train loader.
    """

    def __init__(self, state: TrainState, train: TrainConfig, checkpoint: CheckpointConfig, num_batches: int,
                 *, show_progress: bool):
        self.state = state
        self.train = train
        self.checkpoint = checkpoint
        epoch_steps = math.ceil(num_batches / train.gradient_accumulation_steps)
        self.epoch_steps = min(epoch_steps, train.max_steps_per_epoch or epoch_steps)
        self.total_steps = min(self.epoch_steps * train.epochs,
                               math.inf if train.max_steps is None else train.max_steps)
        self.train_seconds = 0.0  # this session's, for samples/s
        self.session_samples = 0
        self._tick: float | None = None
        self.progress = tqdm(total=self.total_steps, initial=state.global_step, desc="train",
                             disable=not show_progress)

    @property
    def done(self) -> bool:
        return self.state.global_step >= self.total_steps or self.state.epoch >= self.train.epochs

    def epoch_batches(self, accelerator: Accelerator, loader: Any) -> Iterator[dict[str, Any]]:
        """The batches of the epoch in progress, after those a resumed run already trained on; counts samples
        (the length of `batch["labels"]`, over all processes)."""
        loader.set_epoch(self.state.epoch)
        skip = self.state.step_in_epoch * self.train.gradient_accumulation_steps
        batches: Iterable[dict[str, Any]] = accelerator.skip_first_batches(loader, skip) if skip else loader
        self._tick = time.perf_counter()
        for batch in batches:
            samples = len(batch["labels"]) * accelerator.num_processes
            self.state.samples_seen += samples
            self.session_samples += samples
            yield batch
            if self._tick is None:  # resumed after a step and what was due then (eval, checkpoint: not timed)
                self._tick = time.perf_counter()

    def advance(self) -> Due:
        """Record one optimizer step; say what is due now."""
        if self._tick is not None:
            self.train_seconds += time.perf_counter() - self._tick
            self._tick = None
        state, train = self.state, self.train
        state.global_step += 1
        state.step_in_epoch += 1
        self.progress.update(1)
        epoch_end = state.step_in_epoch >= self.epoch_steps
        if epoch_end:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        every_eval, every_save = train.eval_every_n_steps, self.checkpoint.every_n_steps
        last = self.done
        return Due(
            log=state.global_step % train.log_every_n_steps == 0,
            evaluate=epoch_end or last or bool(every_eval and state.global_step % every_eval == 0),
            checkpoint=(epoch_end and self.checkpoint.at_epoch_end) or last
            or bool(every_save and state.global_step % every_save == 0),
            epoch_end=epoch_end,
            last=last,
        )

    def samples_per_second(self) -> float | None:
        return round(self.session_samples / self.train_seconds, 3) if self.train_seconds else None

    def close(self) -> None:
        self.progress.close()


class LossMeter:
    """Running mean of the training loss since the last log, averaged over processes when read."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.count += 1

    def pop(self, accelerator: Accelerator) -> float:
        """The mean since the last `pop` (over all processes), then reset."""
        mean = (accelerator.reduce(self.total, "mean") / max(1, self.count)).item()
        self.total.zero_()
        self.count = 0
        return mean


def select_and_stop(accelerator: Accelerator, state: TrainState, metrics: dict[str, Any],
                    checkpoint: CheckpointConfig, early_stopping: EarlyStoppingConfig,
                    save_model: Callable[[], None]) -> bool:
    """Log an evaluation; call `save_model` when it is the best so far (or always, with select_best off);
    return whether early stopping says to stop."""
    accelerator.log(scalars(metrics), step=state.global_step)
    value = metric_value(metrics, checkpoint.best_metric, "checkpoint.best_metric")
    if math.isnan(value):
        logger.warning("checkpoint.best_metric %s is NaN at step %d: not a best model", checkpoint.best_metric,
                       state.global_step)
    if not checkpoint.select_best or state.best_step is None or improved(value, state.best_metric,
                                                                          checkpoint.best_mode):
        if checkpoint.select_best:  # the first model is kept even if NaN, so that the run always has one
            state.best_metric, state.best_step = None if math.isnan(value) else value, state.global_step
        save_model()
    return update_early_stopping(state, metrics, early_stopping)


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (what trackers and summaries take)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_results(accelerator: Accelerator, run_dir: Path, state: TrainState, last_eval: dict[str, Any],
                  clock: StepClock, *, curve_metric: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json (the saved model's eval metrics first, then `extra`), curves.png, and confusion_matrix.png for
    classifiers."""
    saved = read_run_record(run_dir / MODEL_DIR)
    results = {
        "eval": saved.eval,
        "model_step": saved.step,
        "last_eval": last_eval,
        "train": {"steps": state.global_step, "epochs_completed": state.epoch, "samples": state.samples_seen,
                  "seconds_this_session": round(clock.train_seconds, 3),
                  "samples_per_second": clock.samples_per_second()},
        **(extra or {}),
    }
    if accelerator.is_main_process:
        write_json(run_dir / "metrics.json", results)
        plot_curves(read_metrics_log(run_dir), curve_metric, run_dir / "curves.png")
        if "confusion_matrix" in saved.eval:
            plot_confusion_matrix(saved.eval["confusion_matrix"], saved.label_names,
                                  run_dir / "confusion_matrix.png")
        summary = ", ".join(f"{k}={v:.4f}" for k, v in scalars(saved.eval).items() if isinstance(v, float))
        accelerator.print(f"eval: {summary}\nrun directory: {run_dir}")
    return results
