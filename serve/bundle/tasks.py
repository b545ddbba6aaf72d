"""The tasks tuneforge trains, exports and serves: each name defined once. Standard library only."""

from __future__ import annotations

from enum import Enum


class Task(str, Enum):
    """A task name as run records (`model/tuneforge.json`) and manifests (`manifest.json`) store it."""

    TEXT_CLASSIFICATION = "text-classification"
    TEXT_REGRESSION = "text-regression"
    CAUSAL_LM = "causal-lm"
    IMAGE_CLASSIFICATION = "image-classification"

    def __str__(self) -> str:
        return self.value


TASKS = tuple(t.value for t in Task)
TEXT_TASKS = (Task.TEXT_CLASSIFICATION, Task.TEXT_REGRESSION)  # tokenizer + sequence classifier
# What `predict` serves (scores per input, labels but for regression); the rest generates text.
PREDICT_TASKS = (Task.TEXT_CLASSIFICATION, Task.TEXT_REGRESSION, Task.IMAGE_CLASSIFICATION)
