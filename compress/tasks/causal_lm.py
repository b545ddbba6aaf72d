"""Causal LMs: the no-cache and KV-cache decoder graphs, prompt parity cases, perplexity on the eval split."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ExportError
from compress.export import LM_INPUTS, Graph, cache_layout, export_causal_lm, export_decoder, forward_input_names
from compress.parity import Case, ParityConfig
from compress.source import Run, Samples, load_tokenizer
from compress.tasks.base import EvalData, Feeds, TaskExport, length_cases
from compress.tasks.tokenizer import (
    bundle_tokenizer,
    check_tokenization,
    tokenizer_section,
    with_pad_column,
    write_tokenizer,
)
from serve.bundle.decoding import empty_past
from serve.bundle.inputs import encode_texts, position_ids

logger = logging.getLogger(__name__)

LM_SAMPLE_CHARS = 300  # causal-LM parity prompts are cut to this many characters (~60-100 tokens)
LM_EVAL_BATCH = 4


class CausalLMExport(TaskExport):
    def __init__(self, run: Run, model: Any, samples: Samples, parity: ParityConfig):
        super().__init__(run, model, samples, parity)
        hf = load_tokenizer(run)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else hf.eos_token_id
        pad = next(p for p in (model.generation_config.pad_token_id, hf.pad_token_id,
                               eos[0] if isinstance(eos, list) else eos) if p is not None)
        self.generation_ids = {"eos_token_id": eos, "pad_token_id": pad}
        self.tokenizer = bundle_tokenizer(hf, padding_side="left", max_length=None, pad_token_id=pad)
        self.input_names = forward_input_names(model, LM_INPUTS)
        self.cache = cache_layout(model)
        texts = [t.strip()[:LM_SAMPLE_CHARS] for t in samples.texts]
        texts = [t for t in texts if len(self.tokenizer.encode(t).ids) >= 2]
        if not texts:
            raise ExportError(f"no parity prompt of 2+ tokens among the samples ({samples.source}); give samples")
        check_tokenization(hf, self.tokenizer, texts, None, max_length=None, padding_side="left", pad_token_id=pad)
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
        self.example = with_pad_column(self.cases["model"][-1].feeds, pad, side="left")

    def write_assets(self, stage: Path) -> None:
        write_tokenizer(self.tokenizer, stage)

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


