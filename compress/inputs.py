"""Graph inputs from raw samples with only a bundle's own assets: tokenizers, numpy and Pillow, no PyTorch.

The parity gates feed the graphs through these functions, so the bundle's tokenizer.json and preprocessing spec are
exercised by every export; an app (serve.runtime) can build its inputs the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling values


def encode_texts(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                 input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """int64 [batch, sequence] arrays named as the graph's inputs, from a `tokenizers.Tokenizer` whose truncation and
    padding are set in its file (as in a bundle's tokenizer.json). `position_ids` follow the attention mask."""
    batch = list(zip(texts, pairs, strict=True)) if pairs is not None else list(texts)
    encodings = tokenizer.encode_batch(batch)
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


def preprocess_images(images: Sequence[Any], spec: dict[str, Any]) -> np.ndarray:
    """float32 [batch, channels, H, W] pixel_values from PIL images, following a bundle's preprocessing spec:
    convert to color_mode, resize to size [H, W], multiply by rescale, subtract mean, divide by std."""
    height, width = spec["size"]
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    resample = RESAMPLE[spec.get("resample", "bilinear")]
    arrays = []
    for image in images:
        image = image.convert(spec["color_mode"]).resize((width, height), resample=resample)
        pixels = np.asarray(image, dtype=np.float32) * np.float32(spec["rescale"])
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # HWC -> CHW
        arrays.append((pixels - mean) / std)
    return np.stack(arrays).astype(np.float32)
