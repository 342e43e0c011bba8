"""What a forest member costs to serve, by size: the fitted forest as the exported ONNX graph runs
it (`mol_props.forest.TreeEnsemble`), timed in ONNX Runtime, and checked against scikit-learn.

    uv run python benchmarks/forest_cost.py
    uv run python benchmarks/forest_cost.py --forests='[[500,0],[100,0],[100,10]]' --threads=2

For each [trees, depth] (depth 0 = unlimited) a random forest, otherwise set as the default
forest member (`model.forest_max_features`, `model.forest_class_weight`), is fitted on the train
+ val rows of the classification benchmark (the descriptors, Morgan counts and atom counts the
model computes, as `mol_props train` fits it), exported alone to ONNX (input: the [B, K]
feature matrix), and run by ONNX Runtime on 64-molecule batches of those rows with `--threads`
threads. It prints the node count,
the deepest tree (the walk's steps), the ONNX file size, microseconds per molecule (median of
`--repeats`), and the largest difference from scikit-learn's predict_proba. For scale: the
default GNN costs ~240 us per molecule in the 128-atom model Triton serves
(docs/experiments.md, "The forest member").
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import onnxruntime
import torch
from train_quality import REPO_ROOT, benchmark_table

from mol_props.commands import reported_errors
from mol_props.config import compose_config
from mol_props.featurize import MoleculeGraph, featurize_parallel
from mol_props.forest import ForestSettings, fit_forest, forest_features, new_forest

BATCH = 64


def benchmark_features() -> tuple[np.ndarray, np.ndarray, int]:
    """Features [M, K] float32 and labels [M] of the benchmark's train + val rows, and how many
    of the K columns are descriptors."""
    table = benchmark_table("classification", str(REPO_ROOT.parent / "shared" / "benchmark"))
    with table.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] in ("train", "val")]
    preprocess = compose_config([]).preprocess
    results = featurize_parallel(
        [row["smiles"] for row in rows], preprocess, num_workers=0, progress=False
    )
    kept = [i for i, result in enumerate(results) if isinstance(result, MoleculeGraph)]
    graphs = [results[i] for i in kept]
    labels = np.array([float(rows[i]["label"]) for i in kept])
    return forest_features(graphs), labels, graphs[0].descriptors.shape[0]


def time_forest(path: Path, features: np.ndarray, threads: int, repeats: int) -> float:
    """Median microseconds per molecule over `repeats` passes of 64-molecule batches."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    batches = [features[i : i + BATCH] for i in range(0, len(features) - BATCH + 1, BATCH)]
    session.run(None, {"features": batches[0]})  # warm-up
    passes = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            session.run(None, {"features": batch})
        passes.append((time.perf_counter() - started) / (len(batches) * BATCH))
    return float(np.median(passes)) * 1e6


def main(
    forests: tuple[tuple[int, int], ...] = ((500, 0), (100, 0), (50, 0), (100, 10)),
    threads: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> None:
    """Fit, export and time a forest per [trees, depth]; print one line each."""
    for size in forests:
        if len(size) != 2 or size[0] < 1 or size[1] < 0:
            raise SystemExit(
                f"error: --forests entry {list(size)}: must be [trees, depth] with at least 1 "
                "tree and depth at least 0 (0 = unlimited)"
            )
    if threads < 1 or repeats < 1:
        raise SystemExit(f"error: --threads={threads} and --repeats={repeats}: at least 1")
    features, labels, descriptor_count = benchmark_features()
    model = compose_config([]).model  # the served forest's other settings
    print(
        f"{len(features):,} train + val molecules, {features.shape[1]} features; ONNX Runtime, "
        f"{threads} thread(s), {BATCH} molecules a call"
    )
    for trees, depth in forests:
        settings = ForestSettings.of_model(model, seed, trees=trees, depth=depth)
        ensemble = fit_forest(
            features, labels[:, None], "classification", settings, descriptor_count
        ).eval()
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "forest.onnx"
            with torch.no_grad():
                torch.onnx.export(
                    ensemble,
                    (torch.from_numpy(features[:BATCH]),),
                    str(path),
                    input_names=["features"],
                    output_names=["probability"],
                    dynamic_axes={"features": {0: "batch"}, "probability": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
            megabytes = path.stat().st_size / 1e6
            microseconds = time_forest(path, features, threads, repeats)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            onnx_values = session.run(None, {"features": features})[0][:, 0]
        reference = reference_probabilities(features, labels, settings)
        nodes = ensemble.thresholds.shape[0]
        print(
            f"{trees:4d} trees x depth {depth or 'any':>3}: {nodes:>9,} nodes, "
            f"deepest {ensemble.depth:2d}, {megabytes:6.1f} MB, {microseconds:7.1f} us per "
            f"molecule, max |ONNX - scikit-learn| {np.abs(onnx_values - reference).max():.1e}",
            flush=True,
        )


def reference_probabilities(
    features: np.ndarray, labels: np.ndarray, settings: ForestSettings
) -> np.ndarray:
    """scikit-learn's own predict_proba of the same forest (same settings, seed and rows)."""
    forest = new_forest("classification", settings)
    return forest.fit(features, labels).predict_proba(features)[:, 1]


if __name__ == "__main__":
    with reported_errors():
        fire.Fire(main)
