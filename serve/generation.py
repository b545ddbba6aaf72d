"""Text generation with a KV-cache model step: sampling rules as transformers applies them, streamed text. numpy only.

The model is a `serve.bundle.decoding.Step` (the ONNX decoder graph's `onnx_step`, or serve.pytorch's PyTorch step) run
by `serve.bundle.decoding.decode_loop`. The next-token rule follows transformers' order: repetition penalty, then
temperature, top-k, top-p, then a draw (or argmax when greedy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from serve.bundle.decoding import Step, decode_loop
from serve.bundle.manifest import generation_setting_problem
from serve.errors import InputError
from serve.predictors import check_unicode

Prompt = str | list[dict[str, str]]  # a text, or a conversation rendered by the chat template

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How `generate` picks tokens. `do_sample=False` or `temperature=0` is greedy; `seed` makes sampling repeat."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already in the prompt or the output
    do_sample: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        # Types as well as ranges: "5" or 5.5 tokens, or a seed of -1, would fail deep in numpy otherwise. The rules
        # are the manifest's (serve.bundle.manifest.GENERATION_RULES), so a bundle's defaults obey them too.
        for name in self.__dataclass_fields__:
            problem = generation_setting_problem(name, getattr(self, name))
            if problem:
                raise InputError(problem)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_manifest(cls, section: dict[str, Any] | None) -> GenerationSettings:
        """The bundle's generation defaults (unknown keys, e.g. eos_token_id, are not settings)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (section or {}).items() if k in known and v is not None})


