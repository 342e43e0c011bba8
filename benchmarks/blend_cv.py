"""Scaffold cross-validation on the benchmark's train + val rows: the GNN, a random forest, and
their average, judged on thousands of held-out molecules instead of val's 780. Test is not read.

    uv run python benchmarks/blend_cv.py                  # seed 0, 5 folds
    uv run python benchmarks/blend_cv.py --seeds='[0,1]'
    uv run python benchmarks/blend_cv.py --extra='["preprocess.fingerprint.size=1024"]'
    uv run python benchmarks/blend_cv.py --forests='[[500,0],[100,10],[200,8]]'
    uv run python benchmarks/blend_cv.py --gnn_cache=data/cache/blend_cv --forests='[[100,20]]'

The 7,024 train + val molecules of the classification split are cut into `folds` groups of whole
Bemis-Murcko scaffolds (largest scaffold first, each to the emptiest fold; ties in a seeded
order), so no held-out molecule shares a scaffold with a training one. For each fold:
- the GNN: one default `mol_props train` process (plus `--extra`) on the other folds, which its
  own scaffold split divides 8 : 1 into train and val for early stopping before the refit on
  both; its exported ONNX model then predicts the held-out fold;
- one random forest per `--forests` entry [trees, depth] (depth 0 = unlimited; default 500 trees
  of unlimited depth), otherwise set as the forest member is (`model.forest_max_features`,
  `model.forest_class_weight`), on the forest member's features (descriptors with the
  configured Morgan counts, and atom counts; `--extra` may change both), fitted on the other
  folds. A served forest must be cheap: its cost grows with trees x depth
  (`benchmarks/forest_cost.py`).
It prints each fold's ROC-AUC for the GNN and each forest, then, for each forest and the GNN's
share of the averaged probability from 0 to 1, the ROC-AUC over all out-of-fold predictions, the
mean over the folds, and the ROC-AUC over the molecules whose scaffold is theirs alone among the
7,024 ("lone scaffolds"). The benchmark's test split holds only such molecules, and the pooled
figure (~0.93) is dominated by large scaffold families, which are easier: the lone-scaffold
figure (~0.83, ~355 molecules) is the one that resembles test (~0.84), though it is noisier.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import fire
import numpy as np
from classical_baselines import FOREST_TREES
from sklearn.ensemble import RandomForestClassifier
from train_quality import REPO_ROOT, benchmark_table, run_seed

from mol_props.commands import reported_errors
from mol_props.config import ModelConfig, compose_config
from mol_props.data import scaffold_split
from mol_props.featurize import Featurizer, MoleculeGraph, featurize_parallel
from mol_props.forest import ForestSettings, forest_features, new_forest
from mol_props.metrics import roc_auc

# The GNN alone: the forest member built into `mol_props train` would blend itself in.
GNN_ONLY = ["model.forest_trees=0", "model.kernel_weight=0"]
SHARES = np.round(np.linspace(0.0, 1.0, 11), 1)  # the GNN's share of the averaged probability


def scaffold_folds(scaffolds: list[str], folds: int, seed: int) -> np.ndarray:
    """[M] fold of each molecule: whole scaffold groups, largest first, each to the emptiest
    fold (ties between equal groups broken in a seeded order)."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, scaffold in enumerate(scaffolds):
        groups[scaffold].append(i)
    order = list(groups)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda scaffold: -len(groups[scaffold]))  # stable: shuffled among equals
    assignment = np.zeros(len(scaffolds), dtype=int)
    filled = np.zeros(folds, dtype=int)
    for scaffold in order:
        emptiest = int(np.argmin(filled))
        assignment[groups[scaffold]] = emptiest
        filled[emptiest] += len(groups[scaffold])
    return assignment


def lone_scaffolds(scaffolds: list[str]) -> np.ndarray:
    """[M] bool: the molecule is the only one with its scaffold (the benchmark's test split holds
    only such molecules)."""
    counts = collections.Counter(scaffolds)
    return np.array([counts[scaffold] == 1 for scaffold in scaffolds])


