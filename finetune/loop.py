"""What every training recipe shares around its loop: settings, start-up, the cadence, timing, model selection, results.

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


class Cadence:
    """How many optimizer steps the run takes, and whether it is time to log, evaluate or save a checkpoint."""

    def __init__(self, train: TrainConfig, checkpoint: CheckpointConfig, num_batches: int):
        """`num_batches` is the per-process length of the train loader."""
        self.train = train
        self.checkpoint = checkpoint
        epoch_steps = math.ceil(num_batches / train.gradient_accumulation_steps)
        self.epoch_steps = min(epoch_steps, train.max_steps_per_epoch or epoch_steps)  # optimizer steps per epoch
        self.total_steps = min(self.epoch_steps * train.epochs,  # optimizer steps in all, for the lr schedule
                               math.inf if train.max_steps is None else train.max_steps)

    def finished(self, state: TrainState) -> bool:
        """Whether the step budget (epochs x steps per epoch, or max_steps) is spent."""
        return state.global_step >= self.total_steps or state.epoch >= self.train.epochs

    def time_to_log(self, state: TrainState) -> bool:
        """Whether to log the training loss after this step."""
        return state.global_step % self.train.log_every_n_steps == 0

    def time_to_evaluate(self, state: TrainState, epoch_end: bool) -> bool:
        """Whether to evaluate after this step: at epoch ends, the last step and every `eval_every_n_steps`."""
        every = self.train.eval_every_n_steps
        return epoch_end or self.finished(state) or bool(every and state.global_step % every == 0)

    def time_to_checkpoint(self, state: TrainState, epoch_end: bool) -> bool:
        """Whether to save a checkpoint after this step: at epoch ends (with `at_epoch_end`), the last step and every
        `checkpoint.every_n_steps`."""
        every = self.checkpoint.every_n_steps
        return ((epoch_end and self.checkpoint.at_epoch_end) or self.finished(state)
                or bool(every and state.global_step % every == 0))


class TrainTimer:
    """Seconds spent training in this session and samples trained on, for samples/s; logging, evaluation and
    checkpoints are not timed."""

    def __init__(self, accelerator: Accelerator, state: TrainState):
        self.state = state
        self.num_processes = accelerator.num_processes
        self.seconds = 0.0  # training time of this session
        self.samples = 0  # samples of this session, over all processes
        self._since: float | None = None  # perf_counter() when the running stretch began; None: paused

    def timed(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`batches`, timed from the first request until `pause` and again from the next request; each batch's
        samples (the length of `batch["labels"]`, over all processes) are counted into `state.samples_seen`."""
        self._since = time.perf_counter()
        for batch in batches:
            samples = len(batch["labels"]) * self.num_processes
            self.state.samples_seen += samples
            self.samples += samples
            yield batch
            if self._since is None:  # paused at the step before (evaluation, checkpoint: not timed)
                self._since = time.perf_counter()

    def pause(self) -> None:
        """Stop the clock until the next batch is requested."""
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def samples_per_second(self) -> float | None:
        """This session's samples over its training seconds; None before the first step."""
        return round(self.samples / self.seconds, 3) if self.seconds else None


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


def record_eval(accelerator: Accelerator, state: TrainState, metrics: dict[str, Any], checkpoint: CheckpointConfig,
                early_stopping: EarlyStoppingConfig, save_model: Callable[[], None]) -> bool:
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
                  timer: TrainTimer, *, curve_metric: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json (the saved model's eval metrics first, then `extra`), curves.png, and confusion_matrix.png for
    classifiers."""
    saved = read_run_record(run_dir / MODEL_DIR)
    results = {
        "eval": saved.eval,
        "model_step": saved.step,
        "last_eval": last_eval,
        "train": {"steps": state.global_step, "epochs_completed": state.epoch, "samples": state.samples_seen,
                  "seconds_this_session": round(timer.seconds, 3),
                  "samples_per_second": timer.samples_per_second()},
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
