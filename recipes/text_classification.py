"""Fine-tune a pretrained BERT-style encoder for text classification or regression.

    accelerate launch recipes/text_classification.py --config recipes/configs/text_classification/default.yaml
    accelerate launch --config_file recipes/configs/accelerate/multi_gpu.yaml recipes/text_classification.py \
        --config recipes/configs/text_classification/sst2.yaml train.batch_size=16
    python recipes/text_classification.py --help        # every config key with its default

The run directory (train.output_dir) receives config.yaml, model/, metrics.json, checkpoints/, logs/, curves.png
and confusion_matrix.png. Resume a killed run with checkpoint.resume_from=latest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding

from finetune.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    EarlyStoppingConfig,
    resume_state,
    stopped_early,
)
from finetune.config import config_to_dict, parse_config
from finetune.data import build_dataloaders
from finetune.errors import exit_on_user_error
from finetune.evaluation import predict, score_classifier, score_regressor
from finetune.loop import Cadence, LossMeter, TrainConfig, TrainTimer, open_run, record_eval, start_run, write_results
from finetune.models import ModelConfig, build_tokenizer
from finetune.optim import OptimConfig, build_optimizer, build_scheduler
from finetune.rundir import MODEL_DIR, save_model_dir
from finetune.text.data import TextDataConfig, encode_labels, load_raw_splits, tokenize_splits
from finetune.text.models import build_sequence_classifier, fit_max_length
from finetune.tracking import flat_hparams
from serve.bundle.records import RunRecord
from serve.bundle.tasks import Task


@dataclass
class Config:
    task: Literal["classification", "regression"] = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/text_classification"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


def main(cfg: Config) -> dict[str, Any]:
    # 1. The accelerator (CPU, one or many GPUs, FSDP, DeepSpeed: set by `accelerate launch`).
    #    The run directory is created once data and model have loaded (step 3).
    accelerator, resume = start_run(cfg, cfg.train, cfg.checkpoint)

    # 2. Data: read, label, tokenize once on the main process (the others reuse its cache), then batch.
    regression = cfg.task == "regression"
    tokenizer = build_tokenizer(cfg.model)
    max_length = fit_max_length(cfg.model, tokenizer, cfg.data.max_length)
    cfg.data.max_length = max_length  # capped at the model's positions: config.yaml records what the run uses
    with accelerator.main_process_first():
        raw = load_raw_splits(cfg.data, seed=cfg.train.seed)
        labelled, label_names = encode_labels(raw, cfg.data, regression=regression, num_labels=cfg.model.num_labels)
        tokenized = tokenize_splits(labelled, tokenizer, cfg.data)
    train_loader, eval_loader = build_dataloaders(
        tokenized, DataCollatorWithPadding(tokenizer), batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed, num_processes=accelerator.num_processes,
        group_by_length=cfg.data.group_by_length)

    # 3. Model and optimizer, wrapped for the hardware; the schedule's length depends on the per-process loader.
    model = build_sequence_classifier(cfg.model, label_names=label_names,
                                      problem_type="regression" if regression else "single_label_classification")
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    run_dir = open_run(accelerator, cfg, cfg.train, resume)  # created only now that data and model loaded
    state = resume_state(run_dir, resume)  # the loop's position: step, epoch, best metric
    cadence = Cadence(cfg.train, cfg.checkpoint, len(train_loader))  # steps per epoch, in all; when to log, eval, save
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg.optim, cadence.total_steps))

    # 4. Resume: weights, optimizer, scheduler and RNG states.
    checkpoints = CheckpointManager(accelerator, run_dir, cfg.checkpoint)
    if resume:
        checkpoints.load(resume)
    accelerator.init_trackers("logs", config=flat_hparams(config_to_dict(cfg)))
    record = RunRecord(Task.TEXT_REGRESSION if regression else Task.TEXT_CLASSIFICATION, label_names=label_names,
                       max_length=cfg.data.max_length, text_column=cfg.data.text_column,
                       text_pair_column=cfg.data.text_pair_column, base_model=cfg.model.name_or_path)

    def evaluate() -> tuple[dict[str, Any], bool]:
        """Score the eval split; keep model/ as the best model so far; say whether to stop early."""
        logits, labels = predict(accelerator, model, eval_loader)
        metrics = score_regressor(logits, labels) if regression else score_classifier(
            logits, labels, num_labels=len(label_names))
        stop = record_eval(accelerator, state, metrics, cfg.checkpoint, cfg.early_stopping, lambda: save_model_dir(
            accelerator, model, tokenizer, run_dir / MODEL_DIR, replace(record, step=state.global_step, eval=metrics)))
        return metrics, stop

    # 5. The loop, epoch by epoch: accumulate, clip, step; then log, evaluate, checkpoint and stop early when due.
    progress = tqdm(total=cadence.total_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    losses, timer = LossMeter(accelerator.device), TrainTimer(accelerator, state)
    metrics: dict[str, Any] = {}
    stop = stopped_early(state, cfg.early_stopping)  # a resumed run that had stopped early stays stopped
    for epoch in range(state.epoch, cfg.train.epochs):
        if stop or cadence.finished(state):
            break
        model.train()
        train_loader.set_epoch(epoch)  # the epoch's shuffle
        skip = state.step_in_epoch * cfg.train.gradient_accumulation_steps  # batches trained on before a resume
        for batch in timer.timed(accelerator.skip_first_batches(train_loader, skip) if skip else train_loader):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad()
            losses.add(loss)
            if not accelerator.sync_gradients:
                continue  # accumulating: one optimizer step per gradient_accumulation_steps batches
            timer.pause()  # until the next batch: logging, evaluation and checkpoints are not training time
            state.global_step += 1
            state.step_in_epoch += 1
            progress.update(1)
            epoch_end = state.step_in_epoch >= cadence.epoch_steps
            if epoch_end:  # a checkpoint saved from here on resumes at the next epoch's start
                state.epoch, state.step_in_epoch = epoch + 1, 0
            if cadence.time_to_log(state):
                accelerator.log({"train_loss": losses.pop(accelerator), "lr": scheduler.get_last_lr()[0]},
                                step=state.global_step)
            if cadence.time_to_evaluate(state, epoch_end):
                metrics, stop = evaluate()
                model.train()
            if cadence.time_to_checkpoint(state, epoch_end) or stop:
                checkpoints.save(state)
            if stop or epoch_end or cadence.finished(state):
                break
    progress.close()

    # 6. The final model's metrics and plots (a run resumed after its last step evaluates once here).
    if not metrics:
        metrics, _ = evaluate()
    accelerator.end_training()
    return write_results(accelerator, run_dir, state, metrics, timer, curve_metric=cfg.checkpoint.best_metric)


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
