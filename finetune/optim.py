"""AdamW with no weight decay on biases and norms, and warmup + linear/cosine/constant schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from finetune.config import check_bounds


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 5.0e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.0  # fraction of all optimizer steps spent warming up
    warmup_steps: int = 0  # used instead of warmup_ratio when > 0

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ValueError(f"betas needs two numbers, got {self.betas}")
        check_bounds(self, "> 0", "lr", "eps")
        check_bounds(self, ">= 0", "weight_decay", "warmup_steps")
        check_bounds(self, "in [0, 1)", "warmup_ratio", "betas")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (fused kernel: one pass over all parameters) where 1-D parameters (biases, norms) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, fused=True)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps: `warmup_steps` if set, else `warmup_ratio` of `total_steps`."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to `lr`, then linear decay to 0, cosine decay to 0, or constant."""
    warmup = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
