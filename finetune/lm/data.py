"""Causal-LM datasets: plain text packed into fixed blocks, or instruction pairs with the loss on responses only.

Sources are read by `finetune.data` (embedded, local .txt / .csv / .json / .jsonl / .parquet, or hub id). Two formats:
  - `text`: each row (a whole .txt file, or a row's text column) is a document; documents are tokenized, joined with
    EOS and cut into `block_size` blocks. Without an eval source, the last `eval_fraction` of the blocks is held out
    (a contiguous tail, so no held-out text also sits in a training block).
  - `instruction`: each row is a prompt and a response, rendered with the tokenizer's chat template (or
    `chat_template`, an Alpaca-style default for tokenizers without one); prompt tokens get label -100, so the loss
    is on the response (and the end-of-turn token that teaches the model to stop). Without an eval source,
    `eval_fraction` of the rows is held out at random.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from finetune.data import DataSourceConfig, hold_out, load_splits, require_columns, subsample
from finetune.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens the loss skips (prompt, padding)
# For tokenizers without a chat template (GPT-2): Alpaca-style turns; the response ends with EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n### Response:\n"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


@dataclass
class LMDataConfig(DataSourceConfig):
    """A language-modelling dataset: its source, its format, and the block size in tokens."""

    train: str = "embedded:json-extraction"
    format: Literal["text", "instruction"] = "text"
    text_column: str = "text"  # text format (a .txt file has one column, "text")
    prompt_column: str = "prompt"  # instruction format
    response_column: str = "response"
    system_prompt: str | None = None  # instruction format: a system message before every prompt
    chat_template: str | None = None  # a Jinja chat template to use instead of the tokenizer's own
    block_size: int = 256  # tokens per training example (text: every block; instruction: the longest)
    group_by_length: bool = True  # instruction format: batch examples of similar length (less padding)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2 tokens, got {self.block_size}")


def prepare_tokenizer(tokenizer: Any, cfg: LMDataConfig) -> Any:
    """Give the tokenizer a pad token (GPT-2 style tokenizers have none: EOS pads; labels mask padding anyway) and,
    for instruction data, a chat template; return it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token; use a tokenizer with an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.format == "instruction" and (cfg.chat_template or not tokenizer.chat_template):
        tokenizer.chat_template = cfg.chat_template or DEFAULT_CHAT_TEMPLATE
    return tokenizer


def render_prompt(tokenizer: Any, prompt: str, cfg: LMDataConfig) -> str:
    """The text the model continues: the prompt as a chat turn (instruction format) or as it is (text format)."""
    if cfg.format == "text":
        return prompt
    return tokenizer.apply_chat_template(_messages(prompt, cfg), tokenize=False, add_generation_prompt=True)


def build_lm_splits(tokenizer: Any, cfg: LMDataConfig, seed: int) -> dict[str, Any]:
    """Load, tokenize and shape the train and eval splits: `input_ids`, `length` and (instruction) `labels`.

    Run it under `accelerator.main_process_first()`: the main process tokenizes, the others read its cache.
    """
    raw = load_splits(cfg)
    if cfg.format == "text":
        require_columns(raw, {cfg.text_column: "data.text_column"})
        tokenized = {name: _pack(ds, tokenizer, cfg, name) for name, ds in raw.items() if ds is not None}
        if raw["eval"] is None:
            tokenized["train"], tokenized["eval"] = _hold_out_tail(tokenized["train"], cfg)
    else:
        require_columns(raw, {cfg.prompt_column: "data.prompt_column", cfg.response_column: "data.response_column"})
        if raw["eval"] is None:
            raw["train"], raw["eval"] = hold_out(raw["train"], cfg.eval_fraction, seed)
        tokenized = {name: _encode_instructions(ds, tokenizer, cfg, name) for name, ds in raw.items()}
    return subsample(tokenized, cfg, seed)


