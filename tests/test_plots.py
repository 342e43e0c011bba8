"""mol_props.plots: figures are written where a user looks for them, one folder per target."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mol_props.plots import target_folders
from mol_props.train import evaluation_figures


def test_target_folders_are_safe_distinct_names():
    names = ["logBB", "half-life (h)", "a b", "a_b", "..", "target_1", "target_1"]
    assert target_folders(names) == [
        "logBB",
        "half-life_h",
        "a_b",
        "a_b_3",
        "target_4",
        "target_1",
        "target_1_6",
    ]


def test_each_target_gets_its_figures_in_a_folder_named_after_it(tmp_path: Path):
    generator = np.random.default_rng(0)
    values = generator.normal(size=(40, 2))
    values[::5, 1] = np.nan  # a target with missing labels: plotted on the labelled rows
    predictions = values + generator.normal(scale=0.3, size=values.shape)
    paths = evaluation_figures(values, predictions, "regression", ["logBB", "t½ (h)"], tmp_path)
    assert sorted(path.relative_to(tmp_path).as_posix() for path in paths) == [
        "logBB/parity.png",
        "logBB/residuals.png",
        "t½_h/parity.png",
        "t½_h/residuals.png",
    ]
    assert all(path.stat().st_size > 0 for path in paths)


def test_a_target_without_test_labels_gets_no_figures_and_the_others_still_do(tmp_path: Path):
    values = np.array([[-1.2, np.nan], [0.3, np.nan], [0.8, np.nan], [-0.4, np.nan]])
    predictions = np.array([[-1.0, 0.9], [0.1, 0.2], [0.7, 0.8], [-0.2, 0.1]])
    paths = evaluation_figures(values, predictions, "regression", ["logBB", "bbb"], tmp_path)
    assert sorted(path.relative_to(tmp_path).as_posix() for path in paths) == [
        "logBB/parity.png",
        "logBB/residuals.png",
    ]


def test_one_target_writes_into_the_run_folder(tmp_path: Path):
    labels = np.array([[0.0], [1.0], [1.0], [0.0], [1.0]])
    probabilities = np.array([[0.2], [0.9], [0.6], [0.4], [0.7]])
    paths = evaluation_figures(labels, probabilities, "classification", ["BBB+"], tmp_path)
    assert sorted(path.name for path in paths) == ["calibration.png", "pr.png", "roc.png"]
    assert {path.parent for path in paths} == {tmp_path}


def test_learning_curves_draw_the_refit_loss_beside_the_selection(tmp_path: Path):
    from matplotlib import image

    from mol_props.plots import learning_curves

    history = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_roc_auc": 0.7},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.55, "val_roc_auc": 0.8},
    ]
    refit = [{"epoch": 1, "train_loss": 0.65}]
    alone = learning_curves(history, "roc_auc", tmp_path / "alone.png")
    with_refit = learning_curves(history, "roc_auc", tmp_path / "refit.png", refit)
    # Same size, different pixels: the refit's line and its legend entry are drawn.
    assert image.imread(alone).shape == image.imread(with_refit).shape
    assert not np.array_equal(image.imread(alone), image.imread(with_refit))
