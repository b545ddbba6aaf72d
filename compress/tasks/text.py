"""Text classification and regression: tokenizer.json, text parity cases, accuracy / MAE on the eval split."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from compress.export import TEXT_INPUTS, Graph, export_classifier, forward_input_names
from compress.parity import ParityConfig
from compress.source import Run, Samples, load_tokenizer, run_data_config, text_splits
from compress.tasks.base import EvalData, Feeds, TaskExport, length_cases
from compress.tasks.tokenizer import (
    bundle_tokenizer,
    check_tokenization,
    tokenizer_section,
    with_pad_column,
    write_tokenizer,
)
from serve.bundle.inputs import encode_texts
from serve.bundle.tasks import Task

logger = logging.getLogger(__name__)

EVAL_BATCH = 64


class TextClassifierExport(TaskExport):
    def __init__(self, run: Run, model: Any, samples: Samples, parity: ParityConfig):
        super().__init__(run, model, samples, parity)
        hf = load_tokenizer(run)
        max_length = int(run.record.max_length or hf.model_max_length)
        self.tokenizer = bundle_tokenizer(hf, padding_side=hf.padding_side, max_length=max_length)
        self.input_names = forward_input_names(model, TEXT_INPUTS, tokenizer_inputs=hf.model_input_names)
        check_tokenization(hf, self.tokenizer, samples.texts, samples.pairs, max_length=max_length,
                            padding_side=hf.padding_side)
        self.sections = {
            "labels": run.record.label_names if run.task == Task.TEXT_CLASSIFICATION else None,
            "text": {"max_length": max_length, "text_column": run.record.text_column,
                     "text_pair_column": run.record.text_pair_column},
            "tokenizer": tokenizer_section(hf, max_length=max_length, padding_side=hf.padding_side),
        }
        texts, pairs = samples.texts, samples.pairs
        self.sample_texts, self.sample_pairs = texts, pairs
        self._labelled: dict[str, Any] | None = None

        def encode(idx: list[int]) -> dict[str, np.ndarray]:
            return encode_texts(self.tokenizer, [texts[i] for i in idx],
                                [pairs[i] for i in idx] if pairs is not None else None, input_names=self.input_names)

        lengths = [int(encode([i])["attention_mask"].sum()) for i in range(len(texts))]
        self.cases["model"] = length_cases(encode, lengths, parity.batch_sizes)
        self.example = with_pad_column(self.cases["model"][-1].feeds, hf.pad_token_id, side=hf.padding_side)

    def write_assets(self, stage: Path) -> None:
        write_tokenizer(self.tokenizer, stage)

    def export(self, stage: Path, variant: str, *, opset: int) -> list[Graph]:
        return [export_classifier(self.model, stage / f"{variant}.onnx", example=self.example,
                                  input_names=self.input_names, opset=opset)]

    @property
    def primary_metric(self) -> tuple[str, bool]:
        return ("mae", False) if self.run.task == Task.TEXT_REGRESSION else ("accuracy", True)

    def _split(self, name: str) -> tuple[list[str], list[str] | None, np.ndarray] | None:
        """Texts, pairs and label ids (or values) of one split, labelled as the recipe did."""
        from finetune.text.data import encode_labels

        found, splits = run_data_config(self.run), text_splits(self.run)
        if found is None or splits is None:
            return None
        cfg, _ = found
        if self._labelled is None:
            regression = self.run.task == Task.TEXT_REGRESSION
            names = self.run.record.label_names
            self._labelled, _ = encode_labels(splits, cfg, regression=regression,
                                              num_labels=None if regression else len(names))
        rows = self._labelled[name]
        texts = [t if isinstance(t, str) else "" for t in rows[cfg.text_column]]
        pairs = [t if isinstance(t, str) else "" for t in rows[cfg.text_pair_column]] if cfg.text_pair_column else None
        return texts, pairs, np.asarray(rows["labels"])

    def _encode(self, texts: list[str], pairs: list[str] | None, idx: Any) -> Feeds:
        return encode_texts(self.tokenizer, [texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None,
                            input_names=self.input_names)

    def eval_data(self) -> EvalData | None:
        if self._eval is None:
            found = self._split("eval")
            if found is None:
                return None
            texts, pairs, labels = found
            # Batches of similar lengths (less padding, same metrics: labels follow the order).
            lengths = [len(e.ids) for e in self.tokenizer.encode_batch(texts)] if pairs is None else [0] * len(texts)
            order = np.argsort(lengths, kind="stable")
            batches = [self._encode(texts, pairs, order[i:i + EVAL_BATCH]) for i in range(0, len(order), EVAL_BATCH)]
            self._eval = EvalData(batches, labels[order], f"eval split ({len(texts)} rows)")
        return self._eval

    def calibration_inputs(self, count: int) -> tuple[list[Feeds], str]:
        found = self._split("train")
        if found is None:
            raise self.no_train_data()
        texts, pairs, _ = found
        pick = np.sort(np.random.default_rng(self.run.seed).permutation(len(texts))[:count])
        return [self._encode(texts, pairs, [i]) for i in pick], f"train split ({len(pick)} of {len(texts)} rows)"

    def latency_inputs(self, batch_size: int) -> tuple[Feeds, str]:
        found = self._split("eval")
        texts, pairs = (found[0], found[1]) if found else (self.sample_texts, self.sample_pairs)
        lengths = np.array([len(e.ids) for e in self.tokenizer.encode_batch(texts)])
        # The rows nearest the median length: a typical request (cycled when the split is smaller than the batch).
        order = np.argsort(np.abs(lengths - np.median(lengths)), kind="stable")
        idx = [int(order[i % len(order)]) for i in range(batch_size)]
        feeds = self._encode(texts, pairs, idx)
        where = "eval split" if found else f"parity samples ({self.samples_source})"
        return feeds, f"{where}: {batch_size} row(s) of median token length, padded to {feeds['input_ids'].shape[1]}"

    def score(self, outputs: list[Any], data: EvalData) -> dict[str, Any]:
        from finetune.evaluation import score_classifier, score_regressor

        logits = np.concatenate(outputs)
        if self.run.task == Task.TEXT_REGRESSION:
            return score_regressor(logits, data.labels)
        return score_classifier(logits, data.labels, num_labels=len(self.run.record.label_names))


