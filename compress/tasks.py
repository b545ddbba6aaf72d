"""Per-task export: the bundle assets and manifest sections, the parity cases, the fp32 graphs, eval-split metrics.

Parity inputs are built with the bundle's own tokenizer.json / preprocessing spec (serve.bundle.inputs), so every gate
also exercises the assets an app will use. Each task checks two sequence lengths (its shortest and longest samples)
at every batch size of the parity config; padded batches check the attention masks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ExportError
from compress.export import (
    LM_INPUTS,
    TEXT_INPUTS,
    Graph,
    cache_layout,
    export_causal_lm,
    export_classifier,
    export_decoder,
    forward_input_names,
)
from compress.parity import Case, ParityConfig, open_session
from compress.source import Run, Samples, image_splits, load_tokenizer, run_data_config, text_splits
from compress.units import attention_shape
from serve.bundle.decoding import empty_past
from serve.bundle.inputs import encode_texts, position_ids
from serve.bundle.manifest import TOKENIZER_FILE
from serve.bundle.preprocessing import PreprocessingSpec, normalize, preprocess_batch, to_model_pixels_batch
from serve.bundle.tasks import TEXT_TASKS, Task

logger = logging.getLogger(__name__)

LM_SAMPLE_CHARS = 300  # causal-LM parity prompts are cut to this many characters (~60-100 tokens)
EVAL_BATCH = 64
IMAGE_EVAL_BATCH = 256
LM_EVAL_BATCH = 4
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


def prepare_task(run: Run, model: Any, stage: Path, samples: Samples, parity: ParityConfig) -> TaskExport:
    """Write the task's assets into `stage` and build its parity cases."""
    if run.task in TEXT_TASKS:
        return TextClassifierExport(run, model, stage, samples, parity)
    if run.task == Task.CAUSAL_LM:
        return CausalLMExport(run, model, stage, samples, parity)
    return ImageClassifierExport(run, model, stage, samples, parity)


