"""Classifiers over any forward function: text (tokenizer.json, dynamic padding) and images (the saved preprocessing).

The model itself is a callable `forward(feeds) -> logits` (an ONNX Runtime session in serve.runtime, a PyTorch module
in serve.pytorch), so both paths share input checks, tokenization, batching and post-processing. numpy, tokenizers
and Pillow only.
"""

from __future__ import annotations

import io
import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serve.batching import BatchingConfig, MicroBatcher
from serve.bundle.inputs import encodings_to_arrays
from serve.bundle.preprocessing import ImageError, PreprocessingSpec, preprocess_batch
from serve.bundle.tasks import Task
from serve.errors import InputError

logger = logging.getLogger(__name__)

Forward = Callable[[dict[str, np.ndarray]], np.ndarray]  # graph inputs -> logits [batch, labels]
CHUNK = 64  # inputs per model run when one call passes many (bounds the padded batch's memory)
# Encoded images (files, bytes) with more pixels are refused from their header, before decoding: a small file can
# decode to gigabytes (a decompression bomb). 40 MP is a 7,000 x 5,700 photo, far above any classifier's input.
MAX_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class Prediction:
    """One input's result: the top label and every label's probability (classification), or `value` (regression)."""

    label: str | None
    score: float | None  # probability of `label`
    probabilities: dict[str, float] = field(default_factory=dict)  # in label order
    value: float | None = None  # text-regression output
    truncated: bool = False  # the text was longer than the model's limit and was cut, as in training


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax [batch, labels], computed in float64 for stable probabilities."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def to_predictions(logits: np.ndarray, labels: Sequence[str] | None, *, regression: bool = False,
                   truncated: Sequence[bool] | None = None) -> list[Prediction]:
    """Logits [batch, labels] (regression: [batch, 1]) -> one Prediction per row."""
    cut = truncated if truncated is not None else [False] * len(logits)
    if regression:
        return [Prediction(label=None, score=None, value=float(row[0]), truncated=t)
                for row, t in zip(logits, cut, strict=True)]
    names = list(labels) if labels else [str(i) for i in range(logits.shape[-1])]
    probs = softmax(logits)
    return [Prediction(label=names[int(row.argmax())], score=float(row.max()),
                       probabilities={n: float(p) for n, p in zip(names, row, strict=True)}, truncated=t)
            for row, t in zip(probs, cut, strict=True)]


def check_texts(texts: Any, what: str = "texts") -> list[str]:
    """A list of str, or InputError naming what was passed instead."""
    if isinstance(texts, str):
        raise InputError(f"{what} must be a list of strings, got one str; wrap it: [{texts[:30]!r}]")
    if isinstance(texts, (bytes, dict)) or not isinstance(texts, Sequence | np.ndarray):
        raise InputError(f"{what} must be a list of strings, got {type(texts).__name__}")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise InputError(f"{what}[{i}] is {type(text).__name__}, not str; pass text (decode bytes first)")
        check_unicode(text, f"{what}[{i}]")
    blank = [i for i, text in enumerate(out) if not text.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else "")
        raise InputError(f"{what} has {len(blank)} empty or whitespace-only text(s), at index {shown}; training "
                         "refuses empty texts too: drop them or give them text")
    return out


