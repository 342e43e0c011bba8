"""Figures for a training run, saved as PNG into the run's plots/ folder (and logged to MLflow)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mol_props import metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def target_folders(target_names: list[str]) -> list[str]:
    """A folder name per target: its name with anything but letters, digits, '.', '_' and '-'
    made '_' ("half-life (h)" -> "half-life_h"), `target_<k>` when nothing is left, and `_<k>`
    appended while an earlier target has the folder ("a b" and "a_b")."""
    folders: list[str] = []
    for k, name in enumerate(target_names):
        folder = re.sub(r"[^\w.-]+", "_", name).strip("._") or f"target_{k}"
        while folder in folders:
            folder = f"{folder}_{k}"
        folders.append(folder)
    return folders


def learning_curves(
    history: list[dict[str, float]],
    metric: str,
    path: Path,
    refit_history: list[dict[str, float]] | None = None,
) -> Path:
    """Train/val loss and the monitored validation metric per epoch; with `refit_history`, the
    refit's training loss (train + val, no validation of its own) beside them."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    # Markers: a run of one epoch is a point, which a bare line would not draw.
    loss_axis.plot(epochs, [row["train_loss"] for row in history], ".-", label="train")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], ".-", label="val")
    if refit_history:
        refit_epochs = [row["epoch"] for row in refit_history]
        refit_losses = [row["train_loss"] for row in refit_history]
        loss_axis.plot(refit_epochs, refit_losses, ".--", label="refit (train + val)")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_axis.legend()
    values = [row.get(f"val_{metric}", np.nan) for row in history]
    metric_axis.plot(epochs, values, ".-", color="C2")
    metric_axis.set(xlabel="epoch", ylabel=metric, title=f"Validation {metric}")
    for axis in (loss_axis, metric_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # no epoch 1.2
        axis.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def classification_figures(
    labels: np.ndarray, probabilities: np.ndarray, name: str, directory: Path
) -> list[Path]:
    """ROC, precision-recall and calibration (reliability) plots for one target.

    The curves are the ones the metrics integrate (ties merged into one threshold), so the areas
    in the legends are the logged ROC-AUC and PR-AUC."""
    plt = _pyplot()
    paths = []
    false_positive_rate, true_positive_rate = metrics.roc_curve(labels, probabilities)
    figure, axis = plt.subplots(figsize=(5, 5))
    auc = metrics.roc_auc(labels, probabilities)
    axis.plot(false_positive_rate, true_positive_rate, label=f"model (AUC = {auc:.3f})")
    axis.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({name})")
    axis.legend(loc="lower right")
    paths.append(directory / "roc.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    precision, recall = metrics.precision_recall_curve(labels, probabilities)
    figure, axis = plt.subplots(figsize=(5, 5))
    average_precision = metrics.average_precision(labels, probabilities)
    # Precision holds until recall rises at the next threshold: steps, as the area counts it.
    axis.step(
        np.append(0.0, recall),
        np.append(precision[:1], precision),
        where="pre",
        label=f"model (AP = {average_precision:.3f})",
    )
    axis.axhline(labels.mean(), linestyle="--", color="grey", label="base rate")
    axis.set(xlabel="recall", ylabel="precision", title=f"Precision-recall ({name})")
    axis.legend(loc="lower left")
    paths.append(directory / "pr.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    paths.append(_calibration_figure(labels, probabilities, name, directory / "calibration.png"))
    return paths


def _calibration_figure(
    labels: np.ndarray, probabilities: np.ndarray, name: str, path: Path
) -> Path:
    """Observed fraction of positives per tenth of predicted probability, above how many
    molecules each tenth holds (a point made of three molecules says little)."""
    plt = _pyplot()
    bins = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(probabilities, bins) - 1, 0, 9)
    filled = [i for i in range(10) if np.any(which == i)]
    figure, (curve_axis, count_axis) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    curve_axis.plot(
        [probabilities[which == i].mean() for i in filled],
        [labels[which == i].mean() for i in filled],
        "o-",
        label=f"model (Brier = {np.mean((probabilities - labels) ** 2):.3f})",
    )
    curve_axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect")
    curve_axis.set(ylabel="observed fraction of positives", title=f"Calibration ({name})")
    curve_axis.legend(loc="upper left")
    count_axis.hist(probabilities, bins=bins, color="C0", alpha=0.6)
    count_axis.set(xlabel="predicted probability", ylabel="molecules")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


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
