"""Torch-free inference: SMILES -> predictions with ONNX Runtime, or through a Triton server.

Imports stay light on purpose (numpy, rdkit, onnxruntime; tritonclient only in server mode): a cold
`mol_props infer --smiles CCO` must answer in well under a second, and torch alone takes seconds to
import. tests/test_infer.py runs it in a subprocess and checks torch was never imported.

    --smiles CCO               one JSON object per molecule on stdout (several: "CCO,c1ccccc1")
    --input F.csv --output G   every input row, in order, with one column per target + `error`;
                               streamed in chunks over worker processes, so memory stays bounded
"""

from __future__ import annotations

import codecs
import collections
import concurrent.futures
import csv
import dataclasses
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mol_props.config import (
    MISSING,
    Config,
    InferConfig,
    PreprocessConfig,
    compose_config,
    config_dir,
)
from mol_props.errors import MolPropsError, undecodable_text_message, unknown_encoding_message
from mol_props.featurize import (
    FEATURIZER_VERSION,
    FeaturizationError,
    Featurizer,
    MoleculeGraph,
    pad_graphs,
)

SMILES_FILE_SUFFIXES = {".smi", ".txt"}
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
GZIP_SUFFIX = ".gz"  # any input or output may be gzip-compressed: molecules.csv.gz
CSV_FIELD_SIZE_LIMIT = 2**31 - 1  # the largest a C long takes on every platform
# Chunks queued per worker process: enough to keep each busy while the main process writes, few
# enough that memory does not grow with the file.
CHUNKS_IN_FLIGHT_PER_WORKER = 2
# Starting workers (fork, a model session and a featurizer each) costs ~0.3 s of CPU apiece: an
# input shorter than this many chunks is done sooner in the main process.
MIN_CHUNKS_FOR_WORKERS = 4
CONFIG_CACHE_ENTRIES = 64  # composed configs kept on disk (one per distinct set of overrides)


