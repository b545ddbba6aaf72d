"""This project's metrics as `evaluate` modules (offline; `evaluate.load("accuracy")` fetches from the hub).

Imported by `finetune.metrics.load_metric` only: importing `evaluate` is slow, and the recipes do not need it.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from finetune.metrics import Average, classification_metrics, regression_metrics

_CITATION = "tuneforge project metrics (numpy implementations, checked against scikit-learn)"


class ClassificationMetrics(evaluate.Metric):
    """Accuracy, precision, recall, F1, MCC, ROC-AUC (when scores are given) and the confusion matrix."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Single-label classification metrics.",
            citation=_CITATION,
            inputs_description="predictions: class ids; references: class ids; prediction_scores (optional, "
                               "[n, num_labels] probabilities) for ROC-AUC; num_labels; "
                               "average: binary|macro|micro|weighted.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int], num_labels: int | None = None,
                 prediction_scores: Any = None, average: Average = "auto") -> dict[str, Any]:
        return classification_metrics(predictions, references, num_labels, prediction_scores, average)


class RegressionMetrics(evaluate.Metric):
    """Mean squared error, mean absolute error, R^2 and Pearson's r."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Regression metrics.",
            citation=_CITATION,
            inputs_description="predictions and references: floats.",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions: list[float], references: list[float]) -> dict[str, float]:
        return regression_metrics(predictions, references)


PROJECT_METRICS = {"classification": ClassificationMetrics, "regression": RegressionMetrics}
