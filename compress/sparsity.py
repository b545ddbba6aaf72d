"""Unstructured pruning: zero the smallest-magnitude weights of the whole model (one global threshold) to a target
sparsity. Shapes stay the same, so dense kernels run as fast as before; the zeros make the weights compress well
(zip, or sparse kernels where a runtime has them). The trade-off report measures its speed; nothing here assumes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def prunable_weights(model: nn.Module, *, include_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The matrices unstructured pruning considers: Linear, Conv and GPT-2 Conv1D weights (and embeddings if asked);
    biases and normalisation parameters stay dense."""
    kinds: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    kinds += (nn.Embedding,) if include_embeddings else ()
    out: dict[str, torch.Tensor] = {}
    # Tied weights count once; an output layer tied to the embeddings (GPT-2's lm_head = wte) is an embedding.
    seen = set() if include_embeddings else {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if (isinstance(module, kinds) or type(module).__name__ == "Conv1D") and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out[f"{name}.weight"] = module.weight
    return out


@torch.no_grad()
def prune_magnitude_(model: nn.Module, sparsity: float, *, include_embeddings: bool = False) -> dict[str, Any]:
    """Zero exactly round(sparsity x N) of the N prunable weights, those of smallest |w| over the whole model, in place;
    return the measured sparsity (see `measure_sparsity`)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    weights = prunable_weights(model, include_embeddings=include_embeddings)
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    count = round(sparsity * flat.numel())
    if count:
        mask = torch.ones_like(flat, dtype=torch.bool)
        mask[flat.topk(count, largest=False).indices] = False  # exact count, whatever the ties at the threshold
        start = 0
        for weight in weights.values():
            weight.mul_(mask[start:start + weight.numel()].view_as(weight))
            start += weight.numel()
    return {"target": sparsity, **measure_sparsity(model, include_embeddings=include_embeddings)}


def measure_sparsity(model: nn.Module, *, include_embeddings: bool = False) -> dict[str, Any]:
    """Fraction of exact zeros among the prunable weights (`sparsity`) and among all parameters (`model_sparsity`)."""
    weights = prunable_weights(model, include_embeddings=include_embeddings)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    params = list(model.parameters())  # deduplicated: tied weights once
    all_zeros = sum(int((p == 0).sum()) for p in params)
    return {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "weights": total,
            "model_sparsity": all_zeros / sum(p.numel() for p in params)}
