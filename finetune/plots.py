"""Plots written to the run directory: training curves, the confusion matrix, misclassified images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serve.bundle.folders import replace_file


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(entries: Sequence[dict[str, Any]], metric: str | None, path: str | Path) -> None:
    """`curves.png`: train and eval loss against the optimizer step, and `metric` on the eval split."""
    plt = _pyplot()
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in entries:
        for key in ("train_loss", "eval_loss", metric):
            if key and isinstance(entry.get(key), (int, float)):
                steps, values = series.setdefault(key, ([], []))
                steps.append(entry["step"])
                values.append(entry[key])
    show_metric = bool(metric and metric in series and metric != "eval_loss")
    fig, axes = plt.subplots(1, 2 if show_metric else 1, figsize=(11 if show_metric else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
        if key in series:
            ax.plot(*series[key], style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if show_metric:
        ax = axes[0][1]
        ax.plot(*series[metric], "o-", color="tab:green")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: str | Path) -> None:
    """`confusion_matrix.png`: counts with true labels on rows and predictions on columns."""
    plt = _pyplot()
    cm = np.asarray(matrix)
    size = max(4.0, 0.6 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ticks = range(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=45, ha="right")
    ax.set_yticks(ticks, label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_misclassified(pixels: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                       label_names: Sequence[str], path: str | Path, *, max_images: int = 25) -> None:
    """`misclassified.png`: a grid of up to `max_images` wrongly classified images (uint8 [N, C, H, W]), each titled
    with its true and predicted label."""
    plt = _pyplot()
    wrong = np.flatnonzero(labels != predictions)[:max_images]
    cols = max(1, min(5, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        image = pixels[i].transpose(1, 2, 0)  # [C, H, W] -> [H, W, C] for imshow
        ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {label_names[labels[i]]}\npred {label_names[predictions[i]]}", fontsize=8)
    if not len(wrong):
        axes[0][0].text(0.5, 0.5, f"all {len(labels)} eval images\nclassified correctly", ha="center", va="center")
    total = int((labels != predictions).sum())
    fig.suptitle(f"misclassified: {total} of {len(labels)} (first {len(wrong)} shown)" if total else "", fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(f".tmp-{Path(path).name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    replace_file(tmp, Path(path))
