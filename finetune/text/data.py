"""Text-classification data: the config, raw splits, label encoding and tokenization."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from finetune.config import check_bounds, check_unique
from finetune.data import (
    DataSourceConfig,
    hold_out,
    is_number,
    label_ids,
    load_splits,
    require_columns,
    resolve_label_names,
    subsample,
)
from finetune.errors import DataError

logger = logging.getLogger(__name__)


@dataclass
class TextDataConfig(DataSourceConfig):
    """A text-classification dataset: its source, and which columns hold the text(s) and the label."""

    train: str = "embedded:reviews"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: list[str] | None = None  # fixes the label order; default: sorted labels of the train split
    max_length: int = 128  # tokens; longer texts are truncated
    group_by_length: bool = False  # batch texts of similar length together: less padding, faster epochs

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bounds(self, ">= 2", "max_length")
        check_unique(self.label_names, "label_names")


def load_raw_splits(cfg: TextDataConfig, seed: int) -> dict[str, Any]:
    """Load the raw train and eval splits as `datasets.Dataset`s: {"train": ..., "eval": ...}.

    Without an eval source, `cfg.eval_fraction` of the train rows is held out at random; then the
    `max_*_samples` limits apply.
    """
    splits = load_splits(cfg)
    if splits["eval"] is None:
        splits["train"], splits["eval"] = hold_out(splits["train"], cfg.eval_fraction, seed)
    return subsample(splits, cfg, seed)


def encode_labels(splits: dict[str, Any], cfg: TextDataConfig, *, regression: bool,
                  num_labels: int | None = None) -> tuple[dict[str, Any], list[str] | None]:
    """Add an integer (or float, for regression) `labels` column; return the splits and the label names.

    String labels map to ids in `cfg.label_names` order (default: sorted train labels); integer labels must lie
    in [0, num_labels). `num_labels`, when given, must match the number of labels found.
    """
    columns = {cfg.text_column: "data.text_column", cfg.text_pair_column: "data.text_pair_column",
               cfg.label_column: "data.label_column"}
    require_columns(splits, {column: key for column, key in columns.items() if column is not None})
    if regression:
        def to_float(batch: dict[str, list]) -> dict[str, list]:
            try:
                return {"labels": [float(v) for v in batch[cfg.label_column]]}
            except (TypeError, ValueError):
                raise DataError(f"regression needs numeric labels in column {cfg.label_column!r}; found "
                                f"{next(v for v in batch[cfg.label_column] if not is_number(v))!r}") from None
        return {n: ds.map(to_float, batched=True, desc=f"labels ({n})") for n, ds in splits.items()}, None

    feature = splits["train"].features.get(cfg.label_column)
    class_names = list(feature.names) if type(feature).__name__ == "ClassLabel" else None  # a hub dataset's names
    names = resolve_label_names(splits["train"].unique(cfg.label_column), label_names=cfg.label_names or class_names,
                                num_labels=num_labels, column=cfg.label_column)

    def map_labels(batch: dict[str, list], split: str) -> dict[str, list]:
        return {"labels": label_ids(batch[cfg.label_column], names, split=split)}

    return {n: ds.map(map_labels, batched=True, fn_kwargs={"split": n}, desc=f"labels ({n})")
            for n, ds in splits.items()}, names


def tokenize_splits(splits: dict[str, Any], tokenizer: Any, cfg: TextDataConfig) -> dict[str, Any]:
    """Tokenize (truncating to `cfg.max_length`, no padding: batches pad dynamically) and keep only model inputs."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [str(t) for t in batch[cfg.text_column]]  # a column read as numbers is still text
        pairs = [str(t) for t in batch[cfg.text_pair_column]] if cfg.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    out = {}
    for name, ds in splits.items():
        for column, key in ((cfg.text_column, "data.text_column"), (cfg.text_pair_column, "data.text_pair_column")):
            values = ds.with_format("arrow")[column] if column else None  # counted in Arrow, not copied
            if values is not None and values.null_count:
                raise DataError(f"the {name} split has {values.null_count} empty texts in column {column!r} ({key}), "
                                f"first at row {values.to_pylist().index(None)}; fill or drop those rows")
        keep = {"labels"}
        tokenized = ds.map(tokenize, batched=True, desc=f"tokenize ({name})")
        keep |= {c for c in tokenized.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "length")}
        out[name] = tokenized.remove_columns([c for c in tokenized.column_names if c not in keep])
    return out
