"""Per-task export: the bundle assets and manifest sections, the parity cases, the fp32 graphs, eval-split metrics.

Parity inputs are built with the bundle's own tokenizer.json / preprocessing spec (serve.bundle.inputs), so every gate
also exercises the assets an app will use. Each task checks two sequence lengths (its shortest and longest samples)
at every batch size of the parity config; padded batches check the attention masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.parity import ParityConfig
from compress.source import Run, Samples
from compress.tasks.base import EvalData, Feeds, Predict, TaskExport
from compress.tasks.causal_lm import CausalLMExport
from compress.tasks.image import ImageClassifierExport
from compress.tasks.text import TextClassifierExport
from compress.tasks.tokenizer import bundle_tokenizer, tokenizer_section
from serve.bundle.tasks import Task

__all__ = ["EvalData", "Feeds", "Predict", "TaskExport", "bundle_tokenizer", "prepare_task", "tokenizer_section"]

# One exporter per task: a new task is a new module here and one line in this table.
EXPORTERS: dict[Task, type[TaskExport]] = {
    Task.TEXT_CLASSIFICATION: TextClassifierExport,
    Task.TEXT_REGRESSION: TextClassifierExport,
    Task.CAUSAL_LM: CausalLMExport,
    Task.IMAGE_CLASSIFICATION: ImageClassifierExport,
}


def prepare_task(run: Run, model: Any, stage: Path, samples: Samples, parity: ParityConfig) -> TaskExport:
    """The task's exporter (its parity cases built, nothing written), with its assets written into `stage`."""
    exporter = EXPORTERS[run.task](run, model, samples, parity)
    exporter.write_assets(stage)
    return exporter
