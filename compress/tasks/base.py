"""What every task's export shares: the eval data, the TaskExport base, parity cases over sequence lengths, and
the bundle's tokenizer.json."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ExportError
from compress.export import Graph
from compress.parity import Case, ParityConfig, open_session
from compress.source import Run, Samples
from compress.units import attention_shape

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Predict = Callable[[Feeds], np.ndarray]  # graph inputs -> logits


@dataclass
class EvalData:
    """The eval split as graph inputs, batched once and reused for every variant (and the PyTorch baselines)."""

    batches: list[Feeds]
    labels: np.ndarray | None  # per example, in batch order (None for causal LMs: the targets are the inputs)
    source: str


class TaskExport:
    """What one task contributes to a bundle; `prepare_task` picks the subclass."""

    def __init__(self, run: Run, model: Any, samples: Samples, parity: ParityConfig):
        self.run, self.model, self.parity = run, model, parity
        self.samples_source = samples.source
        self.sections: dict[str, Any] = {}
        self.cases: dict[str, list[Case]] = {}
        self.prompts: list[dict[str, np.ndarray]] = []  # causal LMs: prompt batches for the greedy check
        self.generation_ids: dict[str, Any] = {}
        config = model.config
        # A pruned model's attention layers have fewer heads than its config says: tell the fusions how many. With a
        # different count in each layer, tell them nothing: they cannot read it from the graph and leave attention
        # unfused (the other fusions still apply).
        shape = attention_shape(model)
        if shape == (0, 0):  # no attention layers that tuneforge knows: the config's numbers
            shape = (getattr(config, "num_attention_heads", 0) or 0, getattr(config, "hidden_size", 0) or 0)
        heads, width = shape or (0, 0)
        self.fusion_args = {"model_type": getattr(config, "model_type", None), "num_heads": heads,
                            "hidden_size": width}
        record = run.record
        self.source_run = {"name": run.run_dir.name, "base_model": record.base_model, "step": record.step,
                           "eval": record.eval}
        self._eval: EvalData | None = None

    # What a task provides; subclasses override.
    primary_metric = ("accuracy", True)  # (the metric the gates compare by default, higher is better)
    input_names: list[str]

    def write_assets(self, stage: Path) -> None:
        """Write the task's files other than graphs (tokenizer.json) into the bundle folder `stage`."""

    def export(self, stage: Path, variant: str, *, opset: int) -> list[Graph]:
        raise NotImplementedError

    def eval_data(self) -> EvalData | None:
        """The eval split as batched graph inputs, or None where the run recorded no readable eval data."""
        return None

    def no_train_data(self) -> ExportError:
        """The error of a calibration that needs the train split when the run recorded none."""
        return ExportError(f"{self.run.run_dir} recorded no train data (config.yaml `data`); static quantization "
                           "calibrates on it: set the compress config's `data` overrides, or quantize dynamically")

    def calibration_inputs(self, count: int) -> tuple[list[Feeds], str]:
        """Up to `count` single-example inputs for static-quantization calibration, and where they came from."""
        raise NotImplementedError

    def latency_inputs(self, batch_size: int) -> tuple[Feeds, str]:
        """One batch of real inputs on which every variant's latency is measured, and what it holds."""
        raise NotImplementedError

    def score(self, outputs: list[Any], data: EvalData) -> dict[str, Any]:
        """Task metrics from the per-batch `reduce` results."""
        raise NotImplementedError

    def reduce(self, logits: np.ndarray, feeds: Feeds) -> Any:
        """What `score` needs of one batch's logits (the logits themselves for classifiers)."""
        return logits

    def evaluate(self, path: Path) -> dict[str, Any] | None:
        """This graph's task metrics on the eval split, or None where the run recorded no eval data."""
        if self.eval_data() is None:
            logger.warning("no eval split recorded for %s; metrics not computed", self.run.run_dir)
            return None
        session = open_session(path, threads=os.cpu_count() or 1)
        wanted = {i.name for i in session.get_inputs()}
        return self.evaluate_with(lambda feeds: session.run(["logits"], {k: v for k, v in feeds.items()
                                                                         if k in wanted})[0])

    def evaluate_with(self, predict: Predict) -> dict[str, Any] | None:
        """Task metrics of any predictor (an ONNX session, a PyTorch model) on the same eval batches."""
        data = self.eval_data()
        if data is None:
            return None
        return self.score([self.reduce(predict(feeds), feeds) for feeds in data.batches], data)


def length_cases(encode: Any, lengths: list[int], batch_sizes: tuple[int, ...]) -> list[Case]:
    """For each batch size, a batch of the shortest and one of the longest samples (cycled when too few)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cases = []
    for size in batch_sizes:
        picks = [order[i % len(order)] for i in range(size)], [order[-1 - i % len(order)] for i in range(size)]
        for idx in picks:
            feeds = encode(idx)
            cases.append(Case(f"batch {size} x sequence {feeds['input_ids'].shape[1]}", feeds))
    if len({c.feeds["input_ids"].shape[1] for c in cases}) < 2:
        logger.warning("all parity samples have the same token length; only one sequence length is checked")
    return cases


