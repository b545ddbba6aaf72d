"""Task metrics: numpy implementations (checked against scikit-learn), also served as offline `evaluate` modules.

The recipes score with `classification_metrics` / `regression_metrics` directly: `import evaluate` costs seconds per
process (it imports transformers.pipelines; huggingface/evaluate#674), paid only by `load_metric`, which returns this
project's `evaluate` modules for `classification` / `regression` (they compute with the same functions; use them
where an `evaluate` module is wanted) and sends any other name to `evaluate.load`, for users online who want a hub
metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import evaluate

Average = Literal["auto", "binary", "macro", "micro", "weighted"]


def classification_metrics(predictions: Any, references: Any, num_labels: int | None = None,
                           prediction_scores: Any = None, average: Average = "auto") -> dict[str, Any]:
    """Accuracy, precision, recall, F1, MCC, the confusion matrix and, given `prediction_scores` ([n, num_labels]
    probabilities), ROC-AUC. `average="auto"` is binary for two classes, macro otherwise."""
    pred = np.asarray(predictions, dtype=np.int64)
    ref = np.asarray(references, dtype=np.int64)
    k = int(num_labels or max(pred.max(initial=0), ref.max(initial=0)) + 1)
    cm = confusion_matrix(pred, ref, k)
    if average == "auto":
        average = "binary" if k == 2 else "macro"
    precision, recall, f1 = _precision_recall_f1(cm, average)
    out: dict[str, Any] = {
        "accuracy": float(np.trace(cm) / max(1, cm.sum())),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mcc": _mcc(cm),
        "confusion_matrix": cm.tolist(),
    }
    if prediction_scores is not None:
        out["roc_auc"] = roc_auc(np.asarray(prediction_scores, dtype=np.float64), ref)
    return out


def regression_metrics(predictions: Any, references: Any) -> dict[str, float]:
    """Mean squared error, mean absolute error, R^2 and Pearson's r (NaN where undefined)."""
    pred = np.asarray(predictions, dtype=np.float64)
    ref = np.asarray(references, dtype=np.float64)
    err = pred - ref
    total = float(((ref - ref.mean()) ** 2).sum())
    pearson = float("nan")
    if pred.std() > 0 and ref.std() > 0:
        pearson = float(np.corrcoef(pred, ref)[0, 1])
    return {
        "mse": float((err**2).mean()),
        "mae": float(np.abs(err).mean()),
        "r2": float(1.0 - (err**2).sum() / total) if total > 0 else float("nan"),
        "pearson": pearson,
    }


def load_metric(name: str) -> evaluate.EvaluationModule:
    """This project's `evaluate` module for `classification` / `regression`; otherwise `evaluate.load(name)`."""
    import evaluate

    from finetune.metric_modules import PROJECT_METRICS

    if name in PROJECT_METRICS:
        return PROJECT_METRICS[name](keep_in_memory=True)
    return evaluate.load(name)


def confusion_matrix(pred: np.ndarray, ref: np.ndarray, num_labels: int) -> np.ndarray:
    """[num_labels, num_labels] counts; rows are true labels, columns predicted (scikit-learn's layout)."""
    return np.bincount(ref * num_labels + pred, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def per_class_scores(cm: np.ndarray | list[list[int]], label_names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of every class, by name."""
    cm = np.asarray(cm)
    p, r, f = _class_precision_recall_f1(cm)
    support = cm.sum(axis=1)
    return {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, name in enumerate(label_names)}


def _class_precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1; a class never predicted (or never present) scores 0, as scikit-learn's
    zero_division=0."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    actual = cm.sum(axis=1).astype(np.float64)
    p = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    r = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p, r, f


def _precision_recall_f1(cm: np.ndarray, average: str) -> tuple[float, float, float]:
    if average == "micro":
        p = r = np.trace(cm) / max(1.0, cm.sum())
        return float(p), float(r), float(p)
    p, r, f = _class_precision_recall_f1(cm)
    if average == "binary":
        return float(p[1]), float(r[1]), float(f[1])
    if average == "weighted":
        actual = cm.sum(axis=1).astype(np.float64)
        w = actual / max(1.0, actual.sum())
        return float((p * w).sum()), float((r * w).sum()), float((f * w).sum())
    return float(p.mean()), float(r.mean()), float(f.mean())


def _mcc(cm: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's multiclass form); 0 when undefined."""
    cm = cm.astype(np.float64)
    n = cm.sum()
    correct = np.trace(cm)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    cov = correct * n - predicted @ actual
    denom = np.sqrt((n**2 - predicted @ predicted) * (n**2 - actual @ actual))
    return float(cov / denom) if denom > 0 else 0.0


def roc_auc(scores: np.ndarray, ref: np.ndarray) -> float:
    """ROC-AUC: binary on the positive column; multiclass one-vs-rest, macro over classes present. NaN if undefined."""
    if scores.ndim == 1:
        scores = np.stack([1 - scores, scores], axis=1)
    if scores.shape[1] == 2:
        return _binary_auc(scores[:, 1], ref == 1)
    aucs = [_binary_auc(scores[:, c], ref == c) for c in range(scores.shape[1]) if 0 < (ref == c).sum() < len(ref)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _binary_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """AUC as the Mann-Whitney U statistic with average ranks for ties."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # Average rank (1-based) over each run of tied scores.
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for s, c in zip(start, counts, strict=True):
        ranks[order[s:s + c]] = s + (c + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
