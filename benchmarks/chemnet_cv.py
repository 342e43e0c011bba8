"""Scaffold cross-validation of the ChemNet member (`model=dense_gnn_chemnet`) on the benchmark's
train + val rows: blend_cv.py's folds and out-of-fold network predictions, the served forest
refitted on each fold's other folds, and one ChemNet SVM per read-out, C and calibration (the
Platt scaling's folds, 0 = none). Test is not read.

    uv run python benchmarks/chemnet_cv.py          # seeds 0 1; read-outs max, last; C 1, 2
    uv run python benchmarks/chemnet_cv.py --seeds='[0]' --readouts='[max]' --c_values='[1,2,4]'
    uv run python benchmarks/chemnet_cv.py --readouts='[max]' --c_values='[2]'  # Platt or not

The network's out-of-fold predictions are read from `--gnn_cache` (data/cache/blend_cv, where
`benchmarks/blend_cv.py --gnn_cache=data/cache/blend_cv` saves them); a seed without them trains
its 5 fold networks first, as blend_cv.py does (~10 minutes a seed here). ChemNet's features are
computed once per read-out for all molecules (~15 s); each fold then fits the SVM as `mol_props
train` does (mol_props.chemnet.fit_svm_on_features) on the other folds.

For each seed it prints pooled out-of-fold ROC-AUC / ROC-AUC on the lone-scaffold molecules (the
~355 whose scaffold is theirs alone among the 7,024, as every molecule of test is), and the pooled
Brier score: first the default model (network and forest in the default's shares), then per
read-out, C and calibration the SVM alone and the default averaged with it at each share. Each
lone-scaffold figure comes with its difference from the default model's and that difference's
paired bootstrap standard error (the same resampled molecules for both). A difference within two
of those is noise; and since every seed scores the same few hundred molecules, agreeing seeds do
not shrink it.
"""

from __future__ import annotations

import csv
import itertools
import shutil
import tempfile
from pathlib import Path

import fire
import numpy as np
import torch
from blend_cv import cache_path, cross_validate, forest_factory, masked_auc
from train_quality import REPO_ROOT, benchmark_table

from mol_props.chemnet import (
    READOUTS,
    Calibration,
    ChemNetEncoder,
    chemnet_features,
    fit_svm_on_features,
)
from mol_props.commands import reported_errors
from mol_props.config import compose_config
from mol_props.featurize import Featurizer, MoleculeGraph, featurize_parallel
from mol_props.metrics import roc_auc

SMILES_TOKENS = 350  # ChemNet's own length, as the preset sets it


