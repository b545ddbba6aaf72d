"""Evaluation over all processes: gather predictions exactly once per example, then score on every process."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from finetune.metrics import load_metric, per_class_scores


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
    metrics = load_metric("classification").compute(
        predictions=log_probs.argmax(axis=1), references=labels, num_labels=num_labels,
        prediction_scores=np.exp(log_probs))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    out = {"eval_loss": loss, "num_examples": len(labels), **metrics}
    if label_names is not None:
        out["per_class"] = per_class_scores(metrics["confusion_matrix"], label_names)
    return out


def score_regressor(predictions: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """eval_loss (mean squared error, the training loss), num_examples and the regression metrics."""
    preds = predictions.reshape(-1).astype(np.float64)
    metrics = load_metric("regression").compute(predictions=preds, references=labels.astype(np.float64))
    return {"eval_loss": metrics["mse"], "num_examples": len(labels), **metrics}
