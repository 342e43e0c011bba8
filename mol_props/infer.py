"""Torch-free inference: SMILES -> predictions with ONNX Runtime, or through a Triton server.

Imports stay light on purpose (numpy, rdkit, onnxruntime; tritonclient only in server mode): a cold
`mol_props infer --smiles CCO` must answer in well under a second, and torch alone takes seconds to
import. tests/test_infer.py runs it in a subprocess and checks torch was never imported.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mol_props.config import Config, InferConfig, PreprocessConfig
from mol_props.featurize import (
    FEATURIZER_VERSION,
    FeaturizationError,
    Featurizer,
    MoleculeGraph,
    pad_graphs,
)

SMILES_FILE_SUFFIXES = {".smi", ".txt"}


class InferenceError(RuntimeError):
    """A problem with the user's request as a whole (missing file, column, model)."""


@dataclass
class ModelMetadata:
    """What inference must know about an exported model; written by `mol_props export`."""

    task: str  # classification | regression
    targets: list[str]  # one output column per target
    max_atoms: int
    atom_feature_size: int
    descriptor_size: int
    featurizer_version: str
    preprocess: dict  # the PreprocessConfig the model was trained with

    @classmethod
    def load(cls, path: Path) -> ModelMetadata:
        return cls(**json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def preprocess_config(self) -> PreprocessConfig:
        from omegaconf import OmegaConf

        merged = OmegaConf.merge(OmegaConf.structured(PreprocessConfig), self.preprocess)
        return OmegaConf.to_object(merged)

    def featurizer(self) -> Featurizer:
        """The exact featurizer the model was trained with; refuses a different version."""
        if self.featurizer_version != FEATURIZER_VERSION:
            raise InferenceError(
                f"the model was exported with featurizer version {self.featurizer_version}, "
                f"this code has {FEATURIZER_VERSION}: re-run `mol_props export`"
            )
        featurizer = Featurizer(self.preprocess_config())
        if (featurizer.atom_feature_size, featurizer.descriptor_size) != (
            self.atom_feature_size,
            self.descriptor_size,
        ):
            raise InferenceError("featurizer widths differ from the exported model's")
        return featurizer


@dataclass
class Predictions:
    """One row per input molecule: values are NaN where `errors` holds a reason."""

    values: np.ndarray  # [B, T] float32
    errors: list[str | None]


class Predictor(Protocol):
    targets: list[str]

    def predict(self, smiles: Sequence[str]) -> Predictions: ...


def bucket_for(num_atoms: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `num_atoms` (buckets are sorted ascending)."""
    for size in buckets:
        if num_atoms <= size:
            return size
    return buckets[-1]


class LocalPredictor:
    """ONNX Runtime on this machine. Molecules are padded to size buckets, not all to max_atoms:
    B3DB molecules average ~25 heavy atoms, and padding each to 128 makes the adjacency products
    ~20x larger. Padding never changes a prediction (padded atoms are masked out)."""

    def __init__(self, model_path: Path, metadata: ModelMetadata, config: InferConfig) -> None:
        import onnxruntime

        self.metadata = metadata
        self.targets = metadata.targets
        self.featurizer = metadata.featurizer()
        self.batch_size = config.batch_size
        self.buckets = sorted(
            {size for size in config.atom_buckets if size < metadata.max_atoms}
            | {metadata.max_atoms}
        )
        options = onnxruntime.SessionOptions()
        if config.num_threads > 0:
            options.intra_op_num_threads = config.num_threads
        self.session = onnxruntime.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        fixed_atoms = self.session.get_inputs()[0].shape[1]
        if isinstance(fixed_atoms, int):
            # A fixed-shape model (the Triton/TensorRT one) takes only max_atoms.
            self.buckets = [fixed_atoms]

    def predict(self, smiles: Sequence[str]) -> Predictions:
        results = self.featurizer.featurize_many(smiles)
        values = np.full((len(results), len(self.targets)), np.nan, dtype=np.float32)
        errors: list[str | None] = [
            result.reason if isinstance(result, FeaturizationError) else None
            for result in results
        ]
        by_bucket: dict[int, list[int]] = {}
        for i, result in enumerate(results):
            if isinstance(result, MoleculeGraph):
                by_bucket.setdefault(bucket_for(result.num_atoms, self.buckets), []).append(i)
        for size, rows in by_bucket.items():
            for start in range(0, len(rows), self.batch_size):
                batch_rows = rows[start : start + self.batch_size]
                graphs = [results[i] for i in batch_rows]
                batch = pad_graphs(
                    graphs, size, self.featurizer.descriptor_size, len(self.featurizer)
                )
                (output,) = self.session.run(["prediction"], batch.as_inputs())  # [b, T]
                values[batch_rows] = output
        return Predictions(values=values, errors=errors)


@dataclass
class InputChunk:
    """A slice of an input file: its rows (all original columns) and their SMILES."""

    columns: list[str]  # the file's own columns, in order
    rows: list[dict[str, str]]
    smiles: list[str]


def read_smiles_file(path: Path, smiles_column: str, chunk_size: int) -> Iterator[InputChunk]:
    """Rows of a .csv/.tsv (with a SMILES column) or .smi/.txt (one SMILES per line, optionally
    followed by a name), `chunk_size` rows at a time so memory stays bounded."""
    if not path.is_file():
        raise InferenceError(f"input file {path} does not exist")
    with path.open(newline="") as handle:
        if path.suffix.lower() in SMILES_FILE_SUFFIXES:
            columns = ["smiles", "name"]
            smiles_column = "smiles"
            rows: Iterator[dict[str, str]] = (_smi_row(line) for line in handle)
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = list(reader.fieldnames or [])
            if smiles_column not in columns:
                raise InferenceError(
                    f"{path} has no column {smiles_column!r} (columns: {', '.join(columns)}); "
                    "name it with infer.smiles_column=<column>"
                )
            rows = iter(reader)
        chunk: list[dict[str, str]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) == chunk_size:
                yield InputChunk(columns, chunk, [row[smiles_column] or "" for row in chunk])
                chunk = []
        if chunk:
            yield InputChunk(columns, chunk, [row[smiles_column] or "" for row in chunk])


def _smi_row(line: str) -> dict[str, str]:
    parts = line.rstrip("\r\n").split(maxsplit=1)
    return {"smiles": parts[0] if parts else "", "name": parts[1] if len(parts) > 1 else ""}


def _number_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def predict_smiles(predictor: Predictor, smiles: Sequence[str]) -> list[dict]:
    """`--smiles` mode: one JSON-ready dict per molecule, in input order."""
    predictions = predictor.predict(smiles)
    return [
        {
            "smiles": text,
            **{
                target: _number_or_none(predictions.values[i, k])
                for k, target in enumerate(predictor.targets)
            },
            "error": predictions.errors[i],
        }
        for i, text in enumerate(smiles)
    ]


def predict_file(
    predictor: Predictor, input_path: Path, output_path: Path, config: InferConfig
) -> tuple[int, int]:
    """File mode: stream rows in chunks, keep every input row and column, add targets + error.

    Returns (ok, failed) counts."""
    from tqdm.auto import tqdm

    ok = failed = 0
    writer: csv.DictWriter | None = None
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w", newline="") as handle, tqdm(
        desc="infer", unit="mol", disable=not config.progress
    ) as bar:
        for chunk in read_smiles_file(input_path, config.smiles_column, config.chunk_size):
            predictions = predictor.predict(chunk.smiles)
            if writer is None:
                added = [name for name in predictor.targets + ["error"] if name not in chunk.columns]
                writer = csv.DictWriter(
                    handle, fieldnames=chunk.columns + added, extrasaction="ignore"
                )
                writer.writeheader()
            for i, row in enumerate(chunk.rows):
                for k, target in enumerate(predictor.targets):
                    value = predictions.values[i, k]
                    row[target] = "" if math.isnan(value) else f"{value:.6g}"
                row["error"] = predictions.errors[i] or ""
                failed += predictions.errors[i] is not None
                writer.writerow(row)
            ok += len(chunk.rows)
            bar.update(len(chunk.rows))
    return ok - failed, failed


def local_predictor(config: Config) -> LocalPredictor:
    """The exported model from models/, pulled with DVC first if it is not here."""
    model_path = Path(config.infer.model_path)
    metadata_path = Path(config.infer.metadata_path)
    if not (model_path.is_file() and metadata_path.is_file()):
        from mol_props.artifacts import pull_models

        pull_models(config, needed=[model_path, metadata_path])
    return LocalPredictor(model_path, ModelMetadata.load(metadata_path), config.infer)


def run(
    config: Config,
    smiles: Sequence[str] = (),
    input_path: Path | None = None,
    output_path: Path | None = None,
    server: str | None = None,
) -> int:
    """The `mol_props infer` command; returns the process exit code."""
    if bool(smiles) == (input_path is not None):
        raise InferenceError("give either --smiles or --input (with --output), not both")
    if server:
        from mol_props.client import TritonPredictor

        predictor: Predictor = TritonPredictor(server, config)
    else:
        predictor = local_predictor(config)
    if smiles:
        records = predict_smiles(predictor, smiles)
        for record in records:
            print(json.dumps(record))
        return 0 if any(record["error"] is None for record in records) else 1
    if output_path is None:
        raise InferenceError("--input needs --output FILE.csv")
    ok, failed = predict_file(predictor, Path(input_path), Path(output_path), config.infer)
    print(f"{ok} ok, {failed} failed -> {output_path}", file=sys.stderr)
    return 0
