"""The numpy metrics against scikit-learn's (installed with MLflow), ties and missing labels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as reference

from mol_props.metrics import (
    classification_metrics,
    evaluate,
    precision_recall_curve,
    regression_metrics,
    roc_curve,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_scikit_learn(seed: int):
    generator = np.random.default_rng(seed)
    labels = generator.integers(0, 2, size=200).astype(np.float64)
    # Rounded scores: many ties, which ROC-AUC must count as half.
    probabilities = np.round(np.clip(0.3 * labels + generator.random(200) * 0.7, 0, 1), 1)
    ours = classification_metrics(labels, probabilities)
    predicted = probabilities >= 0.5
    assert ours["roc_auc"] == pytest.approx(reference.roc_auc_score(labels, probabilities))
    assert ours["pr_auc"] == pytest.approx(
        reference.average_precision_score(labels, probabilities)
    )
    assert ours["accuracy"] == pytest.approx(reference.accuracy_score(labels, predicted))
    assert ours["f1"] == pytest.approx(reference.f1_score(labels, predicted))
    assert ours["mcc"] == pytest.approx(reference.matthews_corrcoef(labels, predicted))
    assert ours["brier"] == pytest.approx(reference.brier_score_loss(labels, probabilities))


def test_regression_metrics_match_scikit_learn():
    generator = np.random.default_rng(3)
    values = generator.normal(size=100)
    predictions = values + generator.normal(scale=0.5, size=100)
    ours = regression_metrics(values, predictions)
    assert ours["rmse"] == pytest.approx(
        np.sqrt(reference.mean_squared_error(values, predictions))
    )
    assert ours["mae"] == pytest.approx(reference.mean_absolute_error(values, predictions))
    assert ours["r2"] == pytest.approx(reference.r2_score(values, predictions))


def test_evaluate_skips_missing_labels_and_averages_defined_targets_quietly():
    nan = np.nan
    # Target "a": both classes, one label missing. Target "b": one class only (no ROC-AUC).
    targets = np.array([[1.0, 0.0], [0.0, 0.0], [nan, 0.0], [1.0, nan]])
    predictions = np.array([[0.9, 0.2], [0.2, 0.4], [0.7, 0.1], [0.4, 0.3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty-slice mean would warn here
        results = evaluate(targets, predictions, "classification", ["a", "b"])
    assert results["a/roc_auc"] == pytest.approx(1.0)
    assert np.isnan(results["b/roc_auc"])
    assert results["roc_auc"] == pytest.approx(1.0)  # the mean of the defined ones
    assert results["a/accuracy"] == pytest.approx(2 / 3)  # the missing label is not counted
    only_one_class = evaluate(targets[:, 1:], predictions[:, 1:], "classification", ["b"])
    assert np.isnan(only_one_class["roc_auc"])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_metric_is_a_python_float(task: str):
    # A numpy scalar among the metrics saved in a checkpoint made torch.load(weights_only=True)
    # refuse the file: a two-target classification run trained, then failed to export.
    targets = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    predictions = np.array([[0.9, 0.2], [0.2, 0.4], [0.7, 0.8], [0.4, 0.3]])
    for names in (["a"], ["a", "b"]):
        width = len(names)
        results = evaluate(targets[:, :width], predictions[:, :width], task, names)
        assert {name: type(value) for name, value in results.items()} == {
            name: float for name in results
        }


def test_curves_merge_ties_like_scikit_learn():
    generator = np.random.default_rng(4)
    labels = generator.integers(0, 2, size=300).astype(np.float64)
    scores = np.round(generator.random(300), 1)  # ~10 distinct scores: ties everywhere
    false_positive_rate, true_positive_rate = roc_curve(labels, scores)
    expected_fpr, expected_tpr, _ = reference.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(false_positive_rate, expected_fpr)
    np.testing.assert_allclose(true_positive_rate, expected_tpr)
    precision, recall = precision_recall_curve(labels, scores)
    # scikit-learn lists thresholds from the lowest and ends at (recall 0, precision 1).
    expected_precision, expected_recall, _ = reference.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, expected_precision[::-1][1:])
    np.testing.assert_allclose(recall, expected_recall[::-1][1:])
    assert len(precision) == len(np.unique(scores))
    # The same molecules in another order give the same curve.
    order = generator.permutation(300)
    np.testing.assert_allclose(
        roc_curve(labels[order], scores[order]), (false_positive_rate, true_positive_rate)
    )
