"""Distill a classifier run (the teacher) into a smaller student: fewer of the teacher's layers, or another model.

    accelerate launch recipes/distill.py --config recipes/configs/distill/default.yaml
    accelerate launch recipes/distill.py --config recipes/configs/distill/sst2.yaml teacher=runs/sst2 \
        student.layers=[1,3,5]
    accelerate launch recipes/distill.py --config recipes/configs/distill/mnist_resnet_to_cnn.yaml
    python recipes/distill.py --help        # every config key with its default

The student learns from alpha x cross-entropy on the labels + (1 - alpha) x T^2 x KL(teacher || student) on
temperature-T soft targets (compress.distill.kd_loss), on the teacher run's own data (its config.yaml `data`, with
this config's `data` settings on top). The run directory is a normal one (config.yaml, model/, metrics.json,
checkpoints/, logs/, curves.png, confusion_matrix.png) that `python -m compress export` exports; model/tuneforge.json
records the teacher and the settings. Resume a killed run with checkpoint.resume_from=latest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from compress.distill import every_other_layer, kd_loss, layer_subset_student
from compress.source import load_model, load_tokenizer, read_run
from finetune.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    EarlyStoppingConfig,
    resume_state,
    stopped_early,
)
from finetune.config import check_bounds, config_from_dict, config_to_dict, parse_config
from finetune.errors import ConfigError, exit_on_user_error
from finetune.evaluation import predict, score_classifier
from finetune.loop import Cadence, LossMeter, TrainConfig, TrainTimer, open_run, record_eval, start_run, write_results
from finetune.optim import OptimConfig, build_optimizer, build_scheduler
from finetune.rundir import MODEL_DIR, save_model_dir
from finetune.shapes import record_shapes_
from finetune.tracking import flat_hparams
from serve.bundle.tasks import Task


@dataclass
class StudentConfig:
    layers: list[int] | None = None  # teacher layers the student keeps (transformers); None: every other layer
    name_or_path: str | None = None  # instead, another model: a folder or hub id (text), simple_cnn/mlp/resnet (image)
    config: dict[str, Any] = field(default_factory=dict)  # a built-in image student's architecture settings


@dataclass
class KDConfig:
    alpha: float = 0.5  # weight of the hard-label cross-entropy; the soft targets get 1 - alpha
    temperature: float = 2.0
    cache_teacher_logits: bool = False  # the teacher's train logits computed once (no augmentation), not every step

    def __post_init__(self) -> None:
        check_bounds(self, "in [0, 1]", "alpha")
        check_bounds(self, "> 0", "temperature")


@dataclass
class Config:
    teacher: str = "runs/text_classification/default"  # a finished text- or image-classification run
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: KDConfig = field(default_factory=KDConfig)
    data: dict[str, Any] = field(default_factory=dict)  # changes to the teacher run's data settings
    augment: dict[str, Any] = field(default_factory=dict)  # image teachers: changes to its augment settings
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/distill"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


def main(cfg: Config) -> dict[str, Any]:
    # 1. The teacher run; its data settings with this config's changes (resolved, so config.yaml says what was used).
    teacher_run = read_run(cfg.teacher)
    image = teacher_run.task == Task.IMAGE_CLASSIFICATION
    if teacher_run.task not in (Task.TEXT_CLASSIFICATION, Task.IMAGE_CLASSIFICATION) or teacher_run.config is None:
        raise ConfigError(f"teacher {cfg.teacher} must be a text- or image-classification run written by a recipe")
    cfg.data = {**teacher_run.config["data"], **cfg.data, "label_names": teacher_run.record.label_names}
    if image:
        cfg.augment = {**teacher_run.config.get("augment", {}), **cfg.augment}
    accelerator, resume = start_run(cfg, cfg.train, cfg.checkpoint)
    teacher = load_model(teacher_run).to(accelerator.device)  # eval mode, no gradients
    if not image:
        teacher.set_attn_implementation("sdpa")  # loaded in the eager (export) form; sdpa runs faster

    # 2. Data: the teacher's splits and label ids; optionally its train logits, computed once.
    build_data = image_data if image else text_data
    train_loader, eval_loader, processor, augment = build_data(cfg, teacher_run, teacher, accelerator)

    # 3. The student, initialised from the teacher's layers or built as named; optimizer and schedule.
    model = build_student(cfg, teacher, teacher_run)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    run_dir = open_run(accelerator, cfg, cfg.train, resume)  # created only now that data and model loaded
    state = resume_state(run_dir, resume)
    cadence = Cadence(cfg.train, cfg.checkpoint, len(train_loader))  # steps per epoch, in all; when to log, eval, save
    scheduler = accelerator.prepare(build_scheduler(optimizer, cfg.optim, cadence.total_steps))

    # 4. Resume; what model/tuneforge.json records: the teacher's task metadata and how the student was made.
    checkpoints = CheckpointManager(accelerator, run_dir, cfg.checkpoint)
    if resume:
        checkpoints.load(resume)
    accelerator.init_trackers("logs", config=flat_hparams(config_to_dict(cfg)))
    unwrapped = accelerator.unwrap_model(model)
    label_names = teacher_run.record.label_names
    # The teacher's task, labels and inputs; this model's own size, and how it was made.
    record = replace(teacher_run.record, eval={}, step=None, pruning=None,
                     num_parameters=sum(p.numel() for p in unwrapped.parameters()),
                     architecture=type(unwrapped).__name__,
                     distillation={"teacher": teacher_run.run_dir.name, "teacher_eval": teacher_run.record.eval,
                                   "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
                                   "student": cfg.student.name_or_path or {
                                       "teacher_layers": student_layers(cfg, teacher)},
                                   **config_to_dict(cfg.distill)})

    def evaluate() -> tuple[dict[str, Any], bool]:
        """Score the eval split; keep model/ as the best model so far; say whether to stop early."""
        logits, labels = predict(accelerator, model, eval_loader)
        metrics = score_classifier(logits, labels, num_labels=len(label_names),
                                   label_names=label_names if image else None)
        stop = record_eval(accelerator, state, metrics, cfg.checkpoint, cfg.early_stopping, lambda: save_model_dir(
            accelerator, model, processor, run_dir / MODEL_DIR, replace(record, step=state.global_step, eval=metrics)))
        return metrics, stop

    # 5. The loop, epoch by epoch: teacher logits (cached or on the fly), KD loss, accumulate, clip, step; evaluate.
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
            labels, cached = batch.pop("labels"), batch.pop("teacher_logits", None)
            if augment is not None:  # keyed by the samples seen: a resumed run repeats it exactly
                batch["pixel_values"] = augment(batch["pixel_values"], key=state.samples_seen)
            with accelerator.accumulate(model):
                if cached is None:
                    with torch.no_grad():
                        cached = teacher(**batch).logits
                loss = kd_loss(model(**batch).logits, cached, labels, alpha=cfg.distill.alpha,
                               temperature=cfg.distill.temperature)
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


def text_data(cfg: Config, teacher_run: Any, teacher: torch.nn.Module, accelerator: Any) -> tuple:
    """Train / eval loaders of the teacher's text data, tokenized by its tokenizer (the student's too)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from finetune.data import build_dataloaders
    from finetune.text.data import TextDataConfig, encode_labels, load_raw_splits, tokenize_splits

    data = config_from_dict(TextDataConfig, cfg.data, prefix="data.")
    tokenizer = load_tokenizer(teacher_run)
    with accelerator.main_process_first():
        raw = load_raw_splits(data, seed=cfg.train.seed)
        labelled, _ = encode_labels(raw, data, regression=False, num_labels=len(data.label_names))
        tokenized = tokenize_splits(labelled, tokenizer, data)
    if cfg.distill.cache_teacher_logits:
        ordered = DataLoader(tokenized["train"].remove_columns(["length", "labels"]), shuffle=False,
                             batch_size=cfg.train.eval_batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
        logits = teacher_logits(teacher, ordered, accelerator.device)
        tokenized["train"] = tokenized["train"].add_column("teacher_logits", logits.tolist())
    train_loader, eval_loader = build_dataloaders(
        tokenized, DataCollatorWithPadding(tokenizer), batch_size=cfg.train.batch_size,
        eval_batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed, num_processes=accelerator.num_processes,
        group_by_length=data.group_by_length)
    return train_loader, eval_loader, tokenizer, None


def image_data(cfg: Config, teacher_run: Any, teacher: torch.nn.Module, accelerator: Any) -> tuple:
    """Train / eval loaders of the teacher's images, preprocessed as for the teacher; the augmenter."""
    from finetune.vision.augment import AugmentConfig, BatchAugmenter
    from finetune.vision.data import ImageDataConfig, build_image_dataloaders, load_image_splits, prepare_images
    from serve.bundle.preprocessing import PreprocessingSpec, normalize

    data = config_from_dict(ImageDataConfig, cfg.data, prefix="data.")
    augment = config_from_dict(AugmentConfig, cfg.augment, prefix="augment.")
    if cfg.distill.cache_teacher_logits and augment.enabled:
        raise ConfigError("cached teacher logits are of the un-augmented images; set augment.enabled=false or "
                          "distill.cache_teacher_logits=false")
    spec = PreprocessingSpec.from_dict(teacher_run.record.preprocessing)
    with accelerator.main_process_first():
        loaded, _ = load_image_splits(data, seed=cfg.train.seed, num_labels=len(data.label_names))
    splits = prepare_images(loaded, spec)
    extras = None
    if cfg.distill.cache_teacher_logits:
        images, size = splits["train"].images, cfg.train.eval_batch_size
        ordered = [{"pixel_values": torch.from_numpy(normalize(images[i:i + size], spec))}
                   for i in range(0, len(images), size)]
        extras = {"teacher_logits": teacher_logits(teacher, ordered, accelerator.device).numpy()}
    train_loader, eval_loader = build_image_dataloaders(
        splits, spec, batch_size=cfg.train.batch_size, eval_batch_size=cfg.train.eval_batch_size,
        seed=cfg.train.seed, num_processes=accelerator.num_processes, train_extras=extras)
    return train_loader, eval_loader, None, BatchAugmenter(augment, spec, seed=cfg.train.seed,
                                                           process_index=accelerator.process_index)


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, batches: Any, device: torch.device) -> torch.Tensor:
    """The teacher's logits for every example of `batches` (in order), on the CPU: [examples, classes]."""
    return torch.cat([teacher(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu() for b in batches])


def student_layers(cfg: Config, teacher: torch.nn.Module) -> list[int]:
    return cfg.student.layers or every_other_layer(teacher.config.num_hidden_layers)


def build_student(cfg: Config, teacher: torch.nn.Module, teacher_run: Any) -> torch.nn.Module:
    """The teacher's blocks `student.layers` (default every other one), or the model `student.name_or_path`."""
    from finetune.models import ModelConfig, build_tokenizer
    from finetune.text.models import build_sequence_classifier
    from finetune.vision.models import ImageModelConfig, build_image_classifier
    from serve.bundle.preprocessing import PreprocessingSpec

    names, name = teacher_run.record.label_names, cfg.student.name_or_path
    if name is None:
        student = layer_subset_student(teacher, student_layers(cfg, teacher))
    elif teacher_run.task == Task.IMAGE_CLASSIFICATION:
        spec = PreprocessingSpec.from_dict(teacher_run.record.preprocessing)
        student = build_image_classifier(ImageModelConfig(name_or_path=name, config=cfg.student.config),
                                         label_names=names, num_channels=spec.num_channels, image_size=spec.size)
    else:
        if build_tokenizer(ModelConfig(name_or_path=name)).get_vocab() != load_tokenizer(teacher_run).get_vocab():
            raise ConfigError(f"student {name} has another tokenizer than the teacher; a text student must share the "
                              "teacher's vocabulary (or leave student.name_or_path empty to use teacher layers)")
        student = build_sequence_classifier(ModelConfig(name_or_path=name), label_names=names,
                                            problem_type="single_label_classification")
    if hasattr(student, "set_attn_implementation") and name is None and teacher_run.task != Task.IMAGE_CLASSIFICATION:
        student.set_attn_implementation("sdpa")  # teacher copies come eager (the export form); sdpa trains faster
    record_shapes_(student)  # a pruned teacher's shapes, if any, in the student's config.json
    return student.requires_grad_(True).train()


if __name__ == "__main__":
    with exit_on_user_error():
        main(parse_config(Config))
