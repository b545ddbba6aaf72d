"""Fine-tune a pretrained BERT-style encoder for text classification or regression.

    accelerate launch recipes/text_classification.py --config recipes/configs/text_classification/default.yaml
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml recipes/text_classification.py \
        --config recipes/configs/text_classification/sst2.yaml train.batch_size=16
    python recipes/text_classification.py --help        # every config key with its default

The run directory (train.output_dir) receives config.yaml, model/, metrics.json, checkpoints/, logs/, curves.png
and confusion_matrix.png. Resume a killed run with checkpoint.resume_from=latest.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from finetune.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    EarlyStoppingConfig,
    TrainState,
    improved,
    metric_value,
    read_train_state,
    resolve_checkpoint,
    update_early_stopping,
)
from finetune.config import config_to_dict, parse_config, save_config
from finetune.data import (
    TextDataConfig,
    build_dataloaders,
    encode_labels,
    load_raw_splits,
    steps_per_epoch,
    tokenize_splits,
)
from finetune.errors import ConfigError, exit_on_user_error
from finetune.evaluation import predict, score_classifier, score_regressor
from finetune.models import ModelConfig, build_sequence_classifier, build_tokenizer
from finetune.optim import OptimConfig, build_optimizer, build_scheduler
from finetune.plots import plot_confusion_matrix, plot_curves
from finetune.rundir import MODEL_DIR, TASK_FILE, prepare_run_dir, save_model_dir, write_json
from finetune.tracking import build_trackers, flat_hparams, read_metrics_log, setup_logging


@dataclass
class TrainConfig:
    output_dir: str = "runs/text_classification"
    overwrite: bool = False  # replace an existing run in output_dir
    seed: int = 42
    epochs: int = 3
    batch_size: int = 32  # per process; the global batch is batch_size x processes x accumulation steps
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    max_steps: int | None = None  # stop after this many optimizer steps in all
    max_steps_per_epoch: int | None = None
    eval_every_n_steps: int = 0  # 0: evaluate at epoch ends only
    log_every_n_steps: int = 10


@dataclass
class Config:
    task: Literal["classification", "regression"] = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


def main(cfg: Config) -> dict[str, Any]:
    # 1. The run directory and the accelerator (CPU, one or many GPUs, FSDP, DeepSpeed: set by `accelerate launch`).
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on this machine")
    run_dir = Path(cfg.train.output_dir)
    checkpoint = resolve_checkpoint(run_dir, cfg.checkpoint.resume_from) if cfg.checkpoint.resume_from else None
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # several processes on a CPU-only machine: gloo, not N lone runs
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, mixed_precision=cfg.train.mixed_precision,
        step_scheduler_with_optimizer=False,  # the scheduler steps once per optimizer step, below
        project_dir=str(run_dir),
        log_with=build_trackers(run_dir, resume_step=read_train_state(checkpoint).global_step if checkpoint else None))
    prepare_run_dir(accelerator, run_dir, resume=checkpoint is not None, overwrite=cfg.train.overwrite)
    setup_logging(run_dir, is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    set_seed(cfg.train.seed)

    # 2. Data: read, label, tokenize once on the main process (the others reuse its cache), then batch.
    regression = cfg.task == "regression"
    tokenizer = build_tokenizer(cfg.model)
    with accelerator.main_process_first():
        raw = load_raw_splits(cfg.data, seed=cfg.train.seed)
        labelled, label_names = encode_labels(raw, cfg.data, regression=regression, num_labels=cfg.model.num_labels)
        tokenized = tokenize_splits(labelled, tokenizer, cfg.data)
    train_loader, eval_loader = build_dataloaders(
        tokenized, tokenizer, cfg.data, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
        seed=cfg.train.seed, num_processes=accelerator.num_processes)

    # 3. Model and optimizer, wrapped for the hardware; the schedule's length depends on the per-process loader.
    model = build_sequence_classifier(cfg.model, label_names=label_names,
                                      problem_type="regression" if regression else "single_label_classification")
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    epoch_steps = steps_per_epoch(len(train_loader), cfg.train.gradient_accumulation_steps,
                                  cfg.train.max_steps_per_epoch)
    total_steps = min(epoch_steps * cfg.train.epochs, cfg.train.max_steps or math.inf)
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg.optim, total_steps))

    # 4. Resume: weights, optimizer, scheduler, RNG and the position inside the epoch.
    checkpoints = CheckpointManager(accelerator, run_dir, cfg.checkpoint)
    state = checkpoints.load(checkpoint) if checkpoint else TrainState()
    accelerator.init_trackers("logs", config=flat_hparams(config_to_dict(cfg)))
    task = {"task": "text-regression" if regression else "text-classification", "label_names": label_names,
            "max_length": cfg.data.max_length, "text_column": cfg.data.text_column,
            "text_pair_column": cfg.data.text_pair_column, "base_model": cfg.model.name_or_path}

    def evaluate_and_select() -> tuple[dict[str, Any], bool]:
        """Evaluate; keep model/ as the best model so far; return the metrics and whether to stop early."""
        logits, labels = predict(accelerator, model, eval_loader)
        metrics = score_regressor(logits, labels) if regression else score_classifier(
            logits, labels, num_labels=len(label_names))
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state.global_step)
        value = metric_value(metrics, cfg.checkpoint.best_metric, "checkpoint.best_metric")
        if cfg.checkpoint.select_best and improved(value, state.best_metric, cfg.checkpoint.best_mode):
            state.best_metric, state.best_step = value, state.global_step
            save_model_dir(accelerator, model, tokenizer, run_dir / MODEL_DIR,
                           {**task, "step": state.global_step, "eval": metrics})
        return metrics, update_early_stopping(state, metrics, cfg.early_stopping)

    # 5. The loop: accumulate, clip, step; evaluate, checkpoint and stop early on schedule.
    progress = tqdm(total=total_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    train_seconds, session_samples = 0.0, 0  # this session's training time and samples, for samples/s
    running_loss, micro_batches = torch.zeros((), device=accelerator.device), 0
    metrics: dict[str, Any] = {}
    evaluated_at, stop = -1, state.global_step >= total_steps
    model.train()
    while not stop and state.epoch < cfg.train.epochs:
        train_loader.set_epoch(state.epoch)
        skip = state.step_in_epoch * cfg.train.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        tick = time.perf_counter()
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            running_loss += loss.detach()
            micro_batches += 1
            session_samples += len(batch["labels"]) * accelerator.num_processes
            state.samples_seen += len(batch["labels"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            state.step_in_epoch += 1
            progress.update(1)
            if state.global_step % cfg.train.log_every_n_steps == 0:
                train_loss = (accelerator.reduce(running_loss, "mean") / micro_batches).item()
                accelerator.log({"train_loss": train_loss, "lr": scheduler.get_last_lr()[0]}, step=state.global_step)
                progress.set_postfix(loss=f"{train_loss:.4f}")
                running_loss.zero_()
                micro_batches = 0
            epoch_done = state.step_in_epoch >= epoch_steps
            if epoch_done:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            train_seconds += time.perf_counter() - tick
            if epoch_done or (cfg.train.eval_every_n_steps and state.global_step % cfg.train.eval_every_n_steps == 0):
                metrics, stop = evaluate_and_select()
                evaluated_at = state.global_step
            stop = stop or state.global_step >= total_steps
            every = cfg.checkpoint.every_n_steps
            if (every and state.global_step % every == 0) or (epoch_done and cfg.checkpoint.at_epoch_end) or stop:
                checkpoints.save(state)
            tick = time.perf_counter()
            if stop or epoch_done:
                break
    progress.close()

    # 6. The final model, its metrics and plots.
    if evaluated_at != state.global_step:
        metrics, _ = evaluate_and_select()
    if not cfg.checkpoint.select_best:
        save_model_dir(accelerator, model, tokenizer, run_dir / MODEL_DIR,
                       {**task, "step": state.global_step, "eval": metrics})
    accelerator.end_training()
    return write_results(accelerator, run_dir, state, metrics, (session_samples, train_seconds), cfg)


def write_results(accelerator: Accelerator, run_dir: Path, state: TrainState, last_eval: dict[str, Any],
                  throughput: tuple[int, float], cfg: Config) -> dict[str, Any]:
    """metrics.json (the saved model's eval metrics first), curves.png and confusion_matrix.png."""
    samples, seconds = throughput
    saved = json.loads((run_dir / MODEL_DIR / TASK_FILE).read_text())
    results = {
        "eval": saved["eval"],
        "model_step": saved["step"],
        "last_eval": last_eval,
        "train": {"steps": state.global_step, "epochs_completed": state.epoch, "samples": state.samples_seen,
                  "seconds_this_session": round(seconds, 3),
                  "samples_per_second": round(samples / seconds, 3) if seconds else None},
    }
    if accelerator.is_main_process:
        write_json(run_dir / "metrics.json", results)
        plot_curves(read_metrics_log(run_dir), cfg.checkpoint.best_metric, run_dir / "curves.png")
        if "confusion_matrix" in saved["eval"]:
            plot_confusion_matrix(saved["eval"]["confusion_matrix"], saved["label_names"],
                                  run_dir / "confusion_matrix.png")
        accelerator.print(f"eval: {_summary(saved['eval'])}\nrun directory: {run_dir}")
    return results


def _summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
