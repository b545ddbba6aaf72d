"""The task-metric gate: a compressed variant keeps its place in a bundle only if it loses at most
`max_relative_drop` of its reference's metric on the eval split, scored by the project's own metrics.

relative drop = (reference - value) / |reference| for metrics where higher is better (accuracy, f1...), and
(value - reference) / |reference| where lower is better (loss, mae, perplexity); a NaN metric fails.
Alongside it, int8 graphs pass a numeric sanity check against the fp32 graph on the parity samples
(`GateConfig.int8_parity`): looser than the export gate, since int8 rounding moves logits by ~0.1-0.6 on a
MiniLM classifier, but enough to refuse a broken graph before it is scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compress.errors import ExportError
from compress.parity import ParityConfig

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "precision": True, "recall": True, "mcc": True, "roc_auc": True,
                    "r2": True, "pearson": True, "eval_loss": False, "mse": False, "mae": False, "perplexity": False}


@dataclass
class GateConfig:
    """How much a compressed variant may lose, on which metric, and the int8 numeric sanity tolerances."""

    metric: str | None = None  # None: the task's own (accuracy; mae for regression; perplexity for causal LMs)
    max_relative_drop: float = 0.01  # 0.01: at most 1% of the reference's metric (0.87 points at 87% accuracy)
    # int8 vs the fp32 graph on the parity samples: |int8 - fp32| <= atol + rtol |fp32| everywhere, and this share
    # of all compared positions with the same top-1 (flips where fp32's own top two lie within that tolerance are
    # near-ties). The parity cases hold few positions (8 for a classifier): 0.75 lets two flips of a genuine near-tie
    # through and refuses a graph that has lost its way; the metric gate judges accuracy.
    int8_atol: float = 1.0
    int8_rtol: float = 0.2
    int8_min_top1_agreement: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_relative_drop < 1.0:
            raise ValueError(f"max_relative_drop must be in [0, 1), got {self.max_relative_drop}")
        if self.metric is not None and self.metric not in HIGHER_IS_BETTER:
            raise ValueError(f"unknown gate metric {self.metric!r}; metrics: {', '.join(HIGHER_IS_BETTER)}")

    def int8_parity(self, base: ParityConfig) -> ParityConfig:
        """The sanity check's parity config: these tolerances on `base`'s batch sizes and samples."""
        return ParityConfig(atol=self.int8_atol, rtol=self.int8_rtol, min_top1_agreement=self.int8_min_top1_agreement,
                            batch_sizes=base.batch_sizes, num_samples=base.num_samples)

    def resolve_metric(self, task_default: tuple[str, bool]) -> tuple[str, bool]:
        """(metric name, higher is better): the configured metric, else the task's."""
        if self.metric is None:
            return task_default
        return self.metric, HIGHER_IS_BETTER[self.metric]


def metric_verdict(metrics: dict[str, Any] | None, reference_metrics: dict[str, Any] | None, *, metric: str,
                   higher_is_better: bool, max_relative_drop: float, reference: str) -> dict[str, Any]:
    """The manifest's `metric_gate` record: did `metrics` keep `metric` within `max_relative_drop` of the
    reference variant's?"""
    if not metrics or not reference_metrics or metric not in metrics or metric not in reference_metrics:
        raise ExportError(f"the metric gate needs {metric!r} for the variant and its reference {reference!r}; the "
                          "run has no readable eval split, the export stage has `evaluate: false`, or the metric is "
                          "not one the task computes")
    value, ref = float(metrics[metric]), float(reference_metrics[metric])
    loss = (ref - value) if higher_is_better else (value - ref)
    drop = loss / abs(ref) if ref != 0 else loss
    passed = math.isfinite(drop) and drop <= max_relative_drop
    return {"metric": metric, "higher_is_better": higher_is_better, "reference": reference, "reference_value": ref,
            "value": value, "relative_drop": drop, "max_relative_drop": max_relative_drop, "passed": passed}
