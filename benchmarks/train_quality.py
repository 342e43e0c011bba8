"""Quality and wall time of `mol_props train` on the fixed B3DB benchmark splits, over seeds.

    uv run python benchmarks/train_quality.py                       # classification, seeds 0 1 2
    uv run python benchmarks/train_quality.py --task=regression
    uv run python benchmarks/train_quality.py --seeds='[0]' --extra='["model.hidden_dim=96"]'
    uv run python benchmarks/train_quality.py --task=regression --extra='["train=small_data"]' \
        --pretrain --extra_finetune='["train.learning_rate=0.001"]'

With --pretrain (regression), a classifier is first trained once (seed 0, default training
settings, the model and featurizer settings the fine-tuned model gets from --extra and
--extra_finetune, presets included) on the classification benchmark table
minus every molecule of the regression split's val and test rows (by canonical SMILES), and each
seed starts from its weights (`train.init_from`).

Each seed is a fresh `mol_props train` process (start-up, featurization and the ONNX export
included in its wall time), trained on the split's `train` rows, early-stopped on `val`, and
scored once on `test`. The split files are ../shared/benchmark/*.csv (see its README).
"""

from __future__ import annotations

import csv
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = {
    "classification": "b3db_classification_scaffold.csv",
    "regression": "b3db_regression_scaffold.csv",
}
MAIN_METRIC = {"classification": "roc_auc", "regression": "rmse"}
CHEMPROP = {"classification": "ROC-AUC 0.784 in 10.5 min", "regression": "RMSE 0.696 in 1.3 min"}


