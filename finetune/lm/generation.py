"""Text generation settings and the samples a causal-LM run writes (`samples.md`: greedy and sampled)."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.config import check_bounds


@dataclass
class GenerationConfig:
    """Prompts for the samples written after training, and the decoding settings saved with the model."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    do_sample: bool = True  # the decoding that model/ records for serving; samples.md shows greedy and sampled
    temperature: float = 0.7
    top_k: int = 50  # 0: no top-k filtering
    top_p: float = 0.9
    repetition_penalty: float = 1.1  # > 1 discourages repeating tokens; 1: off

    def __post_init__(self) -> None:
        check_bounds(self, ">= 0", "top_k")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (for greedy decoding set do_sample: false), got "
                             f"{self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def settings(self) -> dict[str, Any]:
        """The decoding settings (what `tuneforge.json` records under "generation")."""
        return {k: v for k, v in asdict(self).items() if k != "prompts"}


@torch.no_grad()
def generate(model: Any, tokenizer: Any, text: str, cfg: GenerationConfig, *, sample: bool,
             chat: bool) -> dict[str, Any]:
    """Continue `text`: plain text, or (`chat`) a prompt already rendered by the chat template, which holds its own
    special tokens. Returns the new text, its token count and the seconds taken."""
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(model.device)
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "repetition_penalty": cfg.repetition_penalty,
                              "pad_token_id": tokenizer.pad_token_id, "do_sample": sample}
    if sample:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    else:  # the model's generation_config may ask for sampling; greedy means no sampling knobs at all
        kwargs.update(temperature=None, top_k=None, top_p=None)
    start = time.perf_counter()
    out = model.generate(**enc, **kwargs)
    seconds = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new), "seconds": seconds}


def write_samples(model: Any, tokenizer: Any, prompts: list[tuple[str, str]], cfg: GenerationConfig,
                  path: str | Path, *, chat: bool, seed: int, title: str) -> dict[str, Any]:
    """Generate greedy and sampled continuations of each (prompt, rendered prompt) and write them as markdown;
    `chat`: the rendered prompts come from the chat template.

    Returns generation throughput: {"new_tokens", "seconds", "tokens_per_second"} over all generations.
    """
    from transformers import set_seed

    model.eval()
    settings = ", ".join(f"{k}={v}" for k, v in cfg.settings().items() if k != "do_sample")
    lines = [f"# {title}", "", f"Decoding: greedy, and sampled with {settings}.", ""]
    new_tokens, seconds = 0, 0.0
    for i, (prompt, rendered) in enumerate(prompts, 1):
        lines += [f"## Prompt {i}", "", *_fenced(prompt)]
        for sample in (False, True):
            set_seed(seed + i)  # each sampled continuation reproducible on its own
            result = generate(model, tokenizer, rendered, cfg, sample=sample, chat=chat)
            new_tokens, seconds = new_tokens + result["new_tokens"], seconds + result["seconds"]
            lines += [f"**{'sampled' if sample else 'greedy'}** ({result['new_tokens']} tokens)", "",
                      *_fenced(result["text"])]
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    return {"new_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_second": round(new_tokens / seconds, 2) if seconds else None}


def _fenced(text: str) -> list[str]:
    """A markdown code block that survives backticks in the text."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return [f"{fence}text", text, fence, ""]
