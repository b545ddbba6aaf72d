"""Gradient attributions for run directories (PyTorch): integrated gradients through Captum.

    from compress.attribution import GradientExplainer
    explainer = GradientExplainer.from_run("runs/reviews")
    why = explainer.explain("A dull, lifeless film with one good scene.")        # words, like serve.explain
    print(why.target, why.top(3), f"{why.convergence_delta:.2g}")

Text: LayerIntegratedGradients on the model's input embedding layer, from a baseline where every word piece of the
text is the tokenizer's mask token (else unknown, else pad; special tokens such as [CLS] stay), so it answers the same
question as serve.explain's masking; token attributions (summed over the hidden size) are summed per word with the
tokenizer's offsets (words as serve.bundle.inputs.words_of finds them). Images: IntegratedGradients on the preprocessed
pixels from the training-mean baseline (0 after normalisation), summed over channels, with the heatmap resized to the
input's size. The explained output is the target's probability, so attributions add up to p(input) - p(baseline) up
to `convergence_delta`.

Attributions are in the same units and word split as serve.explain's, so `serve.explain.deletion_insertion(predictor,
text, why.attributions)` measures their faithfulness against the bundle. Needs torch (the train extra) and captum
(`pip install 'tuneforge[explain]'`); never imported by the torch-free runtime.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ExportError
from serve.bundle.errors import TuneforgeError
from serve.bundle.inputs import words_of
from serve.bundle.preprocessing import PreprocessingSpec, load_image, preprocess
from serve.bundle.tasks import Task

MASK_ATTRIBUTES = ("mask_token_id", "unk_token_id", "pad_token_id")  # the text baseline's token, in this order


class AttributionError(TuneforgeError, ValueError):
    """An input or option an attribution cannot use (empty text, unknown target, steps below 1)."""


@dataclass(frozen=True)
class GradientAttribution:
    """Integrated gradients toward `target` for one input: per word (text) or per pixel (images)."""

    method: str  # "integrated-gradients"
    target: str | None
    target_index: int
    score: float  # p(target | input), or the regression value
    attributions: np.ndarray  # text: float64 [words]; images: float64 [model height, model width]
    steps: int
    convergence_delta: float  # |sum of attributions - (p(input) - p(baseline))|: the integral's error
    seconds: float
    text: str | None = None
    words: list[str] | None = None
    spans: list[tuple[int, int]] | None = None
    heatmap: np.ndarray | None = None  # images: float32 [input height, input width]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """Text: the k words with the largest attributions toward the target, largest first."""
        if self.words is None:
            raise AttributionError("top() lists words; an image attribution has a heatmap instead")
        order = np.argsort(-self.attributions, kind="stable")[:k]
        return [(self.words[i], float(self.attributions[i])) for i in order]


class GradientExplainer:
    """Integrated gradients of one PyTorch classifier (a run's model, or any module with the same call signature).

    model: a transformers sequence / image classifier (output `.logits`), eval mode.
    tokenizer: its fast tokenizer (text); spec: its preprocessing (images); labels: class names.
    """

    def __init__(self, model: Any, *, task: str, labels: Sequence[str] | None = None, tokenizer: Any = None,
                 spec: PreprocessingSpec | None = None, max_length: int | None = None):
        if task == Task.IMAGE_CLASSIFICATION and spec is None:
            raise AttributionError("an image classifier needs its preprocessing spec")
        if task in (Task.TEXT_CLASSIFICATION, Task.TEXT_REGRESSION) and tokenizer is None:
            raise AttributionError("a text classifier needs its tokenizer")
        self.model, self.task, self.labels = model, task, list(labels or [])
        self.tokenizer, self.spec, self.max_length = tokenizer, spec, max_length

    @classmethod
    def from_run(cls, run_dir: str | Path) -> GradientExplainer:
        """The explainer of a finished run directory's model (loaded once; reuse it for many inputs)."""
        from compress.source import load_model, load_tokenizer, read_run

        run = read_run(run_dir)
        if run.task == Task.CAUSAL_LM:
            raise AttributionError(f"{run_dir} is a causal LM; attributions are for text and image classifiers")
        model = load_model(run)
        record = run.record
        if run.task == Task.IMAGE_CLASSIFICATION:
            return cls(model, task=run.task, labels=record.label_names,
                       spec=PreprocessingSpec.from_dict(record.preprocessing))
        tokenizer = load_tokenizer(run)
        return cls(model, task=run.task, labels=record.label_names, tokenizer=tokenizer,
                   max_length=int(record.max_length or tokenizer.model_max_length))

    def explain(self, input: Any, *, target: str | int | None = None, steps: int = 32, pair: str | None = None,
                internal_batch_size: int | None = None) -> GradientAttribution:
        """Integrated gradients of one text (pair: its second text, not attributed) or one image toward `target`
        (label name or index; default the predicted class), with `steps` points on the path."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise AttributionError(f"steps must be a whole number of at least 1, got {steps!r}")
        require_captum()
        start = time.perf_counter()
        if self.task == Task.IMAGE_CLASSIFICATION:
            return self._explain_image(input, target, steps, internal_batch_size, start)
        return self._explain_text(input, pair, target, steps, internal_batch_size, start)

    # --- text ----------------------------------------------------------------------------------------------------

    def _explain_text(self, text: Any, pair: str | None, target: str | int | None, steps: int,
                      batch: int | None, start: float) -> GradientAttribution:
        import torch
        from captum.attr import LayerIntegratedGradients

        if not isinstance(text, str) or not text.strip():
            raise AttributionError("the text is empty; pass a text with at least one word")
        spans = words_of(text)
        if not spans:
            raise AttributionError(f"the text {text[:40]!r} has no words to explain; pass a text with letters")
        encoded = self.tokenizer(text, pair, truncation=True, max_length=self.max_length, return_tensors="pt",
                                 return_offsets_mapping=True)
        offsets = encoded.pop("offset_mapping")[0].tolist()
        sequence = encoded.sequence_ids(0)
        inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        ids = inputs.pop("input_ids")
        replace = next((getattr(self.tokenizer, a) for a in MASK_ATTRIBUTES
                        if getattr(self.tokenizer, a, None) is not None), None)
        if replace is None:
            raise AttributionError("the tokenizer has no mask, unknown or pad token to build the baseline from")
        words_here = [i for i, s in enumerate(sequence) if s == 0 and offsets[i][1] > offsets[i][0]]
        baseline = ids.clone()
        baseline[0, words_here] = replace
        regression = self.task == Task.TEXT_REGRESSION

        def forward(input_ids: Any, *extra: Any) -> Any:
            logits = self.model(input_ids=input_ids, **dict(zip(inputs, extra, strict=True))).logits
            return logits[:, 0] if regression else torch.softmax(logits.float(), dim=-1)

        with torch.no_grad():
            first = self.model(input_ids=ids, **inputs).logits[0].float()
        index = self._target(target, first, regression)
        lig = LayerIntegratedGradients(forward, self.model.get_input_embeddings())
        extra = tuple(inputs.values())
        attributions, delta = lig.attribute(ids, baselines=baseline, additional_forward_args=extra,
                                            target=None if regression else index, n_steps=steps,
                                            internal_batch_size=batch, return_convergence_delta=True)
        per_token = attributions.sum(dim=-1)[0].detach().double().numpy()  # [sequence]
        cut = max((offsets[i][1] for i in words_here), default=0)
        spans = [s for s in spans if s[0] < cut]
        per_word = np.zeros(len(spans))
        for i in words_here:
            token_start = offsets[i][0]
            for w, (s, e) in enumerate(spans):
                if s <= token_start < e:
                    per_word[w] += per_token[i]
                    break
        score = float(first[0] if regression else torch.softmax(first, -1)[index])
        return GradientAttribution(method="integrated-gradients", target=None if regression else self._label(index),
                                   target_index=index, score=score, attributions=per_word, steps=steps,
                                   convergence_delta=float(delta.abs().max()), seconds=time.perf_counter() - start,
                                   text=text, words=[text[s:e] for s, e in spans], spans=spans)

    # --- images --------------------------------------------------------------------------------------------------

    def _explain_image(self, image: Any, target: str | int | None, steps: int, batch: int | None,
                       start: float) -> GradientAttribution:
        import torch
        from captum.attr import IntegratedGradients
        from PIL import Image

        if isinstance(image, list | tuple):
            raise AttributionError("explain takes one image, got a list; explain images one at a time")
        original = load_image(image)
        if original.size[0] < 1 or original.size[1] < 1:
            raise AttributionError(f"the image is {original.size[0]}x{original.size[1]} pixels; pass an image with at "
                                   "least one pixel")
        pixels = torch.from_numpy(preprocess(original, self.spec))[None]  # [1, C, h, w]

        def forward(values: Any) -> Any:
            return torch.softmax(self.model(pixel_values=values).logits.float(), dim=-1)

        with torch.no_grad():
            first = self.model(pixel_values=pixels).logits[0].float()
        index = self._target(target, first, regression=False)
        attributions, delta = IntegratedGradients(forward).attribute(
            pixels, baselines=torch.zeros_like(pixels), target=index, n_steps=steps, internal_batch_size=batch,
            return_convergence_delta=True)
        values = attributions[0].sum(dim=0).detach().double().numpy()  # [h, w]
        width, height = original.size
        heat = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
        return GradientAttribution(method="integrated-gradients", target=self._label(index), target_index=index,
                                   score=float(torch.softmax(first, -1)[index]), attributions=values, steps=steps,
                                   convergence_delta=float(delta.abs().max()), seconds=time.perf_counter() - start,
                                   heatmap=np.asarray(heat, np.float32))

    # --- shared --------------------------------------------------------------------------------------------------

    def _target(self, target: str | int | None, logits: Any, regression: bool) -> int:
        if regression:
            if target not in (None, 0):
                raise AttributionError("a regression model has one output; leave target unset")
            return 0
        if target is None:
            return int(logits.argmax())
        if isinstance(target, str):
            if target not in self.labels:
                raise AttributionError(f"unknown target label {target!r}; labels: {', '.join(self.labels)}")
            return self.labels.index(target)
        count = int(logits.shape[-1])
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < count:
            raise AttributionError(f"target must be a label name or a class index 0..{count - 1}, got {target!r}")
        return target

    def _label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)


def captum_available() -> bool:
    """Whether captum is installed (the demo offers integrated gradients for run directories only then)."""
    import importlib.util

    return importlib.util.find_spec("captum") is not None


def require_captum() -> None:
    """ExportError with the install command when captum is missing."""
    if not captum_available():
        raise ExportError("integrated gradients need captum; pip install 'tuneforge[explain]'")