def mean_std(values: list[float]) -> str:
    """ "mean ± std" to 4 decimals, as `mol_props train` reports each (std 0 for one value)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def split_overrides(task: str, data_path: Path) -> list[str]:
    return [
        "data=csv",
        f"data.path={data_path}",
        "data.smiles_column=smiles",
        "data.target_columns=[label]",
        f"data.task={task}",
        "data.split.kind=column",
        "data.split.column=split",
        "data.dvc.enabled=false",
        "export.dvc_track=false",
    ]


def benchmark_table(task: str, benchmark_dir: str) -> Path:
    """The fixed split table of `task` in `benchmark_dir`, or a one-line error naming both."""
    table = Path(benchmark_dir) / SPLITS[task]
    if not table.is_file():
        raise SystemExit(
            f"error: no {table.name} in --benchmark_dir={benchmark_dir} (the fixed splits of "
            "../shared/benchmark/)"
        )
    return table


def run_seed(task: str, seed: int, data_path: Path, extra: list[str], work: Path) -> dict:
    overrides = split_overrides(task, data_path) + [
        f"train.seed={seed}",
        "train.progress=false",
        f"train.checkpoint_dir={work / 'checkpoints'}",
        f"train.models_dir={work / 'models'}",
        f"export.checkpoint={work / 'models' / 'best.ckpt'}",
        f"export.onnx_path={work / 'models' / 'model.onnx'}",
        f"export.dynamic_onnx_path={work / 'models' / 'model_dynamic_atoms.onnx'}",
        f"export.metadata_path={work / 'models' / 'model.json'}",
        f"serving.triton_repo={work / 'triton_repo'}",
        *extra,
    ]
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-m", "mol_props.commands", "train", *overrides],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{finished.stderr[-3000:]}")
    summary = finished.stdout.strip().splitlines()[-1]
    metrics = {name: float(value) for name, value in re.findall(r"(\w+)=(-?[\d.]+)", summary)}
    return {"seed": seed, "seconds": seconds, **metrics}


def model_overrides(overrides: list[str]) -> list[str]:
    """The model and featurizer settings that `overrides` give (presets included: train=small_data
    turns atom counts off) where they differ from the defaults, as overrides: a classifier trained
    with them has the tensors of the model fine-tuned from its weights."""
    from mol_props.config import compose_config, to_flat_dict

    default = to_flat_dict(compose_config([]))
    wanted = to_flat_dict(compose_config(overrides))
    return [
        f"{name}={value}"
        for name, value in wanted.items()
        if name.startswith(("model.", "preprocess.")) and value != default[name]
    ]


def pretraining_table(benchmark_dir: Path, destination: Path, overrides: list[str]) -> Path:
    """The classification table without the regression split's val and test molecules, matched
    by the canonical SMILES `mol_props train` itself uses to find duplicates (salts included)."""
    from mol_props.config import compose_config
    from mol_props.featurize import MoleculeGraph, featurize_parallel

    preprocess = compose_config(overrides).preprocess

    def canonical_keys(rows: list[dict[str, str]]) -> list[str | None]:
        graphs = featurize_parallel(
            [row["smiles"] for row in rows],
            preprocess,
            num_workers=0,
            progress=False,
            with_keys=True,
        )
        return [
            graph.canonical_smiles if isinstance(graph, MoleculeGraph) else None
            for graph in graphs
        ]

    with (benchmark_dir / SPLITS["regression"]).open(newline="") as handle:
        held_rows = [row for row in csv.DictReader(handle) if row["split"] in ("val", "test")]
    held_out = set(canonical_keys(held_rows)) - {None}
    with (benchmark_dir / SPLITS["classification"]).open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [row for row, key in zip(rows, canonical_keys(rows)) if key not in held_out]
    with destination.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
    print(f"pretraining table: {len(kept):,} molecules ({len(held_out)} regression val/test out)")
    return destination


def main(
    task: str = "classification",
    seeds: tuple[int, ...] = (0, 1, 2),
    extra: tuple[str, ...] = (),
    benchmark_dir: str = str(REPO_ROOT.parent / "shared" / "benchmark"),
    pretrain: bool = False,
    extra_finetune: tuple[str, ...] = (),
) -> None:
    """Train once per seed on the benchmark split of `task` (classification | regression) and
    print each seed's test metrics and wall time, then their mean and std."""
    if task not in SPLITS:
        raise SystemExit(f"error: --task={task!r}: choose one of {sorted(SPLITS)}")
    splits = benchmark_table(task, benchmark_dir).parent
    metric = MAIN_METRIC[task]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        # Export fills a model repository: a scratch copy, not the checkout's triton_repo/.
        shutil.copytree(REPO_ROOT / "triton_repo", Path(scratch) / "triton_repo")
        overrides = list(extra) + list(extra_finetune)
        if pretrain:
            if task != "regression":
                raise SystemExit("--pretrain starts the regression model from a classifier")
            work = Path(scratch) / "pretrain"
            shutil.copytree(REPO_ROOT / "triton_repo", work / "triton_repo")
            shared = model_overrides(overrides)
            table = pretraining_table(splits, Path(scratch) / "pretrain.csv", shared)
            result = run_seed("classification", 0, table, shared, work)
            print(f"pretrained classifier: roc_auc={result['roc_auc']:.3f}", flush=True)
            overrides.append(f"train.init_from={work / 'models' / 'best.ckpt'}")
        for seed in seeds:
            result = run_seed(task, seed, splits / SPLITS[task], overrides, Path(scratch))
            results.append(result)
            others = ", ".join(
                f"{name}={value:.4f}" for name, value in result.items() if name not in {"seed"}
            )
            print(f"seed {seed}: {others}", flush=True)
    values = [result[metric] for result in results]
    seconds = [result["seconds"] for result in results]
    print(
        f"{task}: test {metric} {mean_std(values)} over seeds "
        f"{list(seeds)}; wall time per `mol_props train` {statistics.mean(seconds):.0f} s "
        f"(max {max(seconds):.0f} s); chemprop 2.3.1 on this split: {CHEMPROP[task]}"
    )
    for member in ("network", "forest", "kernel"):  # with other members: each alone
        if all(f"{member}_{metric}" in result for result in results):
            member_values = [result[f"{member}_{metric}"] for result in results]
            print(f"  {member} alone: test {metric} {mean_std(member_values)}")


if __name__ == "__main__":
    fire.Fire(main)