def check_unicode(text: str, what: str) -> None:
    """InputError if `text` cannot be encoded as UTF-8: a lone surrogate ("\\ud800", e.g. from bytes decoded with
    errors="surrogateescape", or half of a JSON "\\ud83d\\ude00" pair) is not a character a tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{what} holds a lone surrogate {text[err.start]!r} at character {err.start}, which is not "
                         "valid Unicode; decode the source bytes with errors='replace' or remove that character"
                         ) from None


def check_threads(threads: Any) -> int | None:
    """`threads` as given to a predictor's loader: None (the library's default, one per physical core) or an int
    >= 1; anything else is an InputError (ONNX Runtime would read 0 or -1 as "default" and a float not at all)."""
    if threads is None:
        return None
    if isinstance(threads, numbers.Integral) and not isinstance(threads, bool) and threads >= 1:
        return int(threads)
    raise InputError(f"threads must be an integer >= 1 (threads per model run) or None (one per physical core); "
                     f"got {threads!r}")


def check_image(image: ImageLike, what: str, *, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """ImageError if an image has no pixels, or (files and bytes, read from the header before decoding) more than
    `max_pixels`. An unreadable file passes here: load_image says why it cannot be read."""
    if isinstance(image, np.ndarray):
        if image.size == 0 or 0 in image.shape[:2]:
            raise ImageError(f"{what} has no pixels (array shape {image.shape}); pass an image at least 1x1")
        return
    if isinstance(image, Image.Image):
        width, height = image.size
    else:
        try:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as header:  # header only
                width, height = header.size
        except Image.DecompressionBombError as err:  # Pillow's own cap (about 179 MP) refuses even the header
            raise ImageError(f"{what} is too large to decode ({str(err).split('(')[0].strip()}); this runtime takes up "
                             f"to {max_pixels:,} pixels: resize it first") from None
        except Exception:  # Pillow raises several types for undecodable files: load_image reports them
            return
        if width * height > max_pixels:
            raise ImageError(f"{what} is {width}x{height} pixels; this runtime takes up to {max_pixels:,} pixels "
                             "(a decompression bomb guard): resize it first")
    if width * height == 0:
        raise ImageError(f"{what} is {width}x{height} pixels: it has no pixels; pass an image at least 1x1")


class TextClassifier:
    """Text classification / regression: `predict(texts, pairs=None)` -> one Prediction per text.

    Tokenization is the bundle's tokenizer.json (training's truncation and padding built in): batches are padded to
    their longest text (dynamic padding); a text over the model's limit is truncated as in training, with a warning.
    Thread-safe: the tokenizer is only read and `forward` is a thread-safe session.
    """

    def __init__(self, tokenizer: Any, forward: Forward, *, input_names: Sequence[str], labels: Sequence[str] | None,
                 task: str = Task.TEXT_CLASSIFICATION, max_length: int | None = None, pair_column: str | None = None,
                 batching: BatchingConfig | None = None, name: str = "text classifier"):
        self.tokenizer, self.forward, self.name = tokenizer, forward, name
        self.input_names, self.labels, self.task = list(input_names), list(labels or []), task
        self.max_length, self.pair_column = max_length, pair_column
        self.batcher = MicroBatcher(self._run_items, batching, name=f"{name} batcher") if batching else None

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[Prediction]:
        """Labels and probabilities (or regression values) of `texts` (and their `pairs`, for pair models)."""
        rows = self._rows(texts, pairs)
        if not rows:
            return []
        results = self.batcher(rows) if self.batcher else self._run_items(rows)
        logits = np.stack([r[0] for r in results])
        return to_predictions(logits, self.labels, regression=self.task == Task.TEXT_REGRESSION,
                              truncated=[r[1] for r in results])

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Raw model outputs [batch, labels] (regression: [batch, 1]), float32."""
        rows = self._rows(texts, pairs)
        results = self.batcher(rows) if self.batcher else self._run_items(rows)
        return np.stack([r[0] for r in results]) if results else np.zeros((0, len(self.labels)), np.float32)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray],
                                                                                        list[bool]]:
        """Graph inputs (int64 [batch, longest]) for one batch, and which texts were truncated."""
        batch = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
        encodings = self.tokenizer.encode_batch(batch)
        truncated = [bool(e.overflowing) for e in encodings]
        if any(truncated):
            logger.warning("%d of %d texts are longer than the model's limit of %s tokens and were truncated, as in "
                           "training", sum(truncated), len(batch), self.max_length)
        return encodings_to_arrays(encodings, input_names=self.input_names), truncated

    def explain(self, text: str, **options: Any) -> Any:
        """Word attributions of one text's prediction: serve.explain.explain (method="occlusion" | "shap", target,
        samples, seed, pair, replacement)."""
        from serve.explain import explain

        return explain(self, text, **options)

    def close(self) -> None:
        """Stop the micro-batching worker, if any."""
        if self.batcher:
            self.batcher.close()

    def _rows(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list[tuple[str, str | None]]:
        texts = check_texts(texts)
        if pairs is not None:
            pairs = check_texts(pairs, "pairs")
            if len(pairs) != len(texts):
                raise InputError(f"got {len(texts)} texts but {len(pairs)} pairs; pass one pair per text")
        if self.pair_column and pairs is None:
            raise InputError(f"this model was trained on text pairs (second column {self.pair_column!r}); pass "
                             "pairs=[...] with one second text per text")
        if pairs is not None and not self.pair_column:
            raise InputError("this model was trained on single texts; call predict(texts) without pairs")
        return list(zip(texts, pairs if pairs is not None else [None] * len(texts), strict=True))

    def _run_items(self, rows: list[tuple[str, str | None]]) -> list[tuple[np.ndarray, bool]]:
        """(logits row, truncated) per (text, pair) row, CHUNK rows per model run."""
        out: list[tuple[np.ndarray, bool]] = []
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start:start + CHUNK]
            pairs = [p for _, p in chunk] if self.pair_column else None
            feeds, truncated = self.encode([t for t, _ in chunk], pairs)
            out.extend(zip(self.forward(feeds), truncated, strict=True))
        return out


