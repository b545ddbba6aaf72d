"""Prune a run: structured (attention heads, FFN neurons, conv channels: smaller dense layers) or unstructured
(global magnitude: zeros), with an optional recovery fine-tune by the task's own recipe; writes a new run directory.

    from compress.prune import PruneConfig, prune_run
    prune_run("runs/sst2", "runs/sst2-pruned", config=PruneConfig(heads=0.35, ffn=0.35, recovery_steps=200))
    python -m compress export runs/sst2-pruned --out bundles/sst2-pruned    # gated like any run

The result is a complete run directory: model/ (safetensors; shapes its config cannot describe are recorded in
config.json and rebuilt by finetune.shapes on load), tuneforge.json with a `pruning` record (targets, units and
parameters before/after, the kept heads/neurons/channels by their original index, measured sparsity, the source
run), metrics.json from its evaluation, config.yaml. With `rounds` > 1 the pruning is iterative: prune an equal
share, recover, score again, repeat.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from compress.errors import StageError
from compress.run_data import RunData
from compress.source import Run, load_model, read_run
from compress.sparsity import prune_magnitude_
from compress.structured import gradient_scores, magnitude_scores, prune_units_
from compress.training import (
    OUTPUT_RUN_GUARD,
    TASK_RECIPES,
    Trainer,
    check_output_run,
    require_trainer,
    temp_dir_near,
)
from compress.units import KINDS, find_units, update_config_
from finetune.rundir import MODEL_DIR, write_json
from finetune.shapes import record_shapes_
from serve.bundle.folders import RUN_PART, clear_folder, remove_temp, replace_folder, write_run_marker
from serve.bundle.records import RUN_RECORD, RunRecord, write_run_record
from serve.bundle.tasks import Task

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", RUN_RECORD)


@dataclass
class PruneConfig:
    """What to remove, how units are ranked, and the recovery fine-tune."""

    method: Literal["structured", "unstructured"] = "structured"
    # structured: the share of units to remove (of each layer with scope "layer")
    heads: float = 0.0  # attention heads (BERT-style, Llama-style, GPT-2)
    ffn: float = 0.0  # FFN neurons of transformer blocks; hidden units of the CNN / MLP classifier heads
    channels: float = 0.0  # conv output channels (SimpleCNN; inside ResNet blocks)
    scope: Literal["layer", "global"] = "layer"  # layer: the same share of each layer (uniform shapes); global: ranked
    importance: Literal["gradient", "magnitude"] = "gradient"  # gradient: |sum of w * dL/dw| per unit, train batches
    importance_batches: int = 16
    batch_size: int = 32
    # unstructured: the share of Linear / Conv weights set to zero (one global magnitude threshold)
    sparsity: float = 0.0
    include_embeddings: bool = False
    rounds: int = 1  # iterative: prune 1/rounds of the target, recover, re-score, ... (recovery_steps > 0)
    recovery_steps: int = 0  # optimizer steps of the task's recipe after each round; 0: no recovery
    recovery_overrides: list[str] = field(default_factory=list)  # recipe settings for recovery, e.g. optim.lr=1.0e-4

    def __post_init__(self) -> None:
        for name in ("heads", "ffn", "channels", "sparsity"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        structured = any(getattr(self, k) for k in KINDS)
        if self.method == "structured" and (not structured or self.sparsity):
            raise ValueError("structured pruning needs heads, ffn or channels > 0 (and no sparsity)")
        if self.method == "unstructured" and (structured or not self.sparsity):
            raise ValueError("unstructured pruning needs sparsity > 0 (and no heads, ffn or channels)")
        if self.rounds < 1 or self.recovery_steps < 0 or self.importance_batches < 1 or self.batch_size < 1:
            raise ValueError("rounds, importance_batches and batch_size must be >= 1, recovery_steps >= 0")
        if self.rounds > 1 and not self.recovery_steps:
            raise ValueError("rounds > 1 (iterative pruning) needs recovery_steps > 0 between the rounds")


def prune_run(run_dir: str | Path, out_dir: str | Path, *, config: PruneConfig, overwrite: bool = False,
              trainer: Trainer | None = None) -> Path:
    """Prune the model of `run_dir` into a new run directory `out_dir` (written whole, or not at all); `trainer`
    runs the recovery fine-tunes (needed when recovery_steps > 0; see compress.training)."""
    out = Path(out_dir)
    check_output_run(out, overwrite=overwrite)
    if config.recovery_steps:
        trainer = require_trainer(trainer, "pruning recovery (recovery_steps > 0)")
    source = read_run(run_dir)
    if config.scope == "global" and config.heads and source.task == Task.CAUSAL_LM:
        raise StageError("global head pruning gives decoder layers different KV-cache shapes, which bundles do not "
                         "support; use scope: layer for causal LMs")
    work = temp_dir_near(out, "prune")
    try:
        replace_folder(_prune(source, work, config, trainer), out, OUTPUT_RUN_GUARD)
    finally:
        remove_temp(work)
    logger.info("pruned run written to %s", out)
    return out


def _prune(source: Run, work: Path, config: PruneConfig, trainer: Trainer | None) -> Path:
    """Rounds of prune (+ recover) in `work`; returns the finished run directory (inside `work`)."""
    model = load_model(source)
    data = RunData(source, batch_size=config.batch_size)  # the same splits in every round (recovery keeps them)
    before, units_before = _count_parameters(model), _unit_counts(model)
    pruning: dict[str, Any] = {**asdict(config), "source_run": source.run_dir.name,
                               "source_eval": source.record.eval, "parameters_before": before}
    kept: dict[str, list[int]] = {}  # unit group -> kept units by their index in the source model
    current, recovered = source, False
    for round_ in range(1, config.rounds + 1):
        if round_ > 1:
            model = load_model(current)
        share = round_ / config.rounds  # of the full target, reached by the end of this round
        if config.method == "unstructured":
            pruning["sparsity_measured"] = prune_magnitude_(model, config.sparsity * share,
                                                            include_embeddings=config.include_embeddings)
        else:
            _prune_structured(model, data, config, round_, kept)
        if not config.recovery_steps:
            break
        current = _recover(model, current, source, work / f"round{round_}", config, trainer)
        recovered = True
    if config.method == "unstructured" and recovered:
        # The recipes' optimizers do not keep masks: recovery regrows some zeros; prune the recovered weights again
        # (so the result is evaluated here, not by the recipe).
        model = load_model(current)
        pruning["sparsity_measured"] = prune_magnitude_(model, config.sparsity,
                                                        include_embeddings=config.include_embeddings)
    if config.method == "structured":
        after = _unit_counts(model)
        pruning["units"] = {k: {"before": n, "after": after[k]} for k, n in units_before.items()}
        pruning["kept"] = kept
    pruning["parameters_after"] = _count_parameters(model)
    if recovered and config.method == "structured":  # the recipe's run is the result: model/, metrics.json, ...
        final = current.run_dir
        record = current.record
    else:
        final = work / "result"
        record = _write_run(model, current, data, final)
    write_run_record(final / MODEL_DIR, replace(record, base_model=source.record.base_model, pruning=pruning))
    metrics = json.loads((final / "metrics.json").read_text())
    write_json(final / "metrics.json", {**metrics, "pruning": pruning})
    return final


def _prune_structured(model: torch.nn.Module, data: RunData, config: PruneConfig, round_: int,
                      kept: dict[str, list[int]]) -> None:
    """One round: score the units, remove this round's share, describe the new shapes in the config."""
    groups = find_units(model)
    wanted = {k: getattr(config, k) for k in KINDS if getattr(config, k)}
    missing = [k for k in wanted if not any(g.kind == k for g in groups)]
    if missing:
        raise StageError(f"{type(model).__name__} has no {' or '.join(missing)} that tuneforge can prune; set "
                         f"{' and '.join(missing)} to 0 (heads/ffn: transformers, channels: SimpleCNN and ResNet)")
    # The round's share of the units still there, so that round r has removed r/rounds of the target.
    done, target = (round_ - 1) / config.rounds, round_ / config.rounds
    fractions = {k: 1 - (1 - f * target) / (1 - f * done) for k, f in wanted.items()}
    if config.importance == "gradient":
        scores = gradient_scores(model, groups, data.train_batches(config.importance_batches))
    else:
        scores = magnitude_scores(groups)
    for group in groups:
        kept.setdefault(group.where, list(range(group.units)))
    report = prune_units_(groups, scores, fractions, scope=config.scope)
    for row in report.groups:
        kept[row["where"]] = [kept[row["where"]][i] for i in row["kept"]]
    update_config_(model)
    record_shapes_(model)
    logger.info("round %d: %s", round_, ", ".join(f"{k} {a} -> {b}" for k in wanted
                                                 for a, b in [report.count(k)]))


