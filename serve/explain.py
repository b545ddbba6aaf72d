"""Explain one prediction from the bundle itself: word and pixel attributions, torch-free, and how faithful they are.

    from serve import runtime
    from serve.explain import deletion_insertion, explain

    model = runtime.load("bundles/reviews", "int8-dynamic")
    why = explain(model, "A dull, lifeless film with one good scene.", method="occlusion")   # or "shap"
    print(why.target, why.top(3), why.model_calls, f"{why.seconds * 1000:.0f} ms")
    print(deletion_insertion(model, "A dull, lifeless film with one good scene.", why))

Every method only runs the predictor's own model on perturbed inputs (`TextClassifier.logits` on masked texts,
`ImageClassifier.forward` on masked pixels), batched, so it explains exactly the graph an app serves (an ONNX variant,
or a run directory's PyTorch model through serve.pytorch) with the bundle's own tokenizer and preprocessing.

Text (features are words: runs of letters/digits found by a regex with their character offsets, so word pieces of one
word go together and attributions map back onto the text; punctuation is never masked):
    occlusion   leave one word out: attribution = p(target | text) - p(target | text without the word); n + 1 inputs.
    shap        kernel SHAP: coalitions of words (whole sizes enumerated from the outside in while the budget allows, as
                SHAP's KernelExplainer does, the rest sampled from the Shapley kernel, each with its complement) scored
                and solved by weighted least squares with the efficiency constraint (the attributions sum to
                p(full) - p(all words masked)); exact Shapley values when 2**n - 2 <= samples.
    A masked word is replaced by the tokenizer's mask token ([MASK] / <mask>; else its unknown token) rather than
    removed: the sentence keeps its length and positions, so a score change measures the word's content and not a shift
    of every later token (the default of SHAP's text masker for transformers). Tokenizers with neither token (byte-level
    BPE) remove the word. replacement="remove" removes words always.

Images (over the preprocessed image, i.e. what the model sees; the heatmap is resized back to the input's size):
    occlusion   a patch slid over the image (default: 1/7 of the shorter side, stride half a patch) is set to the
                baseline; a pixel's attribution is the mean drop of p(target) over the patches covering it.
    rise        RISE (Petsiuk et al. 2018): random smooth masks (a coarse 7x7 grid of keep/drop cells, upsampled
                bilinearly with a random shift) blend the image with the baseline; a pixel's attribution is the mean
                p(target) of the masks that keep it minus the mean over all masks.
    The baseline is the training mean colour ("mean": 0 after normalisation) or black pixels ("black").

Each explanation reports its method, target label, the number of inputs scored (`model_calls`), the graph runs
(`batches`) and the seconds it took; a seed makes the sampling methods reproducible. `deletion_insertion` measures
faithfulness: the area under p(target) as the top-attributed features are removed (deletion: lower is better) or
inserted into a blank input (insertion: higher is better), next to the same curves in random order.

A dynamic-int8 variant quantizes activations with one scale per batch, so a row's output moves a little with the other
rows of its batch (up to 0.05 in MiniLM's logits, measured): its explanations carry that noise; fp32, optimized and
static-int8 variants score each row alike in any batch.

Imports numpy, Pillow and the runtime's own modules only (no torch; a test checks).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from serve.bundle.inputs import words_of
from serve.bundle.preprocessing import ImageError, ImageInput, load_image
from serve.bundle.tasks import Task
from serve.errors import InputError
from serve.predictors import CHUNK, ImageClassifier, TextClassifier, softmax

__all__ = ["Faithfulness", "ImageExplanation", "TextExplanation", "deletion_insertion", "explain", "highlight",
           "overlay", "words_of"]

TEXT_METHODS = ("occlusion", "shap")
IMAGE_METHODS = ("occlusion", "rise")
DEFAULT_SAMPLES = {"shap": 64, "rise": 512}  # coalitions / masks scored; occlusion's count follows from the input
REPLACEMENTS = ("mask", "remove")
BASELINES = ("mean", "black")
MASK_TOKENS = ("[MASK]", "<mask>", "[UNK]", "<unk>")  # tried in order: a mask token, then an unknown token
RISE_GRID = 7  # cells per side of a RISE mask before upsampling (the paper's s for 224 px; fine for 28 px too)
RISE_KEEP = 0.5  # probability that a RISE cell keeps the image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextExplanation:
    """Word attributions toward `target` for one text: `attributions[i]` belongs to `words[i]` at `spans[i]`."""

    text: str
    method: str
    target: str | None  # label name (None for regression: the attributions explain the output value)
    target_index: int
    score: float  # p(target | text), or the regression value
    words: list[str]
    spans: list[tuple[int, int]]  # character offsets of each word in `text`
    attributions: np.ndarray  # float64 [words]: positive = the word pushes toward the target
    replacement: str  # what replaced a masked word: "[MASK]"-like token, or "remove"
    model_calls: int  # inputs scored (rows of the batched model runs)
    batches: int  # model runs
    seconds: float
    seed: int | None = None
    samples: int | None = None
    truncated: bool = False  # the text was longer than the model's limit: words past the cut are not explained
    pair: str | None = None

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The k words with the largest attributions toward the target, largest first."""
        order = np.argsort(-self.attributions, kind="stable")[:k]
        return [(self.words[i], float(self.attributions[i])) for i in order]

    def highlighted(self) -> list[tuple[str, float | None]]:
        """The whole text as (piece, score) chunks for gr.HighlightedText (see `highlight`)."""
        return highlight(self.text, self.spans, self.attributions)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: method, target, words with attributions, and the cost."""
        return {"method": self.method, "target": self.target, "score": self.score, "replacement": self.replacement,
                "words": [{"word": w, "start": s, "end": e, "attribution": float(a)}
                          for w, (s, e), a in zip(self.words, self.spans, self.attributions, strict=True)],
                "model_calls": self.model_calls, "batches": self.batches, "seconds": self.seconds, "seed": self.seed,
                "samples": self.samples, "truncated": self.truncated}


@dataclass(frozen=True)
class ImageExplanation:
    """Pixel attributions toward `target` for one image: `attributions` at the model's input size, `heatmap` at the
    size of the image passed in (what to overlay on it)."""

    method: str
    target: str | None
    target_index: int
    score: float  # p(target | image)
    attributions: np.ndarray  # float64 [model height, model width]
    heatmap: np.ndarray  # float32 [input height, input width]
    baseline: str  # "mean" or "black": what replaced the occluded / masked pixels
    model_calls: int
    batches: int
    seconds: float
    seed: int | None = None
    samples: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # patch and stride (occlusion), grid and keep (rise)

    def overlay(self, image: ImageInput, *, alpha: float = 0.5) -> Image.Image:
        """The image (RGB) with the heatmap blended over it (see `overlay`)."""
        return overlay(image, self.heatmap, alpha=alpha)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target": self.target, "score": self.score, "baseline": self.baseline,
                "attributions": self.attributions.tolist(), "model_calls": self.model_calls, "batches": self.batches,
                "seconds": self.seconds, "seed": self.seed, "samples": self.samples, "settings": self.settings}


Explanation = TextExplanation | ImageExplanation


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion curves of p(target) over the fraction of features removed / inserted in attribution
    order, and the same in random order (mean over `seeds` permutations). AUCs are the trapezoid area over [0, 1]."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    random_deletion: np.ndarray
    random_insertion: np.ndarray
    model_calls: int
    seconds: float
    seeds: int

    @property
    def deletion_auc(self) -> float:
        return _auc(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> float:
        return _auc(self.fractions, self.insertion)

    @property
    def random_deletion_auc(self) -> float:
        return _auc(self.fractions, self.random_deletion)

    @property
    def random_insertion_auc(self) -> float:
        return _auc(self.fractions, self.random_insertion)

    @property
    def beats_random(self) -> bool:
        """Deletion falls faster and insertion rises faster than in random order."""
        return self.deletion_auc < self.random_deletion_auc and self.insertion_auc > self.random_insertion_auc

    def to_dict(self) -> dict[str, Any]:
        return {"deletion_auc": self.deletion_auc, "insertion_auc": self.insertion_auc,
                "random_deletion_auc": self.random_deletion_auc, "random_insertion_auc": self.random_insertion_auc,
                "steps": len(self.fractions) - 1, "seeds": self.seeds, "model_calls": self.model_calls,
                "seconds": self.seconds}

    def __str__(self) -> str:
        return (f"deletion AUC {self.deletion_auc:.3f} (random {self.random_deletion_auc:.3f}), insertion AUC "
                f"{self.insertion_auc:.3f} (random {self.random_insertion_auc:.3f})")


def highlight(text: str, spans: Sequence[tuple[int, int]],
              attributions: np.ndarray | Sequence[float]) -> list[tuple[str, float | None]]:
    """`text` as (piece, score) chunks: each word with its attribution scaled to [-1, 1] by the largest magnitude,
    the text between words with None (gr.HighlightedText's format; positive toward the target)."""
    values = np.asarray(attributions, dtype=np.float64)
    scale = float(np.abs(values).max()) if len(values) else 0.0
    out: list[tuple[str, float | None]] = []
    last = 0
    for (start, end), value in zip(spans, values, strict=True):
        if start > last:
            out.append((text[last:start], None))
        out.append((text[start:end], round(float(value) / scale, 4) if scale > 0 else 0.0))
        last = end
    if last < len(text):
        out.append((text[last:], None))
    return out


def overlay(image: ImageInput, heatmap: np.ndarray, *, alpha: float = 0.5) -> Image.Image:
    """The image (RGB) with a heatmap of its size blended over it: red where pixels push toward the target, blue
    against, opacity growing with the magnitude (scaled by the largest)."""
    base = load_image(image).convert("RGB")
    if heatmap.shape != (base.size[1], base.size[0]):
        heatmap = _resize(heatmap, base.size[1], base.size[0])
    heat = heatmap / max(float(np.abs(heatmap).max()), 1e-12)  # [-1, 1]
    colour = np.zeros((*heat.shape, 3), np.float32)
    colour[..., 0] = np.clip(heat, 0, 1) * 255
    colour[..., 2] = np.clip(-heat, 0, 1) * 255
    weight = (alpha * np.abs(heat))[..., None]
    mixed = np.asarray(base, np.float32) * (1 - weight) + colour * weight
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


# --- the public functions --------------------------------------------------------------------------------------------

def explain(predictor: TextClassifier | ImageClassifier, input: str | ImageInput, *, method: str = "occlusion",
            target: str | int | None = None, samples: int | None = None, seed: int = 0, pair: str | None = None,
            replacement: str = "mask", baseline: str = "mean", patch: int | None = None,
            stride: int | None = None) -> Explanation:
    """Attributions of one input's prediction toward `target` (default: the predicted label).

    predictor: a TextClassifier or ImageClassifier (serve.runtime.load, or serve.pytorch.load_run).
    input: a text (str; `pair` is its second text for pair models, kept whole) or one image (path, bytes, PIL image,
        uint8 array).
    method: text "occlusion" | "shap"; images "occlusion" | "rise".
    samples: coalitions (shap, default 64) or masks (rise, default 512); more is slower and less noisy.
    seed: seeds the sampling methods (the same seed gives the same attributions).
    replacement: text only, "mask" (the tokenizer's mask token, see the module doc) or "remove".
    baseline: images only, "mean" (the training mean colour) or "black"; patch / stride: occlusion's patch side and
        step in model pixels.
    """
    start = time.perf_counter()
    if isinstance(predictor, TextClassifier):
        method = _checked_method(method, TEXT_METHODS, "text")
        samples = _checked_samples(samples, method)
        if replacement not in REPLACEMENTS:
            raise InputError(f"replacement must be one of {', '.join(REPLACEMENTS)}, got {replacement!r}")
        return _explain_text(predictor, input, pair, method=method, target=target, samples=samples, seed=seed,
                             replacement=replacement, start=start)
    if isinstance(predictor, ImageClassifier):
        method = _checked_method(method, IMAGE_METHODS, "image")
        samples = _checked_samples(samples, method)
        if baseline not in BASELINES:
            raise InputError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        return _explain_image(predictor, input, method=method, target=target, samples=samples, seed=seed,
                              baseline=baseline, patch=patch, stride=stride, start=start)
    raise InputError(f"explanations are for text and image classifiers; got {type(predictor).__name__}")


def deletion_insertion(predictor: TextClassifier | ImageClassifier, input: str | ImageInput,
                       attribution: Explanation | np.ndarray | Sequence[float], *, target: str | int | None = None,
                       steps: int | None = None, seeds: int = 3, pair: str | None = None,
                       replacement: str | None = None, baseline: str | None = None) -> Faithfulness:
    """Deletion and insertion curves of p(target) for features taken in attribution order vs random order.

    attribution: an explanation of this input (an Explanation, or compress.attribution's GradientAttribution: its
        target, replacement / baseline are reused), or raw scores: one per word (text, words as `words_of` finds
        them) or a [height, width] map (images: at the model's input size or the image's own; resized to the model's).
    steps: points on each curve after the start (text: default one per word; images: default 20).
    seeds: random orders averaged for the reference curves.
    """
    start = time.perf_counter()
    if seeds < 1:
        raise InputError(f"seeds must be at least 1, got {seeds}")
    if steps is not None and steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    if hasattr(attribution, "attributions"):  # an Explanation, or compress.attribution's GradientAttribution
        target = attribution.target_index if target is None else target
        scores = attribution.attributions
        replacement = replacement or getattr(attribution, "replacement", None)
        baseline = baseline or getattr(attribution, "baseline", None)
        pair = pair if pair is not None else getattr(attribution, "pair", None)
    else:
        scores = np.asarray(attribution, dtype=np.float64)
    rng = np.random.default_rng(0)
    if isinstance(predictor, TextClassifier):
        text = _checked_text(input)
        words = _explained_words(predictor, text, pair)
        if scores.shape != (len(words),):
            raise InputError(f"got {scores.size} attributions for a text of {len(words)} words; pass one per word")
        fill = _fill(predictor, "remove" if replacement == "remove" else "mask")
        score = _text_scorer(predictor, text, pair, words, fill, target)
        n = len(words)
    elif isinstance(predictor, ImageClassifier):
        pixels = _pixels(predictor, input)
        scores = _at_model_size(np.asarray(scores, np.float64), pixels.shape[1:])
        score = _pixel_scorer(predictor, pixels, _baseline_pixels(predictor, baseline or "mean"), target)
        n = scores.size
        scores = scores.ravel()
    else:
        raise InputError(f"faithfulness is measured for text and image classifiers; got {type(predictor).__name__}")
    count = min(steps or (n if isinstance(predictor, TextClassifier) else 20), n)
    ks = np.unique(np.rint(np.linspace(0, n, count + 1)).astype(int))
    orders = [np.argsort(-scores, kind="stable")] + [rng.permutation(n) for _ in range(seeds)]
    keeps = []
    for order in orders:
        rank = np.empty(n, int)
        rank[order] = np.arange(n)
        removed = rank[None, :] < ks[:, None]  # [steps + 1, n]: the first k of this order
        keeps += [~removed, removed]  # deletion keeps all but the first k; insertion keeps only them
    probs = score.run(np.concatenate(keeps)).reshape(len(keeps), len(ks))
    return Faithfulness(fractions=ks / n, deletion=probs[0], insertion=probs[1],
                        random_deletion=probs[2::2].mean(axis=0), random_insertion=probs[3::2].mean(axis=0),
                        model_calls=score.calls, seconds=time.perf_counter() - start, seeds=seeds)


# --- text -------------------------------------------------------------------------------------------------------------

class _Scorer:
    """p(target) of perturbed inputs, counting the rows scored and the model runs (the unperturbed input's run, which
    chose the target and gave `full`, included)."""

    def __init__(self, run: Any, target_index: int, full: float):
        self._run, self.target_index, self.full, self.calls, self.batches = run, target_index, full, 1, 1

    def run(self, keep: np.ndarray) -> np.ndarray:
        """keep: bool [rows, features] (True = the feature is present) -> float64 [rows]."""
        if not len(keep):
            return np.zeros(0)
        self.calls += len(keep)
        self.batches += math.ceil(len(keep) / CHUNK)
        return self._run(keep)


def _explain_text(predictor: TextClassifier, text: Any, pair: str | None, *, method: str, target: str | int | None,
                  samples: int | None, seed: int, replacement: str, start: float) -> TextExplanation:
    text = _checked_text(text)
    spans, truncated = _explained_words(predictor, text, pair, with_truncation=True)
    fill = _fill(predictor, replacement)
    score = _text_scorer(predictor, text, pair, spans, fill, target)
    n = len(spans)
    if method == "occlusion":
        attributions = score.full - score.run(~np.eye(n, dtype=bool))
        own = score.full
    else:
        attributions, own = _kernel_shap(score, n, samples or DEFAULT_SAMPLES["shap"], np.random.default_rng(seed))
    return TextExplanation(text=text, method=method, target=_label(predictor, score.target_index),
                           target_index=score.target_index, score=own, words=[text[s:e] for s, e in spans],
                           spans=spans, attributions=attributions, replacement=fill or "remove",
                           model_calls=score.calls, batches=score.batches, seconds=time.perf_counter() - start,
                           seed=seed if method == "shap" else None, samples=samples if method == "shap" else None,
                           truncated=truncated, pair=pair)


def _explained_words(predictor: TextClassifier, text: str, pair: str | None, *,
                     with_truncation: bool = False) -> Any:
    """The word spans the model sees (words past a truncation cut are dropped), and whether the text was cut."""
    spans = words_of(text)
    if not spans:
        raise InputError(f"the text {text[:40]!r} has no words to explain; pass a text with letters or digits")
    encoding = predictor.tokenizer.encode(text, pair) if pair is not None else predictor.tokenizer.encode(text)
    truncated = bool(encoding.overflowing)
    if truncated and with_truncation:
        logger.warning("the text is longer than the model's limit of %s tokens: the words past the cut are not "
                       "explained", predictor.max_length)
    if truncated:
        ends = [end for (_, end), sid in zip(encoding.offsets, encoding.sequence_ids, strict=True) if sid == 0]
        cut = max(ends, default=0)
        spans = [s for s in spans if s[0] < cut]
    return (spans, truncated) if with_truncation else spans


def _fill(predictor: TextClassifier, replacement: str) -> str | None:
    """The text that replaces a masked word: a mask (or unknown) token the tokenizer reads as one token, or None
    (remove the word)."""
    if replacement == "remove":
        return None
    tokenizer = predictor.tokenizer
    for token in MASK_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and tokenizer.encode(token, add_special_tokens=False).ids == [token_id]:
            return token
    return None


def _text_scorer(predictor: TextClassifier, text: str, pair: str | None, spans: list[tuple[int, int]],
                 fill: str | None, target: str | int | None) -> _Scorer:
    """A scorer of word masks over `text`, its target resolved from the unmasked text's prediction."""

    def texts(keep: np.ndarray) -> list[str]:
        out = []
        for row in keep:
            pieces, last = [], 0
            for (s, e), kept in zip(spans, row, strict=True):
                pieces.append(text[last:s])
                pieces.append(text[s:e] if kept else (fill or ""))
                last = e
            pieces.append(text[last:])
            out.append("".join(pieces))
        return out

    def logits_of(batch: list[str]) -> np.ndarray:
        with _quiet_truncation():  # one warning per explanation (_explained_words), not one per masked batch
            return predictor.logits(batch, None if pair is None else [pair] * len(batch))

    regression = predictor.task == Task.TEXT_REGRESSION
    full = logits_of([text])
    index = _target_index(predictor, target, lambda: full[0], regression=regression)

    def values(logits: np.ndarray) -> np.ndarray:
        return logits[:, 0].astype(np.float64) if regression else softmax(logits)[:, index]

    return _Scorer(lambda keep: values(logits_of(texts(keep))), index, float(values(full)[0]))


class _ThreadFilter(logging.Filter):
    """Drops the predictors' truncation warnings raised on threads that are scoring masked texts."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.get_ident() not in self.threads


_FILTER = _ThreadFilter()
_FILTER_LOCK = threading.Lock()


@contextmanager
def _quiet_truncation() -> Iterator[None]:
    """Within this block, serve.predictors' warnings from this thread are dropped (other threads keep theirs)."""
    with _FILTER_LOCK:
        predictors_logger = logging.getLogger("serve.predictors")
        if _FILTER not in predictors_logger.filters:
            predictors_logger.addFilter(_FILTER)
        _FILTER.threads.add(threading.get_ident())
    try:
        yield
    finally:
        with _FILTER_LOCK:
            _FILTER.threads.discard(threading.get_ident())


def _coalitions(n: int, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """About `samples` coalitions of n features (bool [rows, n]) and their regression weights, as SHAP's
    KernelExplainer chooses them: the Shapley kernel puts most of its weight on the smallest and largest coalitions,
    so whole sizes are enumerated from the outside in (1 and n-1, then 2 and n-2, ...) while the budget allows, each
    coalition weighted by its share of its size's kernel weight; the rest of the budget samples the remaining sizes in
    proportion to their kernel weight (each coalition with its complement), sharing the remaining weight. With
    2**n - 2 <= samples every coalition is enumerated: the exact Shapley values."""
    sizes = np.arange(1, n)
    size_weight = (n - 1) / (sizes * (n - sizes))
    size_weight = size_weight / size_weight.sum()  # of a size: [n - 1], summing to 1
    rows: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    left, done = samples, set()
    for small in range(1, n // 2 + 1):
        group = [small] if small == n - small else [small, n - small]
        count = math.comb(n, small) * len(group)
        if count > left:
            break
        for size in group:
            members = np.array(list(itertools.combinations(range(n), size)))
            mask = np.zeros((len(members), n), bool)
            mask[np.arange(len(members))[:, None], members] = True
            rows.append(mask)
            weights.append(np.full(len(members), size_weight[size - 1] / len(members)))
            done.add(size)
        left -= count
    rest = np.array([s for s in sizes if s not in done])
    if len(rest) and left >= 2:
        share = size_weight[rest - 1]
        half = left // 2
        drawn = rng.choice(rest, size=half, p=share / share.sum())
        ranks = rng.random((half, n)).argsort(axis=1).argsort(axis=1)
        sampled = ranks < drawn[:, None]
        sampled, counts = np.unique(np.concatenate([sampled, ~sampled]), axis=0, return_counts=True)
        rows.append(sampled)
        weights.append(counts / counts.sum() * share.sum())
    if not rows:  # a budget below one pair: one random coalition and its complement
        keep = np.zeros(n, bool)
        keep[rng.permutation(n)[:n // 2]] = True  # n >= 2: neither empty nor full
        rows.append(np.stack([keep, ~keep]))
        weights.append(np.ones(2))
    return np.concatenate(rows), np.concatenate(weights)


def _kernel_shap(score: _Scorer, n: int, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Kernel SHAP values of n features and p(full), from about `samples` coalitions (`_coalitions`) plus the full
    and the empty input."""
    if n == 1:
        return np.array([score.full - score.run(np.array([[False]]))[0]]), score.full
    coalitions, weights = _coalitions(n, samples, rng)
    values = score.run(np.concatenate([np.zeros((1, n), bool), coalitions]))
    full, empty, f = score.full, values[0], values[1:] - values[0]
    z = coalitions.astype(np.float64)
    # Efficiency: sum(phi) = full - empty. Eliminate the last feature, phi_n = delta - sum(phi_<n), and solve the
    # weighted least squares  f - z_n * delta = sum_j<n (z_j - z_n) phi_j  for the rest.
    delta = full - empty
    design = z[:, :-1] - z[:, -1:]
    target = f - z[:, -1] * delta
    root = np.sqrt(weights)[:, None]
    phi, *_ = np.linalg.lstsq(design * root, target * root[:, 0], rcond=None)
    return np.append(phi, delta - phi.sum()), full


# --- images -----------------------------------------------------------------------------------------------------------

def _explain_image(predictor: ImageClassifier, image: Any, *, method: str, target: str | int | None,
                   samples: int | None, seed: int, baseline: str, patch: int | None, stride: int | None,
                   start: float) -> ImageExplanation:
    original = _checked_image(image)
    pixels = predictor.preprocess([original])[0]  # [C, h, w]
    height, width = pixels.shape[1:]
    score = _pixel_scorer(predictor, pixels, _baseline_pixels(predictor, baseline), target)
    settings: dict[str, Any]
    if method == "occlusion":
        side = patch or max(1, min(height, width) // 7)
        step = stride or max(1, side // 2)
        if side < 1 or step < 1 or side > min(height, width):
            raise InputError(f"patch must be 1..{min(height, width)} and stride at least 1 (model pixels); got "
                             f"patch={patch}, stride={stride}")
        tops, lefts = _positions(height, side, step), _positions(width, side, step)
        keeps = np.ones((len(tops) * len(lefts), height, width), bool)
        for i, (top, left) in enumerate((t, left) for t in tops for left in lefts):
            keeps[i, top:top + side, left:left + side] = False
        values = score.run(keeps.reshape(len(keeps), -1))
        dropped = ~keeps
        drop = (score.full - values)[:, None, None] * dropped
        attributions = drop.sum(axis=0) / np.maximum(dropped.sum(axis=0), 1)
        own, settings = score.full, {"patch": side, "stride": step}
    else:
        masks = _rise_masks(samples or DEFAULT_SAMPLES["rise"], height, width, np.random.default_rng(seed))
        values = score.run_soft(masks)
        kept = masks.sum(axis=0)
        attributions = (values[:, None, None] * masks).sum(axis=0) / np.maximum(kept, 1e-12) - values.mean()
        own = score.full
        settings = {"grid": RISE_GRID, "keep": RISE_KEEP}
    heatmap = _resize(attributions, original.size[1], original.size[0])
    return ImageExplanation(method=method, target=_label(predictor, score.target_index),
                            target_index=score.target_index, score=own, attributions=attributions.astype(np.float64),
                            heatmap=heatmap, baseline=baseline, model_calls=score.calls, batches=score.batches,
                            seconds=time.perf_counter() - start, seed=seed if method == "rise" else None,
                            samples=samples if method == "rise" else None, settings=settings)


class _PixelScorer(_Scorer):
    """A scorer of pixel keep-masks (bool) or soft masks (float in [0, 1]) over one preprocessed image."""

    def __init__(self, predictor: ImageClassifier, pixels: np.ndarray, fill: np.ndarray, target_index: int,
                 full: float):
        self.predictor, self.pixels, self.fill = predictor, pixels, fill
        super().__init__(lambda keep: self.run_soft(keep.reshape(len(keep), *pixels.shape[1:]), count=False),
                         target_index, full)

    def run_soft(self, masks: np.ndarray, *, count: bool = True) -> np.ndarray:
        """masks: [rows, h, w] in [0, 1] (1 = the image, 0 = the baseline) -> float64 [rows] p(target)."""
        if count:
            self.calls += len(masks)
            self.batches += math.ceil(len(masks) / CHUNK)
        out = []
        for begin in range(0, len(masks), CHUNK):
            m = masks[begin:begin + CHUNK, None].astype(np.float32)  # [rows, 1, h, w]
            batch = (self.pixels[None] * m + self.fill[None] * (1 - m)).astype(np.float32)
            logits = self.predictor.forward({self.predictor.input_name: batch})
            out.append(softmax(np.asarray(logits))[:, self.target_index])
        return np.concatenate(out)


def _pixel_scorer(predictor: ImageClassifier, pixels: np.ndarray, fill: np.ndarray,
                  target: str | int | None) -> _PixelScorer:
    full = np.asarray(predictor.forward({predictor.input_name: pixels[None]}))
    index = _target_index(predictor, target, lambda: full[0], regression=False)
    return _PixelScorer(predictor, pixels, fill, index, float(softmax(full)[0, index]))


def _baseline_pixels(predictor: ImageClassifier, baseline: str) -> np.ndarray:
    """[C, 1, 1] normalised value of the baseline: 0 is the training mean colour; black is (0 - mean) / std."""
    spec = predictor.spec
    if baseline == "black":
        return (-np.asarray(spec.mean, np.float32) / np.asarray(spec.std, np.float32)).reshape(-1, 1, 1)
    if baseline != "mean":
        raise InputError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    return np.zeros((spec.num_channels, 1, 1), np.float32)


def _positions(length: int, side: int, step: int) -> list[int]:
    """Patch starts from 0 by `step`, the last one flush with the far edge so every pixel is covered."""
    starts = list(range(0, length - side + 1, step))
    if starts[-1] != length - side:
        starts.append(length - side)
    return starts


def _rise_masks(count: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """RISE masks float32 [count, height, width]: a RISE_GRID^2 keep/drop grid upsampled bilinearly to one cell more
    than the image and cropped at a random offset (so cell edges fall anywhere)."""
    cell_h, cell_w = math.ceil(height / RISE_GRID), math.ceil(width / RISE_GRID)
    grids = (rng.random((count, RISE_GRID, RISE_GRID)) < RISE_KEEP).astype(np.float32)
    big_h, big_w = (RISE_GRID + 1) * cell_h, (RISE_GRID + 1) * cell_w
    rows, cols = _interpolation(big_h, RISE_GRID), _interpolation(big_w, RISE_GRID)
    up = np.einsum("hi,nij,wj->nhw", rows, grids, cols)  # [count, big_h, big_w]
    dy, dx = rng.integers(0, cell_h, count), rng.integers(0, cell_w, count)
    out = np.empty((count, height, width), np.float32)
    for i in range(count):
        out[i] = up[i, dy[i]:dy[i] + height, dx[i]:dx[i] + width]
    return out


def _interpolation(out: int, src: int) -> np.ndarray:
    """[out, src] linear-interpolation weights (corners aligned) from src grid points to out samples."""
    position = np.linspace(0, src - 1, out)
    low = np.clip(np.floor(position).astype(int), 0, src - 1)
    high = np.clip(low + 1, 0, src - 1)
    frac = position - low
    matrix = np.zeros((out, src), np.float32)
    matrix[np.arange(out), low] += 1 - frac
    matrix[np.arange(out), high] += frac
    return matrix


def _resize(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float map resized (bilinear) to height x width."""
    if values.shape == (height, width):
        return values.astype(np.float32)
    image = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), np.float32)


def _at_model_size(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if scores.ndim != 2:
        raise InputError(f"image attributions must be a [height, width] map, got shape {scores.shape}")
    return scores if scores.shape == tuple(size) else _resize(scores, *size).astype(np.float64)


def _pixels(predictor: ImageClassifier, image: Any) -> np.ndarray:
    return predictor.preprocess([_checked_image(image)])[0]


# --- checks and targets -----------------------------------------------------------------------------------------------

def _checked_method(method: Any, methods: tuple[str, ...], kind: str) -> str:
    if method not in methods:
        raise InputError(f"unknown method {method!r} for {kind} classifiers; choose one of {', '.join(methods)}")
    return method


def _checked_samples(samples: Any, method: str) -> int | None:
    if samples is None:
        return DEFAULT_SAMPLES.get(method)
    if isinstance(samples, bool) or not isinstance(samples, int | np.integer) or samples < 1:
        raise InputError(f"samples must be a whole number of at least 1, got {samples!r}")
    return int(samples)


def _checked_text(text: Any) -> str:
    if not isinstance(text, str):
        raise InputError(f"explain takes one text (str), got {type(text).__name__}; explain texts one at a time")
    if not text.strip():
        raise InputError("the text is empty; pass a text with at least one word")
    return text


def _checked_image(image: Any) -> Image.Image:
    if isinstance(image, list | tuple):
        raise InputError("explain takes one image, got a list; explain images one at a time")
    pil = load_image(image)
    if pil.size[0] < 1 or pil.size[1] < 1:
        raise ImageError(f"the image is {pil.size[0]}x{pil.size[1]} pixels; pass an image with at least one pixel")
    return pil


def _target_index(predictor: TextClassifier | ImageClassifier, target: str | int | None, logits: Any, *,
                  regression: bool) -> int:
    """The class explained: `target` as a label name or index, or (None) the predicted class."""
    if regression:
        if target not in (None, 0):
            raise InputError("a regression model has one output; leave target unset")
        return 0
    labels = predictor.labels
    if target is None:
        return int(np.argmax(logits()))
    if isinstance(target, str):
        if target not in labels:
            raise InputError(f"unknown target label {target!r}; labels: {', '.join(labels)}")
        return labels.index(target)
    count = len(labels) or int(np.asarray(logits()).shape[-1])
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or not 0 <= target < count:
        raise InputError(f"target must be a label name or a class index 0..{count - 1}, got {target!r}")
    return int(target)


def _label(predictor: TextClassifier | ImageClassifier, index: int) -> str | None:
    if getattr(predictor, "task", None) == Task.TEXT_REGRESSION:
        return None
    return predictor.labels[index] if index < len(predictor.labels) else str(index)


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)
