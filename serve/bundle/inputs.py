"""Graph inputs from raw samples with only a bundle's own assets: tokenizers, numpy and Pillow, no PyTorch.

The parity gates feed the graphs through these functions, so the bundle's tokenizer.json is exercised by every export;
an app (serve.runtime) can build its inputs the same way. Images go through `serve.bundle.preprocessing`, the
torch-free steps that training itself uses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

WORD = re.compile(r"\w+(?:['’\-]\w+)*")  # letters/digits, keeping contractions and hyphenated words whole


def encode_texts(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                 input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """int64 [batch, sequence] arrays named as the graph's inputs, from a `tokenizers.Tokenizer` whose truncation and
    padding are set in its file (as in a bundle's tokenizer.json). `position_ids` follow the attention mask."""
    batch = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
    return encodings_to_arrays(tokenizer.encode_batch(batch), input_names=input_names)


def encodings_to_arrays(encodings: Sequence[Any], *, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """int64 [batch, sequence] graph inputs from `tokenizers.Encoding`s already padded to one length (a batch encoded
    with padding on); for callers that also inspect the encodings (e.g. `overflowing`, set when text was truncated)."""
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    arrays = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64), "attention_mask": mask,
              "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
              "position_ids": position_ids(mask)}
    return {name: arrays[name] for name in input_names if name in arrays}


def position_ids(attention_mask: np.ndarray, *, past_length: int = 0) -> np.ndarray:
    """Positions that skip left padding, as transformers' generate computes them: cumsum(mask) - 1, pads set to 1.

    attention_mask: [batch, past_length + sequence]; returns int64 [batch, sequence] for the last `sequence` tokens.
    """
    positions = np.cumsum(attention_mask, axis=1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, past_length:].astype(np.int64)


def words_of(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of `text`: the units explanations attribute to (serve.explain from the bundle,
    compress.attribution from a run), runs of letters and digits with contractions and hyphenations kept whole."""
    return [m.span() for m in WORD.finditer(text)]
