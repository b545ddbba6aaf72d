"""Typed views of manifest.json's task-level sections, as readers use them. Standard library only.

`Manifest` (serve.bundle.manifest) builds them from the validated JSON (`validate_manifest` has already refused a
malformed section), so a reader asks `manifest.text.max_length` instead of `data.get("text", {}).get(...)`.
The bundle format itself is described in docs/bundle-format.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _known(cls: type, data: dict[str, Any] | None) -> dict[str, Any]:
    """The keys of `data` that `cls` has fields for (readers ignore keys they do not know)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in (data or {}).items() if k in names}


@dataclass(frozen=True)
class TextSection:
    """Text tasks and causal LMs: the tokenization training used (causal LMs: max_length is the block size)."""

    max_length: int | None = None
    text_column: str | None = None
    text_pair_column: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TextSection:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class TokenizerSection:
    """The bundle's tokenizer.json and its special tokens (the file alone encodes; these are for reference)."""

    file: str = "tokenizer.json"
    padding_side: str = "right"
    truncation_side: str = "right"
    max_length: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    special_tokens: list[str] = field(default_factory=list)
    model_input_names: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TokenizerSection:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class GenerationSection:
    """Causal LMs: the decoding defaults saved with the model, the token ids that end and pad, the positions."""

    defaults: dict[str, Any]  # max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, ...
    pad_token_id: int
    eos_token_id: int | list[int] | None = None
    max_positions: int | None = None  # prompt + new tokens must fit (None: the config does not say)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSection:
        ids = ("pad_token_id", "eos_token_id", "max_positions")
        return cls(defaults={k: v for k, v in data.items() if k not in ids}, pad_token_id=data["pad_token_id"],
                   eos_token_id=data.get("eos_token_id"), max_positions=data.get("max_positions"))
