"""Causal LMs: the pretrained decoder, checked against the training block size."""

from __future__ import annotations

import logging
from typing import Any

from finetune.errors import ModelError
from finetune.models import ModelConfig, from_pretrained_checked, resolve_model_source

logger = logging.getLogger(__name__)


def build_causal_lm(cfg: ModelConfig, *, pad_token_id: int | None = None, block_size: int | None = None) -> Any:
    """A pretrained decoder-only language model in float32 (mixed precision, if any, is applied by accelerate);
    `block_size` (tokens per example) is checked against the model's positions."""
    import torch
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(cfg.name_or_path)
    model = from_pretrained_checked(AutoModelForCausalLM, source, "model", trust_remote_code=cfg.trust_remote_code,
                             use_safetensors=True, dtype=torch.float32)
    positions = getattr(model.config, "max_position_embeddings", None)
    if block_size is not None and positions is not None and block_size > positions:
        raise ModelError(f"data.block_size={block_size} is longer than the model's {positions} positions; "
                         f"set data.block_size to {positions} or less")
    if pad_token_id is not None:  # GPT-2 style models have none; batches pad with the tokenizer's pad token
        model.config.pad_token_id = model.generation_config.pad_token_id = pad_token_id
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model
