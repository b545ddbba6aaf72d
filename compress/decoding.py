"""Greedy generation with a bundle's KV-cache decoder graph: numpy and an ONNX Runtime session, no PyTorch.

Prefill runs the decoder with an empty past (past_sequence = 0); each step then feeds back the presents, so the
prefix is never recomputed. Finished sequences continue with the pad token, as transformers' `generate` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compress.inputs import position_ids


def empty_past(cache: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """Zero-length past key/value inputs [batch, kv_heads, 0, head_dim] for the prefill step."""
    shape = (batch_size, cache["num_kv_heads"], 0, cache["head_dim"])
    return {cache[f"past_{kind}"].format(i=i): np.zeros(shape, dtype=np.dtype(cache["dtype"]))
            for i in range(cache["num_layers"]) for kind in ("key", "value")}


def greedy_generate(decoder: Any, input_ids: np.ndarray, attention_mask: np.ndarray, *, cache: dict[str, Any],
                    max_new_tokens: int, eos_token_id: int | list[int] | None,
                    pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens [batch, steps] after left-padded prompts, and each step's next-token logits [steps, batch, vocab].

    `decoder` is an onnxruntime.InferenceSession of a decoder graph; `cache` is the manifest's cache section.
    """
    wanted = {i.name for i in decoder.get_inputs()}
    output_names = [o.name for o in decoder.get_outputs()]
    # present.{i}.key (output) feeds past_key_values.{i}.key (input) at the next step.
    feeds_back = {cache[f"present_{kind}"].format(i=i): cache[f"past_{kind}"].format(i=i)
                  for i in range(cache["num_layers"]) for kind in ("key", "value")}
    batch = input_ids.shape[0]
    past = empty_past(cache, batch)
    ids, mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
    positions = position_ids(mask)
    finished = np.zeros(batch, dtype=bool)
    tokens, step_logits = [], []
    for _ in range(max_new_tokens):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        outputs = dict(zip(output_names, decoder.run(None, {k: v for k, v in feeds.items() if k in wanted}),
                           strict=True))
        logits = outputs["logits"][:, -1]  # [batch, vocab]
        token = logits.argmax(axis=-1)
        if eos_token_id is not None:
            token = np.where(finished, pad_token_id, token)
            finished |= np.isin(token, eos_token_id)
        tokens.append(token)
        step_logits.append(logits)
        if finished.all():
            break
        past = {feeds_back[name]: value for name, value in outputs.items() if name in feeds_back}
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        ids = token[:, None].astype(np.int64)
        positions = position_ids(mask, past_length=mask.shape[1] - 1)
    return np.stack(tokens, axis=1), np.stack(step_logits)