class InferenceError(MolPropsError, RuntimeError):
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
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as error:
            raise InferenceError(
                f"model metadata {path} is unreadable ({error}): re-run `mol_props export`"
            ) from error

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def preprocess_config(self) -> PreprocessConfig:
        return preprocess_from_dict(self.preprocess)

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
    # Per molecule, its elements outside the featurizer's element list (their atoms share the
    # "unknown" slot): predicted, but an extrapolation. () where the predictor cannot tell.
    unknown_elements: list[tuple[str, ...]]


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
    B3DB molecules average ~26 heavy atoms, and padding each to 128 makes the adjacency products
    ~20x larger. Padding never changes a prediction (padded atoms are masked out).

    The ONNX Runtime session is opened on first use: file mode hands the work to worker processes
    (each opens its own), and a process forked while the parent holds a session would inherit its
    thread pool's state."""

    def __init__(self, model_path: Path, metadata: ModelMetadata, config: InferConfig) -> None:
        self.model_path = Path(model_path)
        self.metadata = metadata
        self.config = config
        self.targets = metadata.targets
        self.featurizer = metadata.featurizer()
        self.batch_size = config.batch_size
        self.buckets = sorted(
            {size for size in config.atom_buckets if size < metadata.max_atoms}
            | {metadata.max_atoms}
        )
        self._session = None

    @property
    def session(self):
        if self._session is None:
            self._session = self._open_session()
        return self._session

    def _open_session(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if self.config.num_threads > 0:
            options.intra_op_num_threads = self.config.num_threads
        try:
            session = onnxruntime.InferenceSession(
                str(self.model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # ONNX Runtime raises its own types for unreadable models
            raise InferenceError(
                f"cannot load the model {self.model_path} ({error}): re-run `mol_props export`"
            ) from error
        fixed_atoms = session.get_inputs()[0].shape[1]
        if isinstance(fixed_atoms, int):
            # A fixed-shape model (the Triton/TensorRT one) takes only max_atoms.
            self.buckets = [fixed_atoms]
        return session

    def predict(self, smiles: Sequence[str]) -> Predictions:
        session = self.session
        results = self.featurizer.featurize_many(smiles)
        values = np.full((len(results), len(self.targets)), np.nan, dtype=np.float32)
        errors: list[str | None] = [
            result.reason if isinstance(result, FeaturizationError) else None for result in results
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
                (output,) = session.run(["prediction"], batch.as_inputs())  # [b, T]
                values[batch_rows] = output
        unknown_elements = [
            self.featurizer.unknown_elements(text, result) if errors[i] is None else ()
            for i, (text, result) in enumerate(zip(smiles, results))
        ]
        return Predictions(values=values, errors=errors, unknown_elements=unknown_elements)


def worker_count(config: InferConfig) -> int:
    """Processes for file mode: `num_workers`, or every core this process may use when 0."""
    if config.num_workers > 0:
        return config.num_workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Each worker process holds one predictor, built by _init_worker (or the error that stopped it).
_WORKER_PREDICTOR: LocalPredictor | None = None
_WORKER_ERROR: Exception | None = None


def _init_worker(model_path: Path, metadata: ModelMetadata, config: InferConfig) -> None:
    global _WORKER_PREDICTOR, _WORKER_ERROR
    try:
        _WORKER_PREDICTOR = LocalPredictor(model_path, metadata, config)
        _WORKER_PREDICTOR.session  # opened now, so that a broken model fails the first chunk
    except Exception as error:
        # Raised from the first chunk instead, with its own message: an initializer that raises
        # only reports a broken pool.
        _WORKER_ERROR = error


def _predict_in_worker(smiles: list[str]) -> Predictions:
    if _WORKER_ERROR is not None:
        raise _WORKER_ERROR
    assert _WORKER_PREDICTOR is not None, "worker started without _init_worker"
    return _WORKER_PREDICTOR.predict(smiles)


@dataclass
class InputChunk:
    """A slice of an input file: its rows (all original columns) and their SMILES."""

    columns: list[str]  # the file's own columns, in order
    rows: list[dict[str, str]]
    smiles: list[str]
    # Line numbers of the blank lines of a .csv/.tsv read since the previous chunk: not rows (the
    # csv module, pandas and spreadsheets skip them too), but the summary says they were skipped.
    blank_lines: list[int] = dataclasses.field(default_factory=list)


def _find_column(columns: Sequence[str], wanted: str) -> str | None:
    """`wanted`, else the one column equal to it ignoring case and spaces ("SMILES" in B3DB)."""
    if wanted in columns:
        return wanted
    matches = [name for name in columns if name.strip().lower() == wanted.strip().lower()]
    return matches[0] if len(matches) == 1 else None


def file_format(path: Path) -> tuple[str, bool]:
    """The format a file name promises, and whether it is gzip-compressed:
    "molecules.csv" -> (".csv", False), "molecules.csv.gz" -> (".csv", True)."""
    path = Path(path)
    if path.suffix.lower() == GZIP_SUFFIX:
        return Path(path.stem).suffix.lower(), True
    return path.suffix.lower(), False


def open_text(path: Path, mode: str, encoding: str, compressed: bool) -> typing.TextIO:
    """A text file, or the text inside a gzip file, for the csv module (newline="")."""
    if compressed:
        return gzip.open(path, mode + "t", newline="", encoding=encoding)
    return Path(path).open(mode, newline="", encoding=encoding)


def read_smiles_file(
    path: Path, smiles_column: str, chunk_size: int, encoding: str = "utf-8"
) -> Iterator[InputChunk]:
    """Rows of a .csv/.tsv (with a SMILES column) or .smi/.txt (one SMILES per line, optionally
    followed by a name), each possibly gzip-compressed (.csv.gz), `chunk_size` rows at a time so
    memory stays bounded. An input without rows still yields one empty chunk, so the output gets
    its header."""
    path = Path(path)
    suffix, compressed = file_format(path)
    if not path.exists():
        raise InferenceError(f"input file {path} does not exist")
    if not path.is_file():
        raise InferenceError(f"input {path} is not a file")
    if suffix not in SMILES_FILE_SUFFIXES and suffix not in TABLE_DELIMITERS:
        raise InferenceError(
            f"input {path}: unsupported file type {suffix or '(none)'}; use .csv or .tsv with a "
            "SMILES column, or .smi / .txt with one SMILES per line (each may be .gz-compressed)"
        )
    # The csv module refuses any field over 128 KiB; one long cell in some other column (notes,
    # JSON) must not fail the whole file. Raised for this process, as pandas has no such limit.
    csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)
    with open_text(path, "r", _text_encoding(encoding), compressed) as handle:
        try:
            yield from _read_chunks(path, suffix, handle, smiles_column, chunk_size)
        except UnicodeDecodeError as error:
            message = undecodable_text_message(encoding, error, "infer.encoding")
            raise InferenceError(f"cannot read {path}: it {message}") from error
        except csv.Error as error:
            raise InferenceError(f"cannot read {path} as {suffix[1:]} text: {error}") from error
        except (gzip.BadGzipFile, EOFError) as error:
            if not compressed:
                raise
            # Not gzip data, or a download cut short ("Compressed file ended before ...").
            raise InferenceError(f"cannot read {path} as gzip: {error}") from error


def _text_encoding(encoding: str) -> str:
    """The codec that reads `encoding` (infer.encoding); for UTF-8, one that also skips the
    byte-order mark spreadsheet programs start their CSV files with."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise InferenceError(unknown_encoding_message("infer.encoding", encoding)) from None
    return "utf-8-sig" if name == "utf-8" else name


def _read_chunks(
    path: Path, suffix: str, handle: typing.TextIO, smiles_column: str, chunk_size: int
) -> Iterator[InputChunk]:
    blank_lines: list[int] = []
    if suffix in SMILES_FILE_SUFFIXES:
        columns = ["smiles", "name"]
        column = "smiles"
        rows: Iterator[dict[str, str]] = _smi_rows(handle)
    else:
        reader = csv.reader(handle, delimiter=TABLE_DELIMITERS[suffix])
        # The header is the first line that is not blank (blank lines above it are no rows).
        columns = next((cells for cells in reader if cells), [])
        if not columns:
            raise InferenceError(f"{path} is empty: expected a header row with a SMILES column")
        found = _find_column(columns, smiles_column)
        if found is None:
            hint = "name it with infer.smiles_column=<column>"
            if len(columns) == 1:
                hint += "; or, as it has one column only, is it not comma-separated? infer reads "
                hint += "comma-separated .csv and tab-separated .tsv files"
            raise InferenceError(
                f"{path} has no column {smiles_column!r} (columns: {', '.join(columns)}); {hint}"
            )
        column = found
        rows = _table_rows(reader, columns, blank_lines)
    yielded = False
    while True:
        chunk = list(itertools.islice(rows, chunk_size))
        if chunk or not yielded or blank_lines:
            smiles = [row[column] or "" for row in chunk]
            yield InputChunk(columns, chunk, smiles, blank_lines.copy())
            blank_lines.clear()
            yielded = True
        if len(chunk) < chunk_size:
            return


def _table_rows(
    reader: typing.Any, columns: list[str], blank_lines: list[int]  # reader: a csv.reader
) -> Iterator[dict[str, str]]:
    """csv.DictReader's rows (cells beyond the header under the key None, missing ones None),
    noting the line number of each blank line in `blank_lines` instead of passing over it."""
    for cells in reader:
        if not cells:
            blank_lines.append(reader.line_num)  # physical lines read so far: this one's number
            continue
        row: dict = dict(zip(columns, cells))
        if len(cells) > len(columns):
            row[None] = cells[len(columns) :]
        for name in columns[len(cells) :]:
            row[name] = None
        yield row


def _smi_rows(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    for number, line in enumerate(lines):
        parts = line.rstrip("\r\n").split(maxsplit=1)
        if number == 0 and parts and parts[0].lower() == "smiles":
            continue  # a header line, which some tools write into .smi files
        yield {"smiles": parts[0] if parts else "", "name": parts[1] if len(parts) > 1 else ""}


def predict_chunks(
    predictor: Predictor, chunks: Iterable[InputChunk]
) -> Iterator[tuple[InputChunk, Predictions]]:
    """Each chunk with its predictions, in input order. A local predictor with several workers
    featurizes and runs chunks in parallel processes (RDKit holds the GIL), with at most
    CHUNKS_IN_FLIGHT_PER_WORKER chunks per worker queued; a short input stays in this process."""
    iterator = iter(chunks)
    head = list(itertools.islice(iterator, MIN_CHUNKS_FOR_WORKERS))
    workers = worker_count(predictor.config) if isinstance(predictor, LocalPredictor) else 1
    if len(head) < MIN_CHUNKS_FOR_WORKERS or workers <= 1:
        for chunk in itertools.chain(head, iterator):
            yield chunk, predictor.predict(chunk.smiles)
        return
    assert isinstance(predictor, LocalPredictor)
    # One ONNX Runtime thread per worker: the workers already use every core between them.
    worker_config = dataclasses.replace(predictor.config, num_threads=1)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # An executor, not multiprocessing.Pool: a worker that dies (a crash in RDKit, the OOM
    # killer) raises BrokenProcessPool here instead of leaving its chunk waiting forever.
    pool = concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(predictor.model_path, predictor.metadata, worker_config),
    )
    try:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain(head, iterator):
            pending.append((chunk, pool.submit(_predict_in_worker, chunk.smiles)))
            if len(pending) >= CHUNKS_IN_FLIGHT_PER_WORKER * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _number_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def predict_smiles(predictor: Predictor, smiles: Sequence[str]) -> tuple[list[dict], list[str]]:
    """`--smiles` mode: one JSON-ready dict per molecule, in input order, and the notes for
    stderr (elements outside the model's list)."""
    predictions = predictor.predict(smiles)
    notes = [
        f"infer: {text!r}: {unknown_elements_note(elements)}"
        for text, elements in zip(smiles, predictions.unknown_elements)
        if elements
    ]
    records = [
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
    return records, notes


def unknown_elements_note(elements: Sequence[str], molecules: int = 1) -> str:
    """Why a prediction for a molecule holding these elements is an extrapolation."""
    one = len(elements) == 1
    return (
        f"{', '.join(elements)} {'is' if one else 'are'} not among the model's elements "
        f"(preprocess.atom.elements), so {'its' if one else 'their'} atoms share one "
        '"unknown" feature slot and '
        + ("the prediction is an extrapolation" if molecules == 1 else "these are extrapolations")
    )


def file_name_hints(records: Sequence[dict]) -> list[str]:
    """For each failed --smiles value that reads as a file name (molecules.csv), how to predict
    the file instead: RDKit's "syntax error" alone does not say what went wrong."""
    suffixes = SMILES_FILE_SUFFIXES | set(TABLE_DELIMITERS)
    return [
        f"infer: {record['smiles']!r} looks like a file name, not a SMILES; to predict a file: "
        f"--input {record['smiles']} --output predictions.csv"
        for record in records
        if record["error"] is not None and file_format(record["smiles"])[0] in suffixes
    ]


@dataclass
class FileSummary:
    ok: int
    failed: int
    reasons: collections.Counter  # failure reason -> molecules
    # Rows with more cells than the header has columns: those cells cannot be written back.
    rows_with_extra_cells: int = 0
    first_row_with_extra_cells: int = 0  # its number among the data rows, from 1
    # Predicted molecules with elements outside the model's list (extrapolations).
    rows_with_unknown_elements: int = 0
    first_row_with_unknown_elements: int = 0  # its number among the data rows, from 1
    unknown_elements: set[str] = dataclasses.field(default_factory=set)
    blank_lines: int = 0  # skipped blank lines of a .csv/.tsv
    first_blank_line: int = 0  # its line number in the file, from 1

    def describe(self, output_path: Path, shown: int = 3) -> str:
        text = f"{self.ok} ok, {self.failed} failed -> {output_path}"
        if self.reasons:
            common = "; ".join(
                f"{count} x {reason}" for reason, count in self.reasons.most_common(shown)
            )
            text += f"\nmost common failures: {common}"
        if self.rows_with_extra_cells:
            text += (
                f"\nwarning: {self.rows_with_extra_cells} rows have more cells than the header "
                f"(first: data row {self.first_row_with_extra_cells}); the cells beyond the "
                "header's columns are not in the output"
            )
        if self.rows_with_unknown_elements:
            elements = sorted(self.unknown_elements)
            text += (
                f"\nwarning: {self.rows_with_unknown_elements} molecules hold elements the model "
                f"does not know (first: data row {self.first_row_with_unknown_elements}): "
                f"{unknown_elements_note(elements, self.rows_with_unknown_elements)}"
            )
        if self.blank_lines:
            text += (
                f"\nnote: skipped {self.blank_lines} blank "
                f"{'line' if self.blank_lines == 1 else 'lines'} (first: line "
                f"{self.first_blank_line}); a blank line is not a row, so it has no output row"
            )
        return text


def output_delimiter(path: Path) -> str:
    """The output table's delimiter, from its suffix as for inputs: .csv comma, .tsv tab."""
    suffix = file_format(path)[0]
    delimiter = TABLE_DELIMITERS.get(suffix)
    if delimiter is None:
        # Anything else would get comma-separated text under a name that promises another
        # format (a .json file holding CSV).
        raise InferenceError(
            f"--output {path}: unsupported file type {suffix or '(none)'}; "
            "name a .csv or .tsv file (or .csv.gz / .tsv.gz)"
        )
    return delimiter


def predict_file(
    predictor: Predictor, input_path: Path, output_path: Path, config: InferConfig
) -> FileSummary:
    """File mode: stream rows in chunks, keep every input row and column, add targets + error.

    The output is written beside its final name and renamed at the end, so a run that stops
    half-way never leaves a complete-looking but truncated file."""
    from tqdm.auto import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise InferenceError(f"--output {output_path} would overwrite the input file")
    if output_path.is_dir():
        raise InferenceError(f"--output {output_path} is a directory; name a .csv file")
    delimiter = output_delimiter(output_path)
    chunks = read_smiles_file(input_path, config.smiles_column, config.chunk_size, config.encoding)
    first = next(chunks)  # fails here, before any output exists, on a bad input file
    partial = output_path.with_name(f".{output_path.name}.partial")
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open_text(partial, "w", "utf-8", compressed=file_format(output_path)[1])
    except OSError as error:
        # Named after the output the user gave, not the hidden partial file beside it.
        raise InferenceError(f"cannot write --output {output_path}: {error.strerror}") from None
    summary = FileSummary(0, 0, collections.Counter())
    try:
        with (
            handle,
            tqdm(desc="infer", unit="mol", disable=not config.progress, file=sys.stderr) as bar,
        ):
            added = output_columns(first.columns, predictor.targets)
            for name, column in zip([*predictor.targets, "error"], added):
                if name != column:
                    print(
                        f"infer: the input has a column {name!r}; writing {column!r}",
                        file=sys.stderr,
                    )
            writer = csv.DictWriter(
                handle,
                fieldnames=first.columns + added,
                delimiter=delimiter,
                extrasaction="ignore",
            )
            writer.writeheader()
            for chunk, predictions in predict_chunks(predictor, itertools.chain([first], chunks)):
                _write_chunk(writer, chunk, predictions, added, summary)
                bar.update(len(chunk.rows))
        partial.replace(output_path)
    finally:
        partial.unlink(missing_ok=True)
    return summary


def output_columns(input_columns: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The columns added to the input's: one per target, then `error`. A name the input already
    uses gets the prefix `mol_props_`: the input's own values (true labels, say) are kept."""
    taken = set(input_columns)
    columns = []
    for name in [*targets, "error"]:
        column = name
        while column in taken:
            column = f"mol_props_{column}"
        taken.add(column)
        columns.append(column)
    return columns


def _write_chunk(
    writer: csv.DictWriter,
    chunk: InputChunk,
    predictions: Predictions,
    added: list[str],  # output_columns(): target columns, then the error column
    summary: FileSummary,
) -> None:
    *target_columns, error_column = added
    if chunk.blank_lines:
        summary.first_blank_line = summary.first_blank_line or chunk.blank_lines[0]
        summary.blank_lines += len(chunk.blank_lines)
    for i, row in enumerate(chunk.rows):
        for k, column in enumerate(target_columns):
            value = predictions.values[i, k]
            row[column] = "" if math.isnan(value) else f"{value:.6g}"
        error = predictions.errors[i]
        row[error_column] = error or ""
        writer.writerow(row)  # extrasaction="ignore": skips cells beyond the header, counted here
        if None in row:  # csv.DictReader files such cells under the key None
            if not summary.rows_with_extra_cells:
                summary.first_row_with_extra_cells = summary.ok + summary.failed + 1
            summary.rows_with_extra_cells += 1
        if error is None:
            summary.ok += 1
            if elements := predictions.unknown_elements[i]:
                if not summary.rows_with_unknown_elements:
                    summary.first_row_with_unknown_elements = summary.ok + summary.failed
                summary.rows_with_unknown_elements += 1
                summary.unknown_elements.update(elements)
        else:
            summary.failed += 1
            summary.reasons[error] += 1


def local_predictor(config: Config) -> LocalPredictor:
    """The exported model from models/, pulled with DVC first if it is not here."""
    model_path = Path(config.infer.model_path)
    metadata_path = Path(config.infer.metadata_path)
    if not (model_path.is_file() and metadata_path.is_file()):
        from mol_props.artifacts import pull_models

        pull_models(config, needed=[model_path, metadata_path])
    return LocalPredictor(model_path, ModelMetadata.load(metadata_path), config.infer)


def parse_smiles_argument(value: object) -> list[str]:
    """`--smiles` as typed: one SMILES, several separated by commas (a SMILES never holds one),
    or a JSON list '["CCO","c1ccccc1"]'; a list or tuple from Python is taken item by item."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in parse_smiles_argument(item)]
    text = str(value)
    if text.startswith("[") and text.endswith("]"):
        # "[H]" or "[Na+]" are SMILES, not JSON; only a list of strings is taken as a list.
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [item.strip() for item in items]
    return [piece.strip() for piece in text.split(",")]


# `${name:arguments}`: a call of an OmegaConf resolver, unlike `${section.key}`.
_RESOLVER_CALL = re.compile(rb"\$\{[^}]*:")


def _config_cache_key(overrides: Sequence[str]) -> str | None:
    """A digest of everything a composed config depends on, or None when it may depend on more
    (a resolver such as ${oc.env:...} can read the environment; a reference to another setting,
    ${train.models_dir}, depends on the files alone)."""
    digest = hashlib.sha256(json.dumps(list(overrides)).encode())
    sources = sorted(config_dir().rglob("*.yaml"))
    for path in sources:
        text = path.read_bytes()
        if _RESOLVER_CALL.search(text):
            return None
        digest.update(str(path).encode() + b"\0" + text + b"\0")
    # The schema (mol_props/config.py) and the Hydra / OmegaConf installs shape the result too.
    import importlib.util

    for name in ("mol_props.config", "hydra", "omegaconf"):
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec and spec.origin else None
        if origin is None:
            return None
        digest.update(f"{origin}:{origin.stat().st_mtime_ns}".encode())
    if any(_RESOLVER_CALL.search(override.encode()) for override in overrides):
        return None
    return digest.hexdigest()


def _config_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mol_props"


def preprocess_from_dict(settings: dict) -> PreprocessConfig:
    """The featurizer settings a model was trained with (model.json, or a checkpoint), settings
    newer than the model at their defaults."""
    try:
        return _dataclass_from_dict(PreprocessConfig, settings)
    except (KeyError, TypeError) as error:
        raise InferenceError(
            f"the model's preprocess settings lack {error}: re-run `mol_props export`"
        ) from error


def _dataclass_from_dict(cls: type, data: dict):
    hints = typing.get_type_hints(cls)
    values = {}
    for item in dataclasses.fields(cls):
        has_default = item.default_factory is not dataclasses.MISSING or item.default not in (
            dataclasses.MISSING,
            MISSING,
        )
        if item.name not in data and has_default:
            continue  # a setting newer than the model: its default (the setting off)
        value = data[item.name]
        if dataclasses.is_dataclass(hints[item.name]):
            value = _dataclass_from_dict(hints[item.name], value)
        values[item.name] = value
    return cls(**values)


def compose_config_cached(overrides: Sequence[str]) -> Config:
    """`compose_config`, memoised on disk by the content of configs/ and the overrides.

    Hydra and OmegaConf spend ~0.5 s composing and validating the config: half of a cold
    `mol_props infer --smiles CCO`. The result depends only on the YAML files, the schema and the
    overrides, so a composed config is stored as JSON under ~/.cache/mol_props and reused until
    one of those changes; any other case composes afresh."""
    overrides = [str(override) for override in overrides]
    key = _config_cache_key(overrides)
    cache_file = _config_cache_dir() / f"config-{key}.json" if key else None
    if cache_file is not None and cache_file.is_file():
        try:
            return _dataclass_from_dict(Config, json.loads(cache_file.read_text()))
        except (ValueError, KeyError, TypeError, OSError):
            pass  # an old or damaged entry: compose afresh and overwrite it
    try:
        config = compose_config(overrides)
    except Exception as error:  # Hydra, OmegaConf and the schema's checks each raise their own
        raise InferenceError(f"configuration: {error}") from error
    if cache_file is not None:
        _store_config(cache_file, config)
    return config


def _store_config(cache_file: Path, config: Config) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(asdict(config)))
        temporary.replace(cache_file)
        entries = sorted(
            cache_file.parent.glob("config-*.json"), key=lambda path: path.stat().st_mtime
        )
        for stale in entries[:-CONFIG_CACHE_ENTRIES]:
            stale.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home only costs the next run the composition time


def run(
    config: Config,
    smiles: Sequence[str] = (),
    input_path: Path | None = None,
    output_path: Path | None = None,
    server: str | None = None,
) -> int:
    """The `mol_props infer` command; returns the process exit code."""
    if smiles and input_path is not None:
        raise InferenceError("give either --smiles or --input, not both")
    if not smiles and input_path is None:
        raise InferenceError(
            "nothing to predict: give --smiles CCO, or --input FILE --output FILE.csv "
            "(see `mol_props infer --help`)"
        )
    if input_path is not None and output_path is None:
        raise InferenceError("--input needs --output FILE.csv")
    if smiles and output_path is not None:
        raise InferenceError("--output goes with --input; --smiles prints JSON lines")
    if output_path is not None:
        output_delimiter(Path(output_path))  # before the model loads
    if server:
        from mol_props.client import TritonPredictor

        predictor: Predictor = TritonPredictor(server, config)
    else:
        predictor = local_predictor(config)
    if smiles:
        records, notes = predict_smiles(predictor, smiles)
        for record in records:
            print(json.dumps(record))
        for line in notes + file_name_hints(records):
            print(line, file=sys.stderr)
        return 0 if any(record["error"] is None for record in records) else 1
    summary = predict_file(predictor, Path(input_path), Path(output_path), config.infer)
    print(summary.describe(Path(output_path)), file=sys.stderr)
    return 0
