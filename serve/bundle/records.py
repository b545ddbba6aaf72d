"""The typed records tuneforge writes: the run record (`model/tuneforge.json`, what a recipe records next to the
weights, read back by compress and the demo) and a bundle variant's record (how compress made it and what its gates
said, written into manifest.json). One writer and one reader each; standard library only.

Unknown run-record keys are kept in `extra` and written back, so a record from a newer tuneforge survives a round
trip.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.bundle.errors import BundleError
from serve.bundle.folders import replace_file, temp_path
from serve.bundle.tasks import TASKS, Task

RUN_RECORD = "tuneforge.json"


@dataclass
class RunRecord:
    """A trained model's task, labels, inputs and evaluation, as its recipe saw them."""

    task: Task
    step: int | None = None  # the optimizer step this model was saved at
    eval: dict[str, Any] = field(default_factory=dict)  # its eval metrics (PyTorch)
    base_model: str | None = None  # what fine-tuning started from (embedded:NAME, a folder or a hub id)
    label_names: list[str] | None = None  # classifiers: index = class id
    # Text tasks: the tokenization the model was trained with.
    max_length: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    # Image classification: the PreprocessingSpec as a dict (serve.bundle.preprocessing).
    preprocessing: dict[str, Any] | None = None
    architecture: str | None = None
    num_parameters: int | None = None
    # Causal LMs: the training block, the data format, the decoding defaults saved for serving.
    block_size: int | None = None
    data_format: str | None = None
    chat_template: bool | None = None  # trained on chat-formatted turns
    system_prompt: str | None = None
    generation: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    parameters: dict[str, int] | None = None  # {"trainable", "total"}
    # How a compress stage made the model from another run.
    pruning: dict[str, Any] | None = None
    distillation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data["task"] = str(self.task)
        return {**{k: v for k, v in data.items() if v is not None}, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = RUN_RECORD) -> RunRecord:
        """The record in `data`; a BundleError naming `source` when its task is unknown or a field is malformed."""
        if not isinstance(data, dict) or data.get("task") not in TASKS:
            task = data.get("task") if isinstance(data, dict) else None
            raise BundleError(f"{source} names task {task!r}; tuneforge knows {', '.join(TASKS)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        record = cls(**{**known, "task": Task(data["task"]), "eval": known.get("eval") or {}},
                     extra={k: v for k, v in data.items() if k not in names})
        if record.label_names is not None and not (isinstance(record.label_names, list)
                                                   and all(isinstance(n, str) for n in record.label_names)):
            raise BundleError(f"{source}: label_names must be a list of strings, got {record.label_names!r}")
        return record


def read_run_record(model_dir: str | Path) -> RunRecord:
    """`model_dir/tuneforge.json`."""
    path = Path(model_dir) / RUN_RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} cannot be read ({err}); point at the run directory of a finished recipe "
                          "run") from None
    return RunRecord.from_dict(data, source=str(path))


def write_run_record(model_dir: str | Path, record: RunRecord) -> None:
    """Write `model_dir/tuneforge.json` atomically."""
    path = Path(model_dir) / RUN_RECORD
    tmp = temp_path(path)
    tmp.write_text(json.dumps(record.to_dict(), indent=2, default=float) + "\n")
    replace_file(tmp, path)


@dataclass
class VariantRecord:
    """How a bundle variant was made and the verdicts of its gates (the manifest's variant entry, beyond what the
    writer measures itself: graphs, opset, sparsity, size, environment). docs/bundle-format.md describes each."""

    parent: str | None  # the variant it was derived from (None: an fp32 export)
    parity: dict[str, Any] | None = None  # the numeric gate's verdict
    metrics: dict[str, Any] | None = None  # task metrics on the eval split
    metric_gate: dict[str, Any] | None = None  # the task-metric gate's verdict
    optimization: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    derived: dict[str, Any] | None = None  # the run-to-run stage (prune, distill) that made its model
    session: dict[str, Any] | None = None  # ONNX Runtime settings it was measured with

    def __post_init__(self) -> None:
        if self.parity is None and self.metrics is None:
            raise ValueError("a variant needs the verdict of its gate: pass parity and/or metrics")
