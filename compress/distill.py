"""Knowledge distillation: train a smaller student on a teacher run's soft targets (recipes/distill.py runs the loop).

    from compress.distill import DistillConfig, distill_run
    distill_run("runs/sst2", "runs/sst2-student", config=DistillConfig(student_layers=[0, 2, 4]))

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the soft-target gradients on the scale of the hard-label ones as T changes (Hinton et al., 2015). A
student is the teacher with fewer layers, each initialised from a teacher layer (every other one by default), or a
model given by name (e.g. tuneforge's simple CNN under a ResNet teacher).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import StageError
from compress.source import read_run
from compress.training import OUTPUT_RUN_GUARD, Trainer, check_output_run, require_trainer, temp_dir_near
from serve.bundle.folders import remove_temp, replace_folder
from serve.bundle.tasks import Task

logger = logging.getLogger(__name__)

DEFAULT_CONFIGS = {Task.TEXT_CLASSIFICATION: "default.yaml", Task.IMAGE_CLASSIFICATION: "mnist_resnet_to_cnn.yaml"}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, alpha: float,
            temperature: float) -> torch.Tensor:
    """alpha x cross-entropy on the labels + (1 - alpha) x T^2 x KL(teacher || student) of the temperature-softened
    distributions, averaged over the batch. Logits: [batch, classes]; labels: [batch] class ids."""
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=-1), log_target=True,
                    reduction="batchmean")
    return alpha * hard + (1 - alpha) * temperature**2 * soft


def layer_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The transformer's list of blocks: (its parent module, its attribute name, the list)."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and name:
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise StageError(f"{type(model).__name__} has no list of {num_layers} blocks to take student layers from; give "
                     "the student as student.name_or_path instead")


def every_other_layer(num_layers: int) -> list[int]:
    """The default student: teacher layers 0, 2, 4, ... (half of them, rounded up)."""
    return list(range(0, num_layers, 2))


def layer_subset_student(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of `teacher` that keeps only the blocks `layers` (in that order), each with the teacher's weights;
    embeddings and heads are the teacher's too. Pruned shapes carry over (recorded again by the recipe)."""
    num_layers = teacher.config.num_hidden_layers
    if not layers or any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
        raise StageError(f"student.layers must be distinct teacher layers in 0..{num_layers - 1}, got {layers}")
    student = copy.deepcopy(teacher)
    parent, attr, blocks = layer_stack(student)
    kept = nn.ModuleList([blocks[i] for i in layers])
    for new_index, block in enumerate(kept):
        for module in block.modules():  # KV caches are indexed by the block's position
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    setattr(parent, attr, kept)
    config = student.config
    for name, value in vars(config).items():  # per-layer settings (e.g. Llama's layer_types) follow their layers
        if isinstance(value, list) and len(value) == num_layers and not name.startswith("_"):
            setattr(config, name, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    return student


@dataclass
class DistillConfig:
    """Settings of `distill_run`; None keeps the recipe YAML's value."""

    config_file: str | None = None  # a distill recipe YAML; None: the trainer's distill/DEFAULT_CONFIGS[task]
    student_layers: list[int] | None = None  # teacher layers the student keeps (transformer teachers)
    student_model: str | None = None  # another student: a model folder / hub id, or simple_cnn / mlp / resnet
    student_config: dict[str, Any] | None = None  # a built-in image student's architecture (model.config settings)
    alpha: float | None = None  # weight of the hard-label loss
    temperature: float | None = None
    cache_teacher_logits: bool | None = None  # compute the teacher's train logits once instead of every step
    max_steps: int | None = None
    epochs: int | None = None
    lr: float | None = None
    overrides: list[str] = field(default_factory=list)  # any other recipe setting, as key.sub=value

    def recipe_args(self) -> list[str]:
        """This config as recipe overrides (YAML values, so lists and mappings keep their types)."""
        settings = {"student.layers": self.student_layers, "student.name_or_path": self.student_model,
                    "student.config": self.student_config, "distill.alpha": self.alpha,
                    "distill.temperature": self.temperature, "distill.cache_teacher_logits": self.cache_teacher_logits,
                    "train.max_steps": self.max_steps, "train.epochs": self.epochs, "optim.lr": self.lr}
        return [f"{k}={json.dumps(v)}" for k, v in settings.items() if v is not None] + list(self.overrides)


def distill_run(teacher_run: str | Path, out_dir: str | Path, *, config: DistillConfig | None = None,
                overwrite: bool = False, trainer: Trainer | None = None) -> Path:
    """Distill the model of `teacher_run` into a student: `trainer` runs the distill recipe (see compress.training),
    whose run directory lands in `out_dir` (model/, metrics.json, config.yaml, logs/; tuneforge.json records the
    distillation)."""
    config = config or DistillConfig()
    out = Path(out_dir)
    check_output_run(out, overwrite=overwrite)
    trainer = require_trainer(trainer, "distillation")
    teacher = read_run(teacher_run)
    if config.config_file is None and teacher.task not in DEFAULT_CONFIGS:
        raise StageError(f"distillation trains classifiers; {teacher.run_dir} is a {teacher.task} run")
    config_file = config.config_file or str(trainer.config(f"distill/{DEFAULT_CONFIGS[teacher.task]}"))
    work = temp_dir_near(out, "distill")
    try:
        args = ["--config", config_file, f"teacher={teacher.run_dir.resolve()}",
                f"train.output_dir={(work / 'run').resolve()}", "train.overwrite=true", *config.recipe_args()]
        trainer("distill", args, log=work / "recipe.log")
        replace_folder(work / "run", out, OUTPUT_RUN_GUARD)
    finally:
        remove_temp(work)
    logger.info("distilled run written to %s", out)
    return out
