"""Evaluation over all processes: gather predictions exactly once per example, then score on every process."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from finetune.metrics import classification_metrics, per_class_scores, regression_metrics


@torch.no_grad()
def predict(accelerator: Any, model: torch.nn.Module, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of every eval example (duplicates that pad the last batches across processes dropped)."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        out = model(**batch)
        batch_logits, batch_labels = accelerator.gather_for_metrics((out.logits.float(), batch["labels"]))
        logits.append(batch_logits.cpu())
        labels.append(batch_labels.cpu())
    model.train()
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def score_classifier(logits: np.ndarray, labels: np.ndarray, *, num_labels: int,
                     label_names: list[str] | None = None) -> dict[str, Any]:
    """eval_loss (mean cross-entropy per example), num_examples and the classification metrics; with
    `label_names`, also `per_class` precision / recall / F1 / support."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    metrics = classification_metrics(log_probs.argmax(axis=1), labels, num_labels=num_labels,
                                     prediction_scores=np.exp(log_probs))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    out = {"eval_loss": loss, "num_examples": len(labels), **metrics}
    if label_names is not None:
        out["per_class"] = per_class_scores(metrics["confusion_matrix"], label_names)
    return out


def score_regressor(predictions: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """eval_loss (mean squared error, the training loss), num_examples and the regression metrics."""
    preds = predictions.reshape(-1).astype(np.float64)
    metrics = regression_metrics(preds, labels.astype(np.float64))
    return {"eval_loss": metrics["mse"], "num_examples": len(labels), **metrics}


@torch.no_grad()
def score_causal_lm(accelerator: Any, model: torch.nn.Module, loader: Any) -> dict[str, Any]:
    """eval_loss (mean cross-entropy per target token over the whole split), perplexity = exp(eval_loss), num_tokens.

    Token losses are summed per example and gathered with their token counts, so the mean weighs every token once,
    whatever the batch sizes, padding or number of processes (examples repeated to fill the last batches are dropped).
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    num_tokens = 0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        # Position t predicts token t+1: (batch, T-1, vocab) against (batch, T-1); -100 (prompt, padding) skipped.
        targets = batch["labels"][:, 1:]
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
        example_sums = token_losses.view(targets.shape).sum(dim=1)
        example_counts = (targets != -100).sum(dim=1)
        sums, counts = accelerator.gather_for_metrics((example_sums, example_counts))
        loss_sum += sums.double().sum().cpu()
        num_tokens += int(counts.sum())
    model.train()
    loss = float(loss_sum / max(1, num_tokens))
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "num_tokens": num_tokens}