def _recover(model: torch.nn.Module, current: Run, source: Run, work: Path, config: PruneConfig,
             trainer: Trainer) -> Run:
    """Fine-tune the pruned model with the task's recipe, on the source run's data and settings."""
    pruned = work / "pruned"
    _save_model_dir(model, current, pruned / MODEL_DIR, current.record)
    config_file = source.run_dir / "config.yaml"
    if not config_file.is_file():
        raise StageError(f"{source.run_dir} has no config.yaml: recovery reruns its recipe with its settings; "
                         "set recovery_steps: 0")
    steps = config.recovery_steps
    # A distilled run recovers by distillation from its teacher (its config.yaml is recipes/distill.py's).
    recipe, model_key = ("distill", "student") if "teacher" in (source.config or {}) else (
        TASK_RECIPES[source.task], "model")
    args = ["--config", str(config_file), f"{model_key}.name_or_path={(pruned / MODEL_DIR).resolve()}",
            f"train.output_dir={(work / 'run').resolve()}", "train.overwrite=true", "checkpoint.resume_from=null",
            # epochs >= steps, so that max_steps ends the recovery
            f"train.max_steps={steps}", f"train.epochs={steps}"]
    if source.task == Task.IMAGE_CLASSIFICATION:
        args.append(f"{model_key}.config={{}}")  # the architecture comes from the pruned model's own config
    trainer(recipe, [*args, *config.recovery_overrides], log=work / "recipe.log")
    clear_folder(pruned, RUN_PART)
    return read_run(work / "run")