def write_fold_table(rows: list[dict[str, str]], splits: np.ndarray, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "split": split} for row, split in zip(rows, splits))


def gnn_predictions(
    rows: list[dict[str, str]],
    held: np.ndarray,
    scaffolds: list[str],
    seed: int,
    extra: list[str],
    work: Path,
) -> np.ndarray:
    """[M held] probabilities of a `mol_props train` run on the rows not held out (NaN where a
    molecule could not be featurized)."""
    from mol_props.infer import LocalPredictor, ModelMetadata

    rest = np.flatnonzero(~held)
    inner = scaffold_split([scaffolds[i] for i in rest], [8 / 9, 1 / 9, 0.0], seed)
    splits = np.full(len(rows), "test", dtype=object)
    splits[rest] = np.array(["train", "val", "test"], dtype=object)[inner]
    table = work / "fold.csv"
    write_fold_table(rows, splits, table)
    run_seed("classification", seed, table, GNN_ONLY + extra, work)
    models = work / "models"
    predictor = LocalPredictor(
        models / "model.onnx", ModelMetadata.load(models / "model.json"), compose_config([]).infer
    )
    held_smiles = [row["smiles"] for row, is_held in zip(rows, held) if is_held]
    return predictor.predict(held_smiles).values[:, 0]


def cross_validate(
    rows: list[dict[str, str]],
    seed: int,
    folds: int,
    extra: list[str],
    forests: dict[str, Callable[[int], RandomForestClassifier]],
    work: Path,
    cached_gnn: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Out-of-fold probabilities [M] (NaN where unfeaturizable) of the GNN (`cached_gnn` if
    given: no training) and of each forest (by name), the folds, and the lone-scaffold mask."""
    smiles = [row["smiles"] for row in rows]
    labels = np.array([float(row["label"]) for row in rows])
    # The forest member's own features, from the featurizer `mol_props train` would use.
    preprocess = compose_config(extra).preprocess
    results = featurize_parallel(smiles, preprocess, num_workers=0, progress=False, with_keys=True)
    featurized = np.array([isinstance(result, MoleculeGraph) for result in results])  # [M]
    graphs = [result for result in results if isinstance(result, MoleculeGraph)]
    counted = forest_features(graphs, Featurizer(preprocess).forest_descriptor_count)
    features = np.full((len(rows), counted.shape[1]), np.nan)
    features[featurized] = counted
    # An unfeaturizable molecule has no scaffold: it forms a group of its own.
    scaffolds = [
        result.scaffold if isinstance(result, MoleculeGraph) else f"unparsed {i}"
        for i, result in enumerate(results)
    ]
    assignment = scaffold_folds(scaffolds, folds, seed)
    gnn = np.full(len(rows), np.nan) if cached_gnn is None else cached_gnn
    forest = {name: np.full(len(rows), np.nan) for name in forests}
    for fold in range(folds):
        held = assignment == fold
        if cached_gnn is None:
            gnn[held] = gnn_predictions(rows, held, scaffolds, seed, extra, work)
        fit = ~held & featurized
        scored = held & featurized
        scores = [f"GNN {masked_auc(labels[held], gnn[held]):.4f}"]
        for name, make_forest in forests.items():
            model = make_forest(seed).fit(features[fit], labels[fit])
            forest[name][scored] = model.predict_proba(features[scored])[:, 1]
            scores.append(f"forest {name} {masked_auc(labels[held], forest[name][held]):.4f}")
        print(f"seed {seed} fold {fold}: {held.sum()} molecules, ROC-AUC {', '.join(scores)}")
    return gnn, forest, assignment, lone_scaffolds(scaffolds)


def cache_path(folder: str, seed: int, folds: int, extra: list[str]) -> Path | None:
    """Where one seed's out-of-fold GNN predictions are cached (None without a folder). The
    name holds the seed, the folds and a digest of the whole configuration the fold runs
    resolve to, so a changed default (not only a changed `--extra`) trains again. Code changes
    are not in the digest: clear the folder after changing the model's code."""
    if not folder:
        return None
    resolved = dataclasses.asdict(compose_config(GNN_ONLY + extra))
    # The fold runs fit no forest, kernel or ChemNet member: their settings, the kernel's counts
    # and the SMILES token ids (which the network does not read) do not change their predictions.
    resolved["model"] = {
        name: value
        for name, value in resolved["model"].items()
        if not name.startswith(("forest_", "kernel_", "chemnet_"))
    }
    resolved["preprocess"].pop("kernel_fingerprint")
    resolved["preprocess"].pop("smiles_tokens")
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode())
    return Path(folder) / f"gnn_seed{seed}_folds{folds}_config{digest.hexdigest()[:12]}.npy"