ImageLike = str | Path | bytes | Image.Image | np.ndarray


class ImageClassifier:
    """Image classification: `predict(images)` from paths, encoded bytes, Pillow images or uint8 arrays, through the
    preprocessing saved with the model (the steps training applied). Thread-safe.

    An image without pixels is an ImageError, and so is a file (or bytes) of more than `max_pixels` pixels, read from
    its header before anything is decoded.
    """

    def __init__(self, spec: PreprocessingSpec, forward: Forward, *, labels: Sequence[str] | None,
                 input_name: str = "pixel_values", batching: BatchingConfig | None = None,
                 name: str = "image classifier", max_pixels: int = MAX_IMAGE_PIXELS):
        self.spec, self.forward, self.input_name, self.name = spec, forward, input_name, name
        self.max_pixels = max_pixels  # files and bytes with more pixels are refused before decoding
        self.labels = list(labels or [])
        self.batcher = MicroBatcher(self._run_pixels, batching, name=f"{name} batcher") if batching else None

    def predict(self, images: Sequence[ImageLike] | np.ndarray) -> list[Prediction]:
        """Label and probabilities per image. An array is a batch: uint8 [N, H, W] or [N, H, W, C]."""
        return to_predictions(self.logits(images), self.labels)

    def logits(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Raw model outputs [batch, labels], float32."""
        pixels = self.preprocess(images)
        if not len(pixels):
            return np.zeros((0, len(self.labels)), np.float32)
        rows = self.batcher(list(pixels)) if self.batcher else self._run_pixels(list(pixels))
        return np.stack(rows)

    def preprocess(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """The model's input for `images`: float32 [N, channels, height, width]."""
        if isinstance(images, (str, Path, bytes, Image.Image)):
            raise InputError(f"images must be a list of images, got one {type(images).__name__}; wrap it: [image]")
        if isinstance(images, np.ndarray):
            if images.ndim < 3:
                raise InputError(f"an image array passed to predict is a batch [N, H, W] or [N, H, W, C]; got shape "
                                 f"{images.shape}: wrap a single image in a list")
            if len(images) and 0 in images.shape[1:3]:
                raise ImageError(f"the images have no pixels (batch shape {images.shape}); pass images at least 1x1")
        elif not isinstance(images, Sequence):
            raise InputError(f"images must be a list of images, got {type(images).__name__}")
        else:
            for i, image in enumerate(images):
                if not isinstance(image, ImageLike):
                    raise InputError(f"images[{i}] is {type(image).__name__}; pass a path, bytes, a PIL image or a "
                                     "uint8 array")
                check_image(image, f"images[{i}]", max_pixels=self.max_pixels)
        if not len(images):
            return np.zeros((0, self.spec.num_channels, *self.spec.size), np.float32)
        return preprocess_batch(images, self.spec)

    def explain(self, image: ImageLike, **options: Any) -> Any:
        """Pixel attributions of one image's prediction: serve.explain.explain (method="occlusion" | "rise", target,
        samples, seed, baseline, patch, stride)."""
        from serve.explain import explain

        return explain(self, image, **options)

    def close(self) -> None:
        """Stop the micro-batching worker, if any."""
        if self.batcher:
            self.batcher.close()

    def _run_pixels(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, len(pixels), CHUNK):
            out.extend(self.forward({self.input_name: np.stack(pixels[start:start + CHUNK])}))
        return out