def _write_run(model: torch.nn.Module, current: Run, data: RunData, out: Path) -> RunRecord:
    """A run directory for a model that was not trained after pruning: model/, metrics.json, config.yaml."""
    metrics = data.evaluate(model) if _has_data(current) else {}
    record = replace(current.record, eval=metrics)
    _save_model_dir(model, current, out / MODEL_DIR, record)
    write_run_marker(out)
    write_json(out / "metrics.json", {"eval": metrics})
    if (current.run_dir / "config.yaml").is_file():
        shutil.copy(current.run_dir / "config.yaml", out / "config.yaml")
    return record


def _has_data(run: Run) -> bool:
    return run.task == Task.CAUSAL_LM or isinstance((run.config or {}).get("data"), dict)


def _save_model_dir(model: torch.nn.Module, run: Run, path: Path, record: RunRecord) -> None:
    """save_pretrained (safetensors) + the source model folder's tokenizer / processor files + tuneforge.json."""
    path.mkdir(parents=True)
    model.save_pretrained(path, safe_serialization=True)
    for item in run.model_dir.iterdir():
        if item.is_file() and item.name not in WEIGHT_FILES and not item.name.startswith("model-"):
            shutil.copy(item, path / item.name)
    write_run_record(path, record)


def _unit_counts(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in find_units(model):
        counts[group.kind] = counts.get(group.kind, 0) + group.units
    return counts


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
