"""Evaluation metrics in numpy (no torch, no sklearn): per target, ignoring missing labels."""

from __future__ import annotations

import math

import numpy as np

# The metric that picks the best epoch and stops early, and whether higher is better.
MONITORED = {"classification": ("roc_auc", True), "regression": ("rmse", False)}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) formula, ties averaged."""
    positives = labels == 1
    num_positive, num_negative = int(positives.sum()), int((~positives).sum())
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties so that equal scores count half.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average_ranks = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average_ranks, counts)
    rank_sum = ranks[positives].sum()
    return float(
        (rank_sum - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative)
    )


def _counts_by_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when everything scoring >= t is called positive, for each
    distinct score t from the highest down. Equal scores form one threshold, as in scikit-learn;
    stepping through tied molecules one by one would make curves and areas depend on their
    input order."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    # The last position of each run of equal scores: one threshold each.
    last = np.append(np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1)
    true_positives = np.cumsum(labels[order] == 1)[last]
    return true_positives, (last + 1) - true_positives


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1), one point per distinct
    score; NaN rates when a class is absent."""
    true_positives, false_positives = _counts_by_threshold(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        true_positive_rate = true_positives / true_positives[-1]
        false_positive_rate = false_positives / false_positives[-1]
    return np.append(0.0, false_positive_rate), np.append(0.0, true_positive_rate)


def precision_recall_curve(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall), one point per distinct score from the highest down (recall rising)."""
    true_positives, false_positives = _counts_by_threshold(labels, scores)
    precision = true_positives / (true_positives + false_positives)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = true_positives / true_positives[-1]
    return precision, recall


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision: sum over score thresholds of (recall gained) x precision."""
    if not np.any(labels == 1):
        return float("nan")
    precision, recall = precision_recall_curve(labels, scores)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    predicted = probabilities >= 0.5
    actual = labels == 1
    true_positive = float(np.sum(predicted & actual))
    true_negative = float(np.sum(~predicted & ~actual))
    false_positive = float(np.sum(predicted & ~actual))
    false_negative = float(np.sum(~predicted & actual))
    precision_denominator = true_positive + false_positive
    recall_denominator = true_positive + false_negative
    f1_denominator = 2 * true_positive + false_positive + false_negative
    # math.sqrt, not np.sqrt: a numpy scalar in the metrics cannot be read back from a checkpoint
    # that torch.load opens with weights_only=True (a two-target run failed at export).
    mcc_denominator = math.sqrt(
        precision_denominator
        * recall_denominator
        * (true_negative + false_positive)
        * (true_negative + false_negative)
    )
    return {
        "roc_auc": roc_auc(labels, probabilities),
        "pr_auc": average_precision(labels, probabilities),
        "accuracy": float(np.mean(predicted == actual)),
        "f1": 2 * true_positive / f1_denominator if f1_denominator else 0.0,
        "mcc": (
            (true_positive * true_negative - false_positive * false_negative) / mcc_denominator
            if mcc_denominator
            else 0.0
        ),
        "brier": float(np.mean((probabilities - labels) ** 2)),
    }


def regression_metrics(values: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    errors = predictions - values
    total = np.sum((values - values.mean()) ** 2)
    return {
        "rmse": float(np.sqrt(np.mean(errors**2))),
        "mae": float(np.mean(np.abs(errors))),
        "r2": float(1.0 - np.sum(errors**2) / total) if total > 0 else float("nan"),
    }


def evaluate(
    targets: np.ndarray, predictions: np.ndarray, task: str, target_names: list[str]
) -> dict[str, float]:
    """Metrics per target (`<name>/<metric>`) and their mean over targets (`<metric>`).

    targets, predictions: [M, T] in user units (probabilities or original values); NaN targets
    are skipped."""
    compute = classification_metrics if task == "classification" else regression_metrics
    per_target: list[dict[str, float]] = []
    results: dict[str, float] = {}
    for k, name in enumerate(target_names):
        present = ~np.isnan(targets[:, k])
        if not present.any():
            continue
        metrics = compute(targets[present, k], predictions[present, k])
        per_target.append(metrics)
        if len(target_names) > 1:
            results.update({f"{name}/{metric}": value for metric, value in metrics.items()})
    for metric in per_target[0] if per_target else []:
        values = np.array([metrics[metric] for metrics in per_target])
        defined = values[~np.isnan(values)]  # ROC-AUC is NaN for a target with one class
        results[metric] = float(defined.mean()) if defined.size else float("nan")
    return results