def chemnet_token_table(smiles: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[M, 350] token ids as the featurizer puts them among the descriptors, [M] whether the
    molecule could be featurized (the rows of those that could not stay zeros, never used), and
    [M] scaffolds (the Platt scaling's folds keep them whole, as in `mol_props train`)."""
    preprocess = compose_config([f"preprocess.smiles_tokens={SMILES_TOKENS}"]).preprocess
    columns = Featurizer(preprocess).smiles_token_columns
    results = featurize_parallel(smiles, preprocess, num_workers=0, progress=False, with_keys=True)
    featurized = np.array([isinstance(result, MoleculeGraph) for result in results])
    token_ids = np.zeros((len(smiles), SMILES_TOKENS), dtype=np.float32)
    scaffolds = np.full(len(smiles), "", dtype=object)
    for i in np.flatnonzero(featurized):
        token_ids[i] = results[i].descriptors[columns]
        scaffolds[i] = results[i].scaffold
    return token_ids, featurized, scaffolds


def member_predictions(
    features: np.ndarray,
    encoder: ChemNetEncoder,
    labels: np.ndarray,
    assignment: np.ndarray,
    featurized: np.ndarray,
    svm_c: float,
    scaffolds: np.ndarray,
    calibration_folds: int,
) -> np.ndarray:
    """[M] out-of-fold probabilities of the ChemNet SVM (NaN where unfeaturizable); with
    `calibration_folds`, Platt-scaled over that many folds of each fitting part's scaffolds."""
    predictions = np.full(len(labels), np.nan)
    for fold in np.unique(assignment):
        fit = (assignment != fold) & featurized
        held = (assignment == fold) & featurized
        calibration = Calibration(calibration_folds, scaffolds[fit]) if calibration_folds else None
        member = fit_svm_on_features(
            encoder, features[fit], labels[fit, None], 0, svm_c, calibration
        )
        with torch.no_grad():
            held_features = torch.from_numpy(features[held].astype(np.float32))
            predictions[held] = member.classify(held_features).numpy()[:, 0]
    return predictions


def bootstrap_difference(
    labels: np.ndarray, baseline: np.ndarray, candidate: np.ndarray, resamples: int, seed: int
) -> tuple[float, float]:
    """ROC-AUC of `candidate` minus `baseline` on these molecules, and the standard error of that
    difference over `resamples` resamplings of the molecules (the same ones for both)."""
    difference = roc_auc(labels, candidate) - roc_auc(labels, baseline)
    generator = np.random.default_rng(seed)
    resampled = []
    for _ in range(resamples):
        pick = generator.integers(0, len(labels), len(labels))  # [N] with replacement
        if labels[pick].min() == labels[pick].max():
            continue  # one class only: no ROC-AUC
        resampled.append(
            roc_auc(labels[pick], candidate[pick]) - roc_auc(labels[pick], baseline[pick])
        )
    return difference, float(np.std(resampled))


def figures(
    labels: np.ndarray,
    scored: np.ndarray,
    default: np.ndarray,
    predictions: np.ndarray,
    resamples: int,
    seed: int,
) -> str:
    """ "pooled / lone scaffolds (difference from the default ± its standard error), Brier
    (pooled)"; `scored` marks the lone-scaffold molecules the default model scores."""
    difference, error = bootstrap_difference(
        labels[scored], default[scored], predictions[scored], resamples, seed
    )
    return (
        f"{masked_auc(labels, predictions):.4f} / "
        f"{masked_auc(labels[scored], predictions[scored]):.4f} "
        f"({difference:+.4f} ± {error:.4f}), Brier {masked_brier(labels, predictions):.4f}"
    )


def masked_brier(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Brier score over the molecules with a prediction (NaN: unfeaturizable)."""
    present = ~np.isnan(probabilities)
    return float(np.mean((probabilities[present] - labels[present]) ** 2))


def main(
    seeds: tuple[int, ...] = (0, 1),
    folds: int = 5,
    readouts: tuple[str, ...] = READOUTS,
    c_values: tuple[float, ...] = (1.0, 2.0),
    shares: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8),
    calibrations: tuple[int, ...] = (0, 5),
    resamples: int = 1000,
    gnn_cache: str = "data/cache/blend_cv",
    benchmark_dir: str = str(REPO_ROOT.parent / "shared" / "benchmark"),
) -> None:
    """Cross-validate the ChemNet SVM per read-out, C and calibration (Platt scaling folds, 0 =
    none), alone and averaged with the default model at each share; print ROC-AUCs and Brier
    scores (see the module doc)."""
    if unknown := [readout for readout in readouts if readout not in READOUTS]:
        raise SystemExit(f"error: --readouts: {unknown} not among {list(READOUTS)}")
    if not all(value > 0 for value in c_values):
        raise SystemExit(f"error: --c_values={list(c_values)}: each must be positive")
    if not all(0.0 < share <= 1.0 for share in shares):
        raise SystemExit(f"error: --shares={list(shares)}: each must lie in (0, 1]")
    if not all(value == 0 or value >= 2 for value in calibrations):
        raise SystemExit(f"error: --calibrations={list(calibrations)}: each 0 (none) or >= 2")
    if resamples < 10:
        raise SystemExit(f"error: --resamples={resamples}: must be at least 10")
    model = compose_config([]).model
    network_share = 1.0 - model.forest_weight
    table = benchmark_table("classification", benchmark_dir)
    with table.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] in ("train", "val")]
    labels = np.array([float(row["label"]) for row in rows])
    token_ids, featurized, scaffolds = chemnet_token_table([row["smiles"] for row in rows])
    features = {}
    for readout in readouts:
        encoder = ChemNetEncoder.pretrained(SMILES_TOKENS, readout)
        features[readout] = (encoder, chemnet_features(encoder, token_ids))  # [M, 512]
    print(
        f"{table.name}: {len(rows):,} train + val molecules in {folds} scaffold folds; default "
        f"model: network {network_share:.2f}, forest {model.forest_weight:.2f}"
    )
    served_forest = {"served": forest_factory(model.forest_trees, model.forest_depth, model)}
    for seed in seeds:
        cache = cache_path(gnn_cache, seed, folds, [])
        cached = np.load(cache) if cache is not None and cache.is_file() else None
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            shutil.copytree(REPO_ROOT / "triton_repo", work / "triton_repo")
            gnn, forest, assignment, lone = cross_validate(
                rows, seed, folds, [], served_forest, work, cached
            )
        if cache is not None and cached is None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, gnn)
        default = network_share * gnn + (1 - network_share) * forest["served"]
        scored = lone & ~np.isnan(default)
        print(
            f"seed {seed}: default model {masked_auc(labels, default):.4f} / "
            f"{masked_auc(labels[scored], default[scored]):.4f} (lone scaffolds: {scored.sum()})"
            f", Brier {masked_brier(labels, default):.4f}"
        )
        for readout, (encoder, readout_features) in features.items():
            for svm_c, calibration_folds in itertools.product(c_values, calibrations):
                member = member_predictions(
                    readout_features,
                    encoder,
                    labels,
                    assignment,
                    featurized,
                    svm_c,
                    scaffolds,
                    calibration_folds,
                )
                line = figures(labels, scored, default, member, resamples, seed)
                scaling = f"Platt {calibration_folds} folds" if calibration_folds else "no Platt"
                print(f"seed {seed}, {readout} read-out, C {svm_c:g}, {scaling}: alone {line}")
                for share in shares:
                    averaged = (1 - share) * default + share * member  # [M]
                    line = figures(labels, scored, default, averaged, resamples, seed)
                    print(f"    at share {share:.2f}: {line}", flush=True)


if __name__ == "__main__":
    with reported_errors():
        fire.Fire(main)
