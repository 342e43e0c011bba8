"""Shared fixtures: small real molecules, an isolated workspace, and one tiny trained export.

Everything runs offline: molecules come from the B3DB tables that the authors' package `qc-b3db`
installs (no download), and every path a command writes goes to a temporary directory.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from mol_props.config import Config, compose_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`mol_props ARGS` in this process, via the entry point: (exit code, stdout, stderr)."""
    from mol_props import commands

    try:
        with mock.patch.object(sys, "argv", ["mol_props", *args]):
            commands.main()  # the entry point: argument checks, then fire
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def new_network(featurizer, model_config, num_targets: int = 1):
    """A fresh MoleculeGNN sized for `featurizer`'s output, as `mol_props train` builds it (the
    fingerprint's Morgan counts, then the ChemNet token ids, then the kernel fingerprint's counts,
    the last columns)."""
    from mol_props.model import MoleculeGNN  # torch: only the tests that build a network

    return MoleculeGNN(
        featurizer.atom_feature_size,
        featurizer.descriptor_size,
        num_targets,
        model_config,
        featurizer.config.fingerprint.size,
        featurizer.config.kernel_fingerprint.size,
        featurizer.config.smiles_tokens,
    )


def run_process(
    args: list[str],
    cwd: Path = REPO_ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """`python -m mol_props.commands ARGS` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "mol_props.commands", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def b3db_rows(count: int, table: str = "B3DB_classification.tsv") -> list[dict[str, str]]:
    """The first `count` rows of a B3DB table, read from the installed qc-b3db package."""
    import importlib.util

    spec = importlib.util.find_spec("B3DB")
    assert spec is not None and spec.origin is not None, "qc-b3db is a dependency of mol_props"
    with (Path(spec.origin).parent / table).open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        return [row for _, row in zip(range(count), reader)]


def b3db_spread(featurizer, step: int, count: int) -> tuple[list, np.ndarray, np.ndarray]:
    """`count` real B3DB molecules, every `step`-th row (the table is grouped by class: a spread
    of both), featurized: graphs, BBB labels [M], and logBB-like values [M] that the features
    explain in part (TPSA, a descriptor, with noise)."""
    from mol_props.featurize import MoleculeGraph

    rows = b3db_rows(8000)[::step]
    graphs, labels = [], []
    for row, graph in zip(rows, featurizer.featurize_many(row["SMILES"] for row in rows)):
        if isinstance(graph, MoleculeGraph):
            graphs.append(graph)
            labels.append(1.0 if row["BBB+/BBB-"] == "BBB+" else 0.0)
    graphs, labels = graphs[:count], np.array(labels[:count])
    tpsa = np.array([graph.descriptors[1] for graph in graphs])
    values = tpsa / 50 + np.random.default_rng(0).normal(0, 0.3, len(graphs))
    return graphs, labels, values


def write_logbb_csv(path: Path, count: int) -> Path:
    """A CSV of the first `count` molecules of B3DB's logBB table: columns smiles,logBB."""
    rows = b3db_rows(count, "B3DB_regression.tsv")
    path.write_text(
        "smiles,logBB\n" + "".join(f"{row['SMILES']},{row['logBB']}\n" for row in rows)
    )
    return path


def write_molecule_csv(path: Path, count: int) -> Path:
    """A CSV of `count` real B3DB molecules with columns smiles,label (BBB+ = 1)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "label"])
        for row in b3db_rows(count):
            writer.writerow([row["SMILES"], 1 if row["BBB+/BBB-"] == "BBB+" else 0])
    return path


def workspace_overrides(root: Path, data_path: Path) -> list[str]:
    """Hydra overrides that point every path of a run into `root` and keep it offline."""
    return [
        "data=csv",
        f"data.path={data_path}",
        "data.dvc.enabled=false",
        "data.split.kind=random",
        f"preprocess.cache_dir={root / 'cache'}",
        "preprocess.num_workers=1",
        f"train.checkpoint_dir={root / 'checkpoints'}",
        f"train.models_dir={root / 'models'}",
        "train.progress=false",
        f"export.checkpoint={root / 'models' / 'best.ckpt'}",
        f"export.onnx_path={root / 'models' / 'model.onnx'}",
        f"export.dynamic_onnx_path={root / 'models' / 'model_dynamic_atoms.onnx'}",
        f"export.metadata_path={root / 'models' / 'model.json'}",
        "export.dvc_track=false",
        "export.parity_molecules=64",
        f"infer.model_path={root / 'models' / 'model_dynamic_atoms.onnx'}",
        f"infer.metadata_path={root / 'models' / 'model.json'}",
        "infer.progress=false",
        f"logging.plots_dir={root / 'plots'}",
        f"logging.fallback_uri={root / 'plots' / 'mlruns'}",
        # Nothing listens on port 9: the run logs to the local fallback store, quickly.
        "logging.tracking_uri=http://127.0.0.1:9",
        "logging.connect_timeout_s=0.5",
        f"serving.triton_repo={root / 'triton_repo'}",
    ]


TINY_MODEL = [
    "model.hidden_dim=32",
    "model.num_layers=2",
    "model.descriptor_hidden_dim=16",
    "model.head_hidden_dim=32",
    "train.max_epochs=3",
    "train.batch_size=32",
    "train.patience=10",
]


@dataclasses.dataclass
class ExportedModel:
    root: Path
    config: Config
    overrides: list[str]
    models_dir: Path
    onnx_path: Path
    dynamic_onnx_path: Path
    metadata_path: Path
    test_metrics: dict[str, float]


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """A tiny GNN trained for 3 epochs on 240 real molecules, exported to ONNX (shared)."""
    from mol_props import export, train

    root = tmp_path_factory.mktemp("exported")
    shutil.copytree(REPO_ROOT / "triton_repo", root / "triton_repo")
    data_path = write_molecule_csv(root / "molecules.csv", 240)
    overrides = workspace_overrides(root, data_path) + TINY_MODEL
    config = compose_config(overrides)
    result = train.run(config)
    exported = export.run(config)
    return ExportedModel(
        root=root,
        config=config,
        overrides=overrides,
        models_dir=root / "models",
        onnx_path=exported.onnx_path,
        dynamic_onnx_path=exported.dynamic_onnx_path,
        metadata_path=exported.metadata_path,
        test_metrics=result.test_metrics,
    )
