"""Sequence classifiers (and regressors) from pretrained encoders: the head, labels and max length."""

from __future__ import annotations

import logging
from typing import Any, Literal

from finetune.errors import ModelError
from finetune.models import ModelConfig, from_pretrained_checked, resolve_model_source

logger = logging.getLogger(__name__)


def fit_max_length(cfg: ModelConfig, tokenizer: Any, requested: int) -> int:
    """`requested` tokens, capped at what the model takes: its position table and its tokenizer's model_max_length
    (a longer setting would crash on long texts, or export a graph that does)."""
    from transformers import AutoConfig

    config = from_pretrained_checked(AutoConfig, resolve_model_source(cfg.name_or_path), "config",
                              trust_remote_code=cfg.trust_remote_code)
    limits = [n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
              if isinstance(n, int) and 0 < n < 1_000_000]
    if limits and min(limits) < requested:
        logger.warning("data.max_length=%d is longer than the model takes; using %d", requested, min(limits))
        return min(limits)
    return requested


def build_sequence_classifier(cfg: ModelConfig, *, label_names: list[str] | None,
                              problem_type: Literal["single_label_classification", "regression"]) -> Any:
    """A sequence classifier (or regressor: one output) on top of a pretrained encoder, loaded from safetensors."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_source(cfg.name_or_path)
    regression = problem_type == "regression"
    kwargs: dict[str, Any] = {"num_labels": 1 if regression else len(label_names or [])}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    kwargs["ignore_mismatched_sizes"] = _head_is_replaced(cfg, source, kwargs["num_labels"], label_names)
    model = from_pretrained_checked(AutoModelForSequenceClassification, source, "model", problem_type=problem_type,
                             trust_remote_code=cfg.trust_remote_code, use_safetensors=True, **kwargs)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def _head_is_replaced(cfg: ModelConfig, source: str, num_labels: int, label_names: list[str] | None) -> bool:
    """Whether a source that is already a sequence classifier needs a new head for these labels (True: logged).

    Its labels in another order would silently swap meanings, so that is an error naming the fix."""
    from transformers import AutoConfig

    config = from_pretrained_checked(AutoConfig, source, "config", trust_remote_code=cfg.trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return False  # a plain encoder: the head is new anyway
    old = [str(config.id2label[i]) for i in range(config.num_labels)]
    if label_names and old != label_names and sorted(old) == sorted(label_names):
        raise ModelError(f"{cfg.name_or_path} was trained with the labels {old} in this order, the data gives "
                         f"{label_names}; set data.label_names={old} to keep its classifier head")
    if config.num_labels != num_labels:
        logger.warning("%s has a classifier head for %d outputs %s; a new head is trained for %d", cfg.name_or_path,
                       config.num_labels, old, num_labels)
        return True
    return False