class TextClassifierExport(TaskExport):
    def __init__(self, run: Run, model: Any, stage: Path, samples: Samples, parity: ParityConfig):
        super().__init__(run, model, samples, parity)
        hf = load_tokenizer(run)
        max_length = int(run.record.max_length or hf.model_max_length)
        self.tokenizer = write_tokenizer(hf, stage, padding_side=hf.padding_side, max_length=max_length)
        self.input_names = forward_input_names(model, TEXT_INPUTS, tokenizer_inputs=hf.model_input_names)
        _check_tokenization(hf, self.tokenizer, samples.texts, samples.pairs, max_length=max_length,
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
        self.example = _with_pad_column(self.cases["model"][-1].feeds, hf.pad_token_id, side=hf.padding_side)

    def export(self, stage: Path, variant: str, *, opset: int) -> list[Graph]:
        return [export_classifier(self.model, stage / f"{variant}.onnx", example=self.example,
                                  input_names=self.input_names, opset=opset)]

    @property
    def primary_metric(self) -> tuple[str, bool]:
        return ("mae", False) if self.run.task == Task.TEXT_REGRESSION else ("accuracy", True)

    def _split(self, name: str) -> tuple[list[str], list[str] | None, np.ndarray] | None:
        """Texts, pairs and label ids (or values) of one split, labelled as the recipe did."""
        from finetune.data import encode_labels

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
            raise ExportError(f"{self.run.run_dir} recorded no train data (config.yaml `data`); static quantization "
                              "calibrates on it: set the compress config's `data` overrides, or quantize dynamically")
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


class CausalLMExport(TaskExport):
    def __init__(self, run: Run, model: Any, stage: Path, samples: Samples, parity: ParityConfig):
        super().__init__(run, model, samples, parity)
        hf = load_tokenizer(run)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else hf.eos_token_id
        pad = next(p for p in (model.generation_config.pad_token_id, hf.pad_token_id,
                               eos[0] if isinstance(eos, list) else eos) if p is not None)
        self.generation_ids = {"eos_token_id": eos, "pad_token_id": pad}
        self.tokenizer = write_tokenizer(hf, stage, padding_side="left", max_length=None, pad_token_id=pad)
        self.input_names = forward_input_names(model, LM_INPUTS)
        self.cache = cache_layout(model)
        texts = [t.strip()[:LM_SAMPLE_CHARS] for t in samples.texts]
        texts = [t for t in texts if len(self.tokenizer.encode(t).ids) >= 2]
        if not texts:
            raise ExportError(f"no parity prompt of 2+ tokens among the samples ({samples.source}); give samples")
        _check_tokenization(hf, self.tokenizer, texts, None, max_length=None, padding_side="left", pad_token_id=pad)
        block_size = run.record.block_size
        self.sections = {
            "labels": None,
            "text": {"max_length": block_size, "text_column": None, "text_pair_column": None},
            "tokenizer": tokenizer_section(hf, max_length=None, padding_side="left", pad_token_id=pad),
            "generation": {**(run.record.generation or {}), **self.generation_ids,
                           "max_positions": getattr(model.config, "max_position_embeddings", None)},
            "chat_template": getattr(hf, "chat_template", None),
            "cache": self.cache,
        }

        def encode(idx: list[int]) -> dict[str, np.ndarray]:
            return encode_texts(self.tokenizer, [texts[i] for i in idx], input_names=self.input_names)

        self.texts = texts
        lengths = [len(self.tokenizer.encode(t).ids) for t in texts]
        self.cases["model"] = [Case(c.name, c.feeds, {"logits": c.feeds["attention_mask"][:, :, None] > 0})
                               for c in length_cases(encode, lengths, parity.batch_sizes)]
        self.prompts = [{k: c.feeds[k] for k in ("input_ids", "attention_mask")} for c in self.cases["model"]]
        self.example = _with_pad_column(self.cases["model"][-1].feeds, pad, side="left")

    def export(self, stage: Path, variant: str, *, opset: int) -> list[Graph]:
        plain = export_causal_lm(self.model, stage / f"{variant}.onnx", example=self.example,
                                 input_names=self.input_names, opset=opset)
        decoder = export_decoder(self.model, stage / f"{variant}.decoder.onnx", example=self._decoder_example(),
                                 input_names=self.input_names, cache=self.cache, opset=opset)
        self.cases["decoder"] = self.decoder_cases(decoder.reference)
        return [plain, decoder]

    # Until the causal-LM recipe's data readers are here, quality is measured on the parity prompts (the run's eval
    # split when compress can read it, else built-in texts): next-token loss and perplexity of the "model" graph.
    primary_metric = ("perplexity", False)

    def _encode(self, idx: Any) -> Feeds:
        return encode_texts(self.tokenizer, [self.texts[i] for i in idx], input_names=self.input_names)

    def eval_data(self) -> EvalData | None:
        if self._eval is None:
            idx = range(len(self.texts))
            batches = [self._encode(idx[i:i + LM_EVAL_BATCH]) for i in range(0, len(idx), LM_EVAL_BATCH)]
            self._eval = EvalData(batches, None, f"parity prompts ({self.samples_source}, {len(self.texts)} texts)")
        return self._eval

    def reduce(self, logits: np.ndarray, feeds: Feeds) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over real (unpadded) positions, and their count."""
        logits, targets = logits[:, :-1].astype(np.float64), feeds["input_ids"][:, 1:]
        real = (feeds["attention_mask"][:, :-1] > 0) & (feeds["attention_mask"][:, 1:] > 0)
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
        nll = log_norm - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return float(nll[real].sum()), int(real.sum())

    def score(self, outputs: list[Any], data: EvalData) -> dict[str, Any]:
        tokens = sum(n for _, n in outputs)
        loss = sum(s for s, _ in outputs) / max(tokens, 1)
        return {"eval_loss": loss, "perplexity": math.exp(loss), "num_tokens": tokens, "source": data.source}

    def calibration_inputs(self, count: int) -> tuple[list[Feeds], str]:
        picks = [self._encode([i % len(self.texts)]) for i in range(min(count, len(self.texts)))]
        return picks, f"parity prompts ({len(picks)} texts; {self.samples_source})"

    def latency_inputs(self, batch_size: int) -> tuple[Feeds, str]:
        lengths = np.array([len(self.tokenizer.encode(t).ids) for t in self.texts])
        order = np.argsort(np.abs(lengths - np.median(lengths)), kind="stable")
        feeds = self._encode([int(order[i % len(order)]) for i in range(batch_size)])
        return feeds, (f"parity prompts: {batch_size} of median token length, left-padded to "
                       f"{feeds['input_ids'].shape[1]} (one forward of the no-cache graph)")

    def _present_names(self) -> list[str]:
        return [self.cache[f"present_{kind}"].format(i=i) for i in range(self.cache["num_layers"])
                for kind in ("key", "value")]

    def _decoder_example(self) -> dict[str, np.ndarray]:
        """Batch 3, a 2-token past (row 0 padded), 2 new tokens: tracing must take the general masked path."""
        ids = self.example["input_ids"][:, -2:]
        batch = ids.shape[0]
        mask = np.ones((batch, 4), dtype=np.int64)
        mask[0, 0] = 0
        shape = (batch, self.cache["num_kv_heads"], 2, self.cache["head_dim"])
        rng = np.random.default_rng(0)
        past = {name: rng.standard_normal(shape).astype(np.float32) for name in empty_past(self.cache, batch)}
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, past_length=2), **past}

    def decoder_cases(self, reference: Callable[[Feeds], dict[str, np.ndarray]]) -> list[Case]:
        """Prefill with an empty past, then 1 and 2 tokens fed with the reference's presents of that prefill (the
        PyTorch decoder for export; the fp32 graph for derived variants)."""
        present = self._present_names()
        past_names = list(empty_past(self.cache, 1))
        cases = []
        for case in self.cases["model"]:
            mask = case.feeds["attention_mask"]
            batch = mask.shape[0]
            feeds = {**case.feeds, **empty_past(self.cache, batch)}
            cases.append(Case(f"prefill, {case.name}", feeds, {"logits": mask[:, :, None] > 0,
                                                               **{n: mask[:, None, :, None] > 0 for n in present}}))
            ref = reference(feeds)
            token = ref["logits"][:, -1].argmax(axis=-1)
            for new in (1, 2):
                grown = np.concatenate([mask, np.ones((batch, new), dtype=np.int64)], axis=1)
                step = {"input_ids": np.tile(token[:, None], (1, new)).astype(np.int64), "attention_mask": grown,
                        "position_ids": position_ids(grown, past_length=mask.shape[1]),
                        **{p: ref[n] for p, n in zip(past_names, present, strict=True)}}
                cases.append(Case(f"{new} token(s) after the prefill, {case.name}", step,
                                  {n: grown[:, None, :, None] > 0 for n in present}))
        return cases


class ImageClassifierExport(TaskExport):
    def __init__(self, run: Run, model: Any, stage: Path, samples: Samples, parity: ParityConfig):
        super().__init__(run, model, samples, parity)
        self.fusion_args["model_type"] = None  # no transformer fusions for CNNs; ORT's own (Conv+BN, Conv+Relu) apply
        spec = run.record.preprocessing
        if not spec:
            raise ExportError(f"{run.model_dir}/tuneforge.json has no 'preprocessing'; image bundles need the spec")
        self.sections = {"labels": run.record.label_names, "preprocessing": spec}
        self.spec = PreprocessingSpec.from_dict(spec)
        self.input_names = ["pixel_values"]
        pixels = preprocess_batch(samples.images, self.spec)
        self.sample_pixels = pixels
        self.cases["model"] = []
        for size in parity.batch_sizes:
            idx = [i % len(pixels) for i in range(size)]
            self.cases["model"].append(Case(f"batch {size}", {"pixel_values": pixels[idx]}))
        self.example = self.cases["model"][-1].feeds

    def export(self, stage: Path, variant: str, *, opset: int) -> list[Graph]:
        return [export_classifier(self.model, stage / f"{variant}.onnx", example=self.example,
                                  input_names=["pixel_values"], opset=opset)]

    def _pixels(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        """uint8 [N, C, H, W] images of a split at the model's size and color mode, and their label ids."""
        splits = image_splits(self.run)
        if splits is None:
            return None
        return to_model_pixels_batch(splits[split].images, self.spec), splits[split].labels

    def eval_data(self) -> EvalData | None:
        if self._eval is None:
            found = self._pixels("eval")
            if found is None:
                return None
            pixels, labels = found
            batches = [{"pixel_values": normalize(pixels[i:i + IMAGE_EVAL_BATCH], self.spec)}
                       for i in range(0, len(pixels), IMAGE_EVAL_BATCH)]
            self._eval = EvalData(batches, labels, f"eval split ({len(labels)} images)")
        return self._eval

    def calibration_inputs(self, count: int) -> tuple[list[Feeds], str]:
        found = self._pixels("train")
        if found is None:
            raise ExportError(f"{self.run.run_dir} recorded no train data (config.yaml `data`); static quantization "
                              "calibrates on it: set the compress config's `data` overrides, or quantize dynamically")
        pixels, _ = found
        pick = np.sort(np.random.default_rng(self.run.seed).permutation(len(pixels))[:count])
        return ([{"pixel_values": normalize(pixels[i:i + 1], self.spec)} for i in pick],
                f"train split ({len(pick)} of {len(pixels)} images)")

    def latency_inputs(self, batch_size: int) -> tuple[Feeds, str]:
        found = self._pixels("eval")
        if found is None:
            pixels = self.sample_pixels
            return {"pixel_values": pixels[[i % len(pixels) for i in range(batch_size)]]}, \
                f"parity samples ({self.samples_source}): the first {batch_size}"
        return ({"pixel_values": normalize(found[0][[i % len(found[0]) for i in range(batch_size)]], self.spec)},
                f"eval split: the first {batch_size} image(s)")

    def score(self, outputs: list[Any], data: EvalData) -> dict[str, Any]:
        from finetune.evaluation import score_classifier

        return score_classifier(np.concatenate(outputs), data.labels, num_labels=len(self.run.record.label_names))


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


def _check_tokenization(hf: Any, tokenizer: Any, texts: list[str], pairs: list[str] | None, *,
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


def _with_pad_column(feeds: dict[str, np.ndarray], pad_id: int, *, side: str) -> dict[str, np.ndarray]:
    """The feeds with one more, padded, position: a tracing example whose attention mask surely has zeros."""
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "position_ids": 1}
    out = {}
    for name, array in feeds.items():
        column = np.full((array.shape[0], 1), fill[name], dtype=array.dtype)
        out[name] = np.concatenate([column, array] if side == "left" else [array, column], axis=1)
    return out
