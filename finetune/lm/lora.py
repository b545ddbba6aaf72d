"""LoRA through peft: wrap a model so only low-rank adapters train, and merge them back for a plain saved model.

peft is imported only when LoRA is used (`pip install 'tuneforge[lm]'`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from finetune.config import check_bounds
from finetune.errors import ConfigError


@dataclass
class LoraConfig:
    """Low-rank adapters on the target modules; the rest of the model is frozen. Off by default."""

    enabled: bool = False
    r: int = 8  # adapter rank
    alpha: float = 16.0  # the adapter's output is scaled by alpha / r
    dropout: float = 0.05  # on the adapter's input, during training
    # Module names (suffixes) to adapt, e.g. [q_proj, v_proj] (Llama) or [c_attn] (GPT-2); "all-linear": every
    # linear layer but the output head.
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        check_bounds(self, ">= 1", "r")
        check_bounds(self, "> 0", "alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> Any:
    """The model wrapped by peft with fresh adapters (B = 0: it computes what the base model does at first)."""
    try:
        import peft
    except ImportError:
        raise ConfigError("lora.enabled=true needs peft: pip install 'tuneforge[lm]'") from None
    # GPT-2's Conv1D layers store weights as (in, out): peft must know to transpose B @ A.
    conv1d = any(type(module).__name__ == "Conv1D" for module in model.modules())
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, fan_in_fan_out=conv1d,
                             target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if type(module).__name__ in ("Linear", "Conv1D")})
        raise ConfigError(f"lora.target_modules {cfg.target_modules!r} matches no module of the model; its linear "
                          f"layers are named {', '.join(linear)} (or use all-linear)") from None


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped by peft (checked without importing peft)."""
    return type(model).__module__.startswith("peft.")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ...} parameter counts."""
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


@contextmanager
def merged_adapters(model: Any) -> Iterator[tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """Merge the adapters into the base weights in place (W += scale * B @ A) and yield the base model with its
    state dict under the plain model's keys (what `save_pretrained` of the plain model writes); unmerge on exit.

    In place, so saving costs no copy of the weights; merge and unmerge round each weight by at most an ulp or so.
    """
    from peft.tuners.lora import LoraLayer

    adapter_parts = set(LoraLayer.adapter_layer_names)
    base = model.get_base_model()
    with torch.no_grad():
        model.merge_adapter()
    try:
        yield base, {name.replace(".base_layer.", "."): tensor for name, tensor in base.state_dict().items()
                     if not adapter_parts & set(name.split("."))}
    finally:
        with torch.no_grad():
            model.unmerge_adapter()
