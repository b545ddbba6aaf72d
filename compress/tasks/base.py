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
from compress.export import (
    TEXT_INPUTS,
    Graph,
)
from compress.parity import Case, ParityConfig, open_session
from compress.source import Run, Samples
from compress.units import attention_shape
from serve.bundle.inputs import encode_texts
from serve.bundle.manifest import TOKENIZER_FILE

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

    def export(self, stage: Path, variant: str, *, opset: int) -> list[Graph]:
        raise NotImplementedError

    def eval_data(self) -> EvalData | None:
        """The eval split as batched graph inputs, or None where the run recorded no readable eval data."""
        return None

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


def write_tokenizer(hf: Any, stage: Path, *, padding_side: str, max_length: int | None,
                    pad_token_id: int | None = None) -> Any:
    """Save the fast tokenizer's `tokenizers` object with training's truncation and padding set in the file."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length, direction=hf.truncation_side)
    pad_id = hf.pad_token_id if pad_token_id is None else pad_token_id
    tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_type_id=hf.pad_token_type_id,
                             pad_token=hf.convert_ids_to_tokens(pad_id))
    tokenizer.save(str(stage / TOKENIZER_FILE))
    return Tokenizer.from_file(str(stage / TOKENIZER_FILE))


def tokenizer_section(hf: Any, *, max_length: int | None, padding_side: str,
                      pad_token_id: int | None = None) -> dict[str, Any]:
    pad_id = hf.pad_token_id if pad_token_id is None else pad_token_id
    return {"file": TOKENIZER_FILE, "padding_side": padding_side, "truncation_side": hf.truncation_side,
            "max_length": max_length, "add_special_tokens": True, "pad_token": hf.convert_ids_to_tokens(pad_id),
            "pad_token_id": pad_id, "bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id,
            "special_tokens": list(hf.all_special_tokens), "model_input_names": list(hf.model_input_names)}


def check_tokenization(hf: Any, tokenizer: Any, texts: list[str], pairs: list[str] | None, *,
                        max_length: int | None, padding_side: str, pad_token_id: int | None = None) -> None:
    """tokenizer.json alone must encode the samples exactly as the training tokenizer does."""
    hf.padding_side = padding_side
    if pad_token_id is not None and hf.pad_token_id is None:
        hf.pad_token = hf.convert_ids_to_tokens(pad_token_id)
    want = hf(texts, pairs, truncation=max_length is not None, max_length=max_length, padding=True)
    got = encode_texts(tokenizer, texts, pairs, input_names=TEXT_INPUTS)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        if name in want and not np.array_equal(np.asarray(want[name]), got[name]):
            raise ExportError(f"tokenizer.json does not reproduce the run's tokenizer ({name} differ on the parity "
                              "samples); the bundle would tokenize differently from training")


def with_pad_column(feeds: dict[str, np.ndarray], pad_id: int, *, side: str) -> dict[str, np.ndarray]:
    """The feeds with one more, padded, position: a tracing example whose attention mask surely has zeros."""
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "position_ids": 1}
    out = {}
    for name, array in feeds.items():
        column = np.full((array.shape[0], 1), fill[name], dtype=array.dtype)
        out[name] = np.concatenate([column, array] if side == "left" else [array, column], axis=1)
    return out

