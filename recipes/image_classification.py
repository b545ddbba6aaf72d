"""Train an image classifier: the CNN / MLP / ResNet baselines from scratch, or fine-tune a pretrained model.

    accelerate launch recipes/image_classification.py --config recipes/configs/image_classification/default.yaml
    accelerate launch recipes/image_classification.py --config recipes/configs/image_classification/mnist_cnn.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/image_classification.py \
        --config recipes/configs/image_classification/mnist_mlp.yaml train.batch_size=64
    python recipes/image_classification.py --help        # every config key with its default

The run directory (train.output_dir) receives config.yaml, model/ (safetensors + tuneforge.json with the label
names and the preprocessing that export and serving apply), metrics.json (with per-class precision / recall / F1),
checkpoints/, logs/, curves.png, confusion_matrix.png and misclassified.png. Resume a killed run with
checkpoint.resume_from=latest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from finetune.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    EarlyStoppingConfig,
    resume_state,
    stopped_early,
)
from finetune.config import config_to_dict, parse_config
from finetune.errors import exit_on_user_error
from finetune.evaluation import predict, score_classifier
from finetune.loop import Cadence, LossMeter, TrainConfig, TrainTimer, open_run, record_eval, start_run, write_results
from finetune.optim import OptimConfig, build_optimizer, build_scheduler
from finetune.plots import plot_misclassified
from finetune.rundir import MODEL_DIR, save_model_dir
from finetune.tracking import flat_hparams
from finetune.vision.augment import AugmentConfig, BatchAugmenter
from finetune.vision.data import (
    ImageDataConfig,
    build_image_dataloaders,
    load_image_splits,
    prepare_images,
    resolve_preprocessing,
)
from finetune.vision.models import ImageModelConfig, build_image_classifier, pretrained_preprocessing
from serve.bundle.records import RunRecord
from serve.bundle.tasks import Task


@dataclass
class Config:
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.0e-3))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/image_classification"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


def main(cfg: Config) -> dict[str, Any]:
    # 1. The accelerator (CPU, one or many GPUs: set by `accelerate launch`).
    #    The run directory is created once data and model have loaded (step 3).
    accelerator, resume = start_run(cfg, cfg.train, cfg.checkpoint)

    # 2. Data: decode and check every image now (never mid-epoch), fix the preprocessing that is saved with the
    #    model, and keep the images as uint8 arrays in memory at the model's size.
    with accelerator.main_process_first():
        loaded, label_names = load_image_splits(cfg.data, seed=cfg.train.seed, num_labels=cfg.model.num_labels)
    spec = resolve_preprocessing(cfg.data, loaded["train"], pretrained=pretrained_preprocessing(cfg.model))
    splits = prepare_images(loaded, spec)
    train_loader, eval_loader = build_image_dataloaders(
        splits, spec, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
        seed=cfg.train.seed, num_processes=accelerator.num_processes)
    augment = BatchAugmenter(cfg.augment, spec, seed=cfg.train.seed, process_index=accelerator.process_index)

    # 3. Model and optimizer, wrapped for the hardware; the schedule's length depends on the per-process loader.
    model = build_image_classifier(cfg.model, label_names=label_names, num_channels=spec.num_channels,
                                   image_size=spec.size)
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
    unwrapped = accelerator.unwrap_model(model)
    record = RunRecord(Task.IMAGE_CLASSIFICATION, label_names=label_names, preprocessing=spec.to_dict(),
                       base_model=cfg.model.name_or_path, architecture=type(unwrapped).__name__,
                       num_parameters=sum(p.numel() for p in unwrapped.parameters()))

    def evaluate() -> tuple[dict[str, Any], bool]:
        """Score the eval split; keep model/ (and misclassified.png) as the best model so far; say whether to stop."""
        logits, labels = predict(accelerator, model, eval_loader)  # in eval-split order
        metrics = score_classifier(logits, labels, num_labels=len(label_names), label_names=label_names)

        def save_best() -> None:
            save_model_dir(accelerator, model, None, run_dir / MODEL_DIR,
                           replace(record, step=state.global_step, eval=metrics))
            if accelerator.is_main_process:
                plot_misclassified(splits["eval"].images, labels, logits.argmax(axis=1), label_names,
                                   run_dir / "misclassified.png")

        stop = record_eval(accelerator, state, metrics, cfg.checkpoint, cfg.early_stopping, save_best)
        return metrics, stop

    # 5. The loop, epoch by epoch: augment (train batches only), accumulate, clip, step; log, evaluate, checkpoint.
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
            # The augmentation's randomness is keyed by the samples seen, so a resumed run repeats it exactly.
            batch["pixel_values"] = augment(batch["pixel_values"], key=state.samples_seen)
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