def _pack(ds: Any, tokenizer: Any, cfg: LMDataConfig, split: str) -> Any:
    """Documents -> one token stream (EOS after each) -> `block_size` blocks; a last partial block is dropped."""
    block, eos = cfg.block_size, tokenizer.eos_token_id

    def pack(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch[cfg.text_column] if isinstance(t, str) and t.strip()]
        stream: list[int] = []
        for ids in tokenizer(texts, verbose=False)["input_ids"] if texts else []:  # verbose: no length warnings
            stream += ids if ids and ids[-1] == eos else [*ids, eos]
        starts = range(0, len(stream) - block + 1, block)
        return {"input_ids": [stream[i:i + block] for i in starts], "length": [block] * len(starts)}

    # Large batches: the partial block dropped at the end of each batch is a small share of the text.
    blocks = ds.map(pack, batched=True, batch_size=2000, remove_columns=ds.column_names, desc=f"pack ({split})")
    if len(blocks) == 0:
        texts = [t for t in ds[cfg.text_column] if isinstance(t, str) and t.strip()]
        if not texts:
            raise DataError(f"the {split} split holds no text in column {cfg.text_column!r}; add text to "
                            f"data.{split} or set data.text_column")
        tokens = sum(len(ids) + 1 for ids in tokenizer(texts, verbose=False)["input_ids"])
        raise DataError(f"the {split} split holds {tokens} tokens, fewer than one block of data.block_size="
                        f"{block}; lower data.block_size or add text")
    return blocks


def _hold_out_tail(blocks: Any, cfg: LMDataConfig) -> tuple[Any, Any]:
    """(train, eval): the last `eval_fraction` of the blocks (at least one) is eval."""
    if len(blocks) < 2:
        raise DataError(f"data.train makes {len(blocks)} block of data.block_size={cfg.block_size} tokens; holding "
                        "out an eval split needs at least 2: lower data.block_size, add text, or set data.eval")
    num_eval = min(len(blocks) - 1, max(1, round(cfg.eval_fraction * len(blocks))))
    cut = len(blocks) - num_eval
    return blocks.select(range(cut)), blocks.select(range(cut, len(blocks)))


def _messages(prompt: str, cfg: LMDataConfig) -> list[dict[str, str]]:
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def _encode_instructions(ds: Any, tokenizer: Any, cfg: LMDataConfig, split: str) -> Any:
    """Render each (prompt, response) as a conversation; labels copy the response tokens, -100 elsewhere."""

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        prompt, response = (row[c] if isinstance(row[c], str) else "" for c in (cfg.prompt_column,
                                                                                 cfg.response_column))
        messages = _messages(prompt, cfg)
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}],
                                             tokenize=False)
        if not full.startswith(head):
            raise DataError("the chat template does not render the prompt as the start of the conversation, so "
                            "the response cannot be told apart; set data.chat_template")
        # Tokenized apart, so the boundary is exact; the template already holds any BOS / special tokens.
        head_ids = tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]
        tail_ids = tokenizer(full[len(head):], add_special_tokens=False, verbose=False)["input_ids"]
        ids = (head_ids + tail_ids)[:cfg.block_size]
        labels = ([IGNORE_INDEX] * len(head_ids) + tail_ids)[:cfg.block_size]
        return {"input_ids": ids, "labels": labels, "length": len(ids),
                "targets": sum(label != IGNORE_INDEX for label in labels)}

    encoded = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenize ({split})")
    kept = encoded.filter(lambda targets: [t > 0 for t in targets], input_columns="targets", batched=True)
    if len(kept) < len(encoded):
        logger.warning("%d of %d %s examples dropped: their prompts fill data.block_size=%d tokens",
                       len(encoded) - len(kept), len(encoded), split, cfg.block_size)
    if len(kept) == 0:
        raise DataError(f"every prompt in the {split} split is at least data.block_size={cfg.block_size} tokens "
                        "long, leaving no response to learn; raise data.block_size")
    return kept.remove_columns("targets")


@dataclass
class CausalLMCollator:
    """Right-pads a list of examples into a batch: `input_ids`, `attention_mask`, `labels` (-100 on padding).

    Examples without `labels` (packed text) learn every token: labels are a copy of `input_ids`.
    """

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(f.get("labels", f["input_ids"]))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
