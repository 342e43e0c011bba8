"""Tree ensembles on this project's own features, on the fixed B3DB benchmark splits: a yardstick
for the GNN, which sees the same molecules through the same featurizer.

    uv run python benchmarks/classical_baselines.py                # classification, seeds 0 1 2
    uv run python benchmarks/classical_baselines.py --task=regression
    uv run python benchmarks/classical_baselines.py --seeds='[0]' --fingerprint_size=2048

Every molecule of the split's table goes through `mol_props.featurize.Featurizer` (configs/
defaults, Morgan counts on with `--fingerprint_size`), and three feature sets are built from what
it returns:
- `descriptors`: the molecule-level descriptor vector the GNN's descriptor MLP reads;
- `+ atom counts`: plus each atom one-hot slot summed over the molecule (how many aromatic
  carbons, sp3 nitrogens, ...), which a model could compute from its own inputs;
- `+ atom counts + Morgan`: plus the Morgan counts the fingerprint member reads.
On each, scikit-learn's random forest (500 trees) and histogram gradient boosting (learning rate
0.03, 300 rounds) are fitted on `train`, once per seed, with nothing tuned; the script prints
`val` and `test` (ROC-AUC for classification, RMSE for regression) as mean ± std over the seeds.
The GNN's own figures, from `benchmarks/train_quality.py`, are in the README.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable

import fire
import numpy as np
from train_quality import REPO_ROOT, SPLITS, benchmark_table, mean_std

from mol_props.commands import reported_errors
from mol_props.config import compose_config
from mol_props.featurize import MoleculeGraph, featurize_parallel
from mol_props.forest import molecule_features_numpy
from mol_props.metrics import regression_metrics, roc_auc

METRIC = {"classification": "ROC-AUC", "regression": "RMSE"}
FOREST_TREES = 500
BOOSTING_RATE = 0.03
BOOSTING_ROUNDS = 300
SPLITS_ORDER = ("train", "val", "test")


def read_split(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """SMILES, labels [M] float and split names [M] of a benchmark table."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    smiles = [row["smiles"] for row in rows]
    labels = np.array([float(row["label"]) for row in rows])
    splits = np.array([row["split"] for row in rows])
    return smiles, labels, splits


def feature_sets(graphs: list[MoleculeGraph], descriptor_count: int) -> dict[str, np.ndarray]:
    """The three feature matrices [M, *] described in the module docstring."""
    # The forest member's own features: what blend_cv.py validates is what `mol_props train` fits.
    counted = molecule_features_numpy(
        [graph.atom_features for graph in graphs],
        [graph.descriptors for graph in graphs],
        descriptor_count,
    )  # [M, D' + F - 1]
    morgan = np.stack([graph.descriptors[descriptor_count:] for graph in graphs])
    return {
        "descriptors": counted[:, :descriptor_count],
        "+ atom counts": counted,
        "+ atom counts + Morgan": np.hstack([counted, morgan]),
    }


def model_factories(task: str) -> dict[str, Callable[[int], object]]:
    """Model name -> a function of the seed that returns an unfitted scikit-learn model."""
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )

    forest = RandomForestClassifier if task == "classification" else RandomForestRegressor
    boosting = (
        HistGradientBoostingClassifier
        if task == "classification"
        else HistGradientBoostingRegressor
    )
    return {
        "random forest": lambda seed: forest(FOREST_TREES, n_jobs=-1, random_state=seed),
        "gradient boosting": lambda seed: boosting(
            learning_rate=BOOSTING_RATE,
            max_iter=BOOSTING_ROUNDS,
            early_stopping=False,
            random_state=seed,
        ),
    }


def predict(model, features: np.ndarray, task: str) -> np.ndarray:
    """[M] probability of the positive class, or the predicted value."""
    if task == "classification":
        return model.predict_proba(features)[:, 1]
    return model.predict(features)


def score(task: str, labels: np.ndarray, predictions: np.ndarray) -> float:
    if task == "classification":
        return roc_auc(labels, predictions)
    return regression_metrics(labels, predictions)["rmse"]


def main(
    task: str = "classification",
    seeds: tuple[int, ...] = (0, 1, 2),
    fingerprint_size: int = 1024,
    benchmark_dir: str = str(REPO_ROOT.parent / "shared" / "benchmark"),
) -> None:
    """Fit each model on each feature set for each seed; print val and test scores."""
    if task not in SPLITS:
        raise SystemExit(f"error: --task={task!r}: choose one of {sorted(SPLITS)}")
    if fingerprint_size < 1:
        raise SystemExit(f"error: --fingerprint_size={fingerprint_size}: must be at least 1")
    table = benchmark_table(task, benchmark_dir)
    smiles, labels, splits = read_split(table)
    preprocess = compose_config([f"preprocess.fingerprint.size={fingerprint_size}"]).preprocess
    results = featurize_parallel(smiles, preprocess, num_workers=0, progress=False)
    featurized = np.array([isinstance(result, MoleculeGraph) for result in results])  # [M]
    graphs = [result for result in results if isinstance(result, MoleculeGraph)]
    labels, splits = labels[featurized], splits[featurized]
    sizes = " / ".join(str(int(np.sum(splits == part))) for part in SPLITS_ORDER)
    print(
        f"{table.name}: {len(graphs):,} of {len(smiles):,} molecules featurized; "
        f"train / val / test {sizes}"
    )
    train = splits == "train"
    metric = METRIC[task]
    for feature_name, features in feature_sets(graphs, len(preprocess.descriptors)).items():
        for model_name, make_model in model_factories(task).items():
            scores: dict[str, list[float]] = {"val": [], "test": []}
            started = time.perf_counter()
            for seed in seeds:
                model = make_model(seed).fit(features[train], labels[train])
                predictions = predict(model, features, task)
                for part, values in scores.items():
                    held = splits == part
                    values.append(score(task, labels[held], predictions[held]))
            seconds = (time.perf_counter() - started) / len(seeds)
            print(
                f"{model_name:17s} on {feature_name:22s} ({features.shape[1]:4d} columns): "
                f"val {metric} {mean_std(scores['val'])}, test {mean_std(scores['test'])} "
                f"({seconds:.0f} s per fit)",
                flush=True,
            )


if __name__ == "__main__":
    with reported_errors():
        fire.Fire(main)