class Sampler:
    """The next-token rule for `decode_loop`: picks a token per row and remembers it for the repetition penalty."""

    def __init__(self, settings: GenerationSettings, prompt_ids: np.ndarray):
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self.prompt_ids = np.atleast_2d(prompt_ids)  # [batch, prompt]
        self.seen: np.ndarray | None = None  # [batch, vocab] bool, built on the first call (vocab from the logits)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [batch, vocab] -> tokens [batch] int64."""
        s = self.settings
        scores = logits.astype(np.float32)
        if self.seen is None:
            self.seen = np.zeros(scores.shape, dtype=bool)
            np.put_along_axis(self.seen, self.prompt_ids, True, axis=1)
        if s.repetition_penalty != 1.0:
            penalized = np.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)
            scores = np.where(self.seen, penalized, scores)
        token = scores.argmax(axis=-1) if s.greedy else self._draw(self._warp(scores / s.temperature))
        self.seen[np.arange(len(token)), token] = True
        return token.astype(np.int64)

    def _warp(self, scores: np.ndarray) -> np.ndarray:
        """Top-k, then top-p (nucleus): scores outside the kept set become -inf."""
        s = self.settings
        if 0 < s.top_k < scores.shape[-1]:
            kth = np.partition(scores, -s.top_k, axis=-1)[:, -s.top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        if s.top_p < 1.0:
            order = np.argsort(-scores, axis=-1, kind="stable")
            sorted_probs = _softmax(np.take_along_axis(scores, order, axis=-1))
            before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the better-ranked tokens
            drop_sorted = before >= s.top_p  # the first token (mass 0 before it) always stays
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            scores = np.where(drop, -np.inf, scores)
        return scores

    def _draw(self, scores: np.ndarray) -> np.ndarray:
        probs = _softmax(scores)
        cumulative = np.cumsum(probs, axis=-1)
        u = self.rng.random((len(probs), 1)) * cumulative[:, -1:]
        return np.minimum((cumulative < u).sum(axis=-1), probs.shape[-1] - 1)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class TextGenerator:
    """Causal LM generation: `generate(prompt, ...)` streams text pieces as tokens come; `complete` returns the text.

    Thread-safe: each call keeps its own cache and random state; the decoder session is shared.
    """

    def __init__(self, tokenizer: Any, step: Step, *, defaults: GenerationSettings,
                 eos_token_id: int | list[int] | None, pad_token_id: int, max_length: int | None = None,
                 max_positions: int | None = None, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None, name: str = "text generator"):
        self.tokenizer, self.step, self.defaults, self.name = tokenizer, step, defaults, name
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.max_length, self.chat_template = max_length, chat_template  # max_length: the training block size
        self.max_positions = max_positions  # the model's positions: prompt + new tokens must fit
        self.special_tokens = special_tokens or {}  # e.g. {"bos_token": "<s>"}: names chat templates refer to

    def settings(self, **overrides: Any) -> GenerationSettings:
        """The bundle's defaults with the given (non-None) overrides."""
        unknown = sorted(set(overrides) - set(GenerationSettings.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown generation settings {unknown}; known: "
                             f"{', '.join(GenerationSettings.__dataclass_fields__)}")
        return replace(self.defaults, **{k: v for k, v in overrides.items() if v is not None})

    def generate(self, prompt: Prompt, **settings: Any) -> Iterator[str]:
        """Stream the continuation of `prompt` as text pieces (a piece may hold several tokens, or wait for the next
        token to complete a character). A conversation ([{"role", "content"}, ...]) goes through the chat template.
        Settings: max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample, seed; unset ones take
        the bundle's defaults."""
        text = Detokenizer(self.tokenizer)
        for token in self.tokens(prompt, **settings):
            if piece := text.push(token):
                yield piece
        if rest := text.flush():
            yield rest

    def complete(self, prompt: Prompt, **settings: Any) -> str:
        """The whole continuation of `prompt` as one string."""
        return "".join(self.generate(prompt, **settings))

    def tokens(self, prompt: Prompt, **settings: Any) -> Iterator[int]:
        """Stream the generated token ids (EOS, when produced, is the last one)."""
        chosen = self.settings(**settings)
        ids = self.prompt_ids(prompt)
        limit = self.max_length
        if self.max_positions:
            if chosen.max_new_tokens >= self.max_positions:
                raise InputError(f"max_new_tokens={chosen.max_new_tokens} leaves no room for the prompt: the model "
                                 f"has {self.max_positions} positions; ask for at most {self.max_positions - 1}")
            limit = min(limit or self.max_positions, self.max_positions - chosen.max_new_tokens)
        if limit and len(ids) > limit:
            logger.warning("the prompt has %d tokens, over the %d the model takes with max_new_tokens=%d; only its "
                           "last %d tokens are used", len(ids), limit, chosen.max_new_tokens, limit)
            ids = ids[-limit:]
        input_ids = np.array([ids], dtype=np.int64)
        sampler = Sampler(chosen, input_ids)
        for token, _ in decode_loop(self.step, input_ids, np.ones_like(input_ids), choose=sampler,
                                    max_new_tokens=chosen.max_new_tokens, eos_token_id=self.eos_token_id,
                                    pad_token_id=self.pad_token_id):
            yield int(token[0])

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids generation starts from: a text with the tokenizer's special tokens, or a conversation
        rendered by the chat template, which writes its own (as apply_chat_template does: no second BOS)."""
        if isinstance(prompt, list):
            ids = self.tokenizer.encode(self.chat_prompt(prompt), add_special_tokens=False).ids
        elif isinstance(prompt, str):
            check_unicode(prompt, "the prompt")
            ids = self.tokenizer.encode(prompt).ids
        else:
            raise InputError(f"prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
        if not ids:
            raise InputError("the prompt encodes to no tokens; pass some text")
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt for a conversation ([{"role", "content"}, ...]) through the bundle's chat template, rendered as
        transformers' apply_chat_template does (needs jinja2, which the demo extra installs)."""
        if not self.chat_template:
            raise InputError("this model has no chat template; pass a plain prompt to generate()")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise InputError("a conversation is a list of {'role': str, 'content': str} messages; pass a str for "
                             "a plain prompt")
        for i, message in enumerate(messages):
            check_unicode(message["content"], f"message {i}'s content")
        try:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise InputError("chat templates need jinja2; pip install jinja2 (the demo extra has it)") from None

        def raise_exception(message: str) -> None:
            raise InputError(f"the chat template refused the conversation: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                          **self.special_tokens)


class Detokenizer:
    """Incremental decoding: `push(token)` returns the text that token completes ("" while a character is cut)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.emitted, self.text = tokenizer, [], "", ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # Byte-level tokens can end inside a UTF-8 character (decoded as U+FFFD); wait for the rest of it.
        if len(self.text) > len(self.emitted) and not self.text.endswith("\ufffd") and \
                self.text.startswith(self.emitted):
            piece, self.emitted = self.text[len(self.emitted):], self.text
            return piece
        return ""

    def flush(self) -> str:
        """What was held back for a character that never completed."""
        if len(self.text) > len(self.emitted) and self.text.startswith(self.emitted):
            piece, self.emitted = self.text[len(self.emitted):], self.text
            return piece
        return ""