def forest_factory(
    trees: int, depth: int, model: ModelConfig
) -> Callable[[int], RandomForestClassifier]:
    """A function of the seed giving the unfitted forest `mol_props train` would fit with
    `model`'s settings, but `trees` trees of `depth` (0 = grow until the leaves are pure)."""

    def make_forest(seed: int) -> RandomForestClassifier:
        settings = ForestSettings.of_model(model, seed, trees=trees, depth=depth)
        return new_forest("classification", settings)

    return make_forest


def masked_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    present = ~np.isnan(probabilities)
    return roc_auc(labels[present], probabilities[present])


def main(
    seeds: tuple[int, ...] = (0,),
    folds: int = 5,
    extra: tuple[str, ...] = (),
    forests: tuple[tuple[int, int], ...] = ((FOREST_TREES, 0),),
    benchmark_dir: str = str(REPO_ROOT.parent / "shared" / "benchmark"),
    gnn_cache: str = "",
) -> None:
    """Cross-validate the GNN, each forest [trees, depth] (depth 0 = unlimited) and their
    averages for each seed; print ROC-AUCs. `gnn_cache`: a folder where each seed's out-of-fold
    GNN predictions are saved, and read back by a later run with the same seed, folds and
    `--extra` instead of training again (to compare more forests)."""
    if folds < 2:
        raise SystemExit(f"error: --folds={folds}: must be at least 2")
    model = compose_config(list(extra)).model
    makers = {}
    for size in forests:
        if len(size) != 2 or size[0] < 1 or size[1] < 0:
            raise SystemExit(
                f"error: --forests entry {list(size)}: must be [trees, depth] with at least 1 "
                "tree and depth at least 0 (0 = unlimited)"
            )
        makers[f"{size[0]}x{size[1] or 'any'}"] = forest_factory(*size, model)

    table = benchmark_table("classification", benchmark_dir)
    with table.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] in ("train", "val")]
    labels = np.array([float(row["label"]) for row in rows])
    print(
        f"{table.name}: {len(rows):,} train + val molecules in {folds} scaffold folds; forests "
        f"(trees x depth) {', '.join(makers)}"
    )
    for seed in seeds:
        cache = cache_path(gnn_cache, seed, folds, list(extra))
        cached = np.load(cache) if cache is not None and cache.is_file() else None
        if cached is not None:
            print(f"seed {seed}: GNN predictions from {cache}")
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            # Export fills a model repository: a scratch copy, not the checkout's triton_repo/.
            shutil.copytree(REPO_ROOT / "triton_repo", work / "triton_repo")
            gnn, oof, assignment, lone = cross_validate(
                rows, seed, folds, list(extra), makers, work, cached
            )
        if cache is not None and cached is None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.save(cache, gnn)
        for name, forest in oof.items():
            for share in SHARES:
                blended = share * gnn + (1 - share) * forest
                per_fold = [
                    masked_auc(labels[assignment == fold], blended[assignment == fold])
                    for fold in range(folds)
                ]
                print(
                    f"seed {seed}, forest {name}, GNN share {share:.1f}: out-of-fold ROC-AUC "
                    f"{masked_auc(labels, blended):.4f}, mean of folds {np.mean(per_fold):.4f}, "
                    f"lone scaffolds ({lone.sum()}) {masked_auc(labels[lone], blended[lone]):.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    with reported_errors():
        fire.Fire(main)
