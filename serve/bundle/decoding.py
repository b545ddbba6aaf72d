"""Generation with a bundle's KV-cache decoder graph: numpy and an ONNX Runtime session, no PyTorch.

Prefill runs the decoder with an empty past (past_sequence = 0); each step then feeds back the presents, so the
prefix is never recomputed. Finished sequences continue with the pad token, as transformers' `generate` does.
`decode_loop` leaves the model step and the next-token rule to the caller (greedy here, sampling in serve.generation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from serve.bundle.inputs import position_ids

# Picks the next token of each row from that step's logits: [batch, vocab] float32 -> [batch] int64.
ChooseToken = Callable[[np.ndarray], np.ndarray]
# One model run on the new tokens: (feeds, cache state) -> (logits [batch, sequence, vocab], new cache state).
Step = Callable[[dict[str, np.ndarray], Any], tuple[np.ndarray, Any]]


def empty_past(cache: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
    """Zero-length past key/value inputs [batch, kv_heads, 0, head_dim] for the prefill step."""
    shape = (batch_size, cache["num_kv_heads"], 0, cache["head_dim"])
    return {cache[f"past_{kind}"].format(i=i): np.zeros(shape, dtype=np.dtype(cache["dtype"]))
            for i in range(cache["num_layers"]) for kind in ("key", "value")}


def decode_loop(step: Step, input_ids: np.ndarray, attention_mask: np.ndarray, *, choose: ChooseToken,
                max_new_tokens: int, eos_token_id: int | list[int] | None, pad_token_id: int,
                state: Any = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens [batch], next-token logits [batch, vocab]) per step after left-padded prompts, lazily: a caller
    that stops iterating stops the decoding. Ends after `max_new_tokens` or when every row has produced EOS.

    `step(feeds, state) -> (logits [batch, sequence, vocab], state)` runs the model on the new tokens given the
    cache `state` (None or the empty past at the prefill); feeds are input_ids, attention_mask (past + new) and
    position_ids. The ONNX decoder graph's step is `onnx_step`; serve.pytorch has the PyTorch one.
    """
    batch = input_ids.shape[0]
    ids, mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
    positions = position_ids(mask)
    finished = np.zeros(batch, dtype=bool)
    for _ in range(max_new_tokens):
        logits, state = step({"input_ids": ids, "attention_mask": mask, "position_ids": positions}, state)
        logits = logits[:, -1]  # [batch, vocab]
        token = np.asarray(choose(logits), dtype=np.int64)
        if eos_token_id is not None:
            token = np.where(finished, pad_token_id, token)
            finished |= np.isin(token, eos_token_id)
        yield token, logits
        if finished.all():
            return
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        ids = token[:, None]
        positions = position_ids(mask, past_length=mask.shape[1] - 1)


def onnx_step(decoder: Any, cache: dict[str, Any]) -> Step:
    """The `decode_loop` step of a decoder graph session; its state is the past key/value arrays (None: empty)."""
    wanted = {i.name for i in decoder.get_inputs()}
    output_names = [o.name for o in decoder.get_outputs()]
    # present.{i}.key (output) feeds past_key_values.{i}.key (input) at the next step.
    feeds_back = {cache[f"present_{kind}"].format(i=i): cache[f"past_{kind}"].format(i=i)
                  for i in range(cache["num_layers"]) for kind in ("key", "value")}

    def step(feeds: dict[str, np.ndarray], past: dict[str, np.ndarray] | None) -> tuple[np.ndarray, Any]:
        past = past if past is not None else empty_past(cache, feeds["input_ids"].shape[0])
        inputs = {k: v for k, v in {**feeds, **past}.items() if k in wanted}
        outputs = dict(zip(output_names, decoder.run(None, inputs), strict=True))
        return outputs["logits"], {feeds_back[n]: v for n, v in outputs.items() if n in feeds_back}

    return step


def decode_steps(decoder: Any, input_ids: np.ndarray, attention_mask: np.ndarray, *, cache: dict[str, Any],
                 choose: ChooseToken, max_new_tokens: int, eos_token_id: int | list[int] | None,
                 pad_token_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`decode_loop` over a decoder graph (an onnxruntime.InferenceSession; `cache` is the manifest's section)."""
    return decode_loop(onnx_step(decoder, cache), input_ids, attention_mask, choose=choose,
                       max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def greedy_generate(decoder: Any, input_ids: np.ndarray, attention_mask: np.ndarray, *, cache: dict[str, Any],
                    max_new_tokens: int, eos_token_id: int | list[int] | None,
                    pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy tokens [batch, steps] after left-padded prompts, and each step's next-token logits [steps, batch, vocab].

    `decoder` is an onnxruntime.InferenceSession of a decoder graph; `cache` is the manifest's cache section.
    """
    steps = list(decode_steps(decoder, input_ids, attention_mask, cache=cache, choose=lambda x: x.argmax(axis=-1),
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id))
    return np.stack([t for t, _ in steps], axis=1), np.stack([logits for _, logits in steps])
