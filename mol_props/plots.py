"""Figures for a training run, saved as PNG into the run's plots/ folder (and logged to MLflow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: list[dict[str, float]], metric: str, path: Path) -> Path:
    """Train/val loss and the monitored validation metric per epoch."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], label="train")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], label="val")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axis.legend()
    metric_axis.plot(epochs, [row.get(f"val_{metric}", np.nan) for row in history], color="C2")
    metric_axis.set(xlabel="epoch", ylabel=metric, title=f"Validation {metric}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="mergesort")
    hits = labels[order] == 1
    true_positive_rate = np.concatenate([[0], np.cumsum(hits) / max(hits.sum(), 1)])
    false_positive_rate = np.concatenate([[0], np.cumsum(~hits) / max((~hits).sum(), 1)])
    return false_positive_rate, true_positive_rate


def classification_figures(
    labels: np.ndarray, probabilities: np.ndarray, name: str, directory: Path
) -> list[Path]:
    """ROC, precision-recall and calibration (reliability) plots for one target."""
    plt = _pyplot()
    paths = []
    false_positive_rate, true_positive_rate = _roc_points(labels, probabilities)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(false_positive_rate, true_positive_rate)
    axis.plot([0, 1], [0, 1], "--", color="grey")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({name})")
    paths.append(directory / "roc.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    order = np.argsort(-probabilities, kind="mergesort")
    hits = labels[order] == 1
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    recall = np.cumsum(hits) / max(hits.sum(), 1)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(recall, precision)
    axis.axhline(labels.mean(), linestyle="--", color="grey", label="base rate")
    axis.set(xlabel="recall", ylabel="precision", title=f"Precision-recall ({name})")
    axis.legend()
    paths.append(directory / "pr.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    bins = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(probabilities, bins) - 1, 0, 9)
    filled = [i for i in range(10) if np.any(which == i)]
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot(
        [probabilities[which == i].mean() for i in filled],
        [labels[which == i].mean() for i in filled],
        "o-",
        label="model",
    )
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    axis.set(
        xlabel="predicted probability", ylabel="observed fraction", title=f"Calibration ({name})"
    )
    axis.legend()
    paths.append(directory / "calibration.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def regression_figures(
    values: np.ndarray, predictions: np.ndarray, name: str, directory: Path
) -> list[Path]:
    """Parity (predicted vs measured) and residual plots for one target."""
    plt = _pyplot()
    low, high = float(min(values.min(), predictions.min())), float(
        max(values.max(), predictions.max())
    )
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(values, predictions, s=8, alpha=0.6)
    axis.plot([low, high], [low, high], "--", color="grey")
    axis.set(xlabel=f"measured {name}", ylabel=f"predicted {name}", title="Parity")
    parity = directory / "parity.png"
    figure.savefig(parity, dpi=120)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.scatter(predictions, predictions - values, s=8, alpha=0.6)
    axis.axhline(0, linestyle="--", color="grey")
    axis.set(
        xlabel=f"predicted {name}", ylabel="residual (predicted - measured)", title="Residuals"
    )
    residuals = directory / "residuals.png"
    figure.savefig(residuals, dpi=120)
    plt.close(figure)
    return [parity, residuals]
