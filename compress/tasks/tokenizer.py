"""The bundle's tokenizer.json: training's truncation and padding written into the file, checked against the
Hugging Face tokenizer, and its manifest section."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import ExportError
from compress.export import TEXT_INPUTS
from serve.bundle.inputs import encode_texts
from serve.bundle.manifest import TOKENIZER_FILE

logger = logging.getLogger(__name__)


def bundle_tokenizer(hf: Any, *, padding_side: str, max_length: int | None, pad_token_id: int | None = None) -> Any:
    """The fast tokenizer's `tokenizers` object with training's truncation and padding set, exactly as the bundle's
    tokenizer.json will hold it (read back from its serialized form)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    if max_length is None:
        tokenizer.no_truncation()
    else:
        tokenizer.enable_truncation(max_length, direction=hf.truncation_side)
    pad_id = hf.pad_token_id if pad_token_id is None else pad_token_id
    tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_type_id=hf.pad_token_type_id,
                             pad_token=hf.convert_ids_to_tokens(pad_id))
    return Tokenizer.from_str(tokenizer.to_str())


def write_tokenizer(tokenizer: Any, stage: Path) -> None:
    """Write the bundle's tokenizer.json."""
    tokenizer.save(str(stage / TOKENIZER_FILE))


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
