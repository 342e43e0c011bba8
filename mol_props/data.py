"""Data: fetch B3DB (DVC first, then its source), read tables, featurize with a cache, split.

Order of a run: `ensure_data` -> `load_table` -> `featurize_table` (cached) -> `split_indices`.
torch appears only in `train.py`, at collate time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mol_props.artifacts import (
    ArtifactError,
    dvc_add_and_push,
    dvc_file_for,
    dvc_pull,
    is_intact,
    md5_of,
    recorded_md5,
)
from mol_props.config import DataConfig, DvcConfig, PreprocessConfig, SplitConfig, check_fractions
from mol_props.errors import (
    ConfigError,
    DataError,
    undecodable_text_message,
    unknown_encoding_message,
)
from mol_props.featurize import (
    FEATURIZER_VERSION,
    FeaturizationError,
    MoleculeGraph,
    featurize_parallel,
)

LOGGER = logging.getLogger(__name__)

B3DB_FILES = ("B3DB_classification.tsv", "B3DB_regression.tsv")
B3DB_PACKAGE = "qc-b3db==1.1.1"
B3DB_GITHUB = "https://raw.githubusercontent.com/theochem/B3DB/main/B3DB/"
SPLIT_NAMES = ("train", "val", "test")
PANDAS_COMPRESSIONS = {".gz", ".bz2", ".zip", ".xz", ".zst"}  # suffixes pandas.read_csv unpacks


# ----------------------------------------------------------------------------- fetching


def _copy_from_package(name: str, destination: Path) -> bool:
    """Copy a B3DB table from the authors' package `qc-b3db`, if it is installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("B3DB")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        return False
    source = Path(spec.origin).parent / name
    if not source.is_file():
        return False
    shutil.copyfile(source, destination)
    return True


def _download_from_github(name: str, destination: Path, timeout_s: float = 10.0) -> None:
    from tqdm.auto import tqdm

    partial = destination.with_suffix(destination.suffix + ".part")
    with urllib.request.urlopen(B3DB_GITHUB + name, timeout=timeout_s) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with (
            partial.open("wb") as handle,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}") as bar,
        ):
            for block in iter(lambda: response.read(1 << 16), b""):
                handle.write(block)
                bar.update(len(block))
    partial.replace(destination)


def download_data(
    raw_dir: Path = Path("data/raw"), push: bool = True, dvc: DvcConfig | None = None
) -> list[Path]:
    """Fetch the B3DB tables from their source into `raw_dir`, verify and push them with DVC.

    Source: the authors' package `qc-b3db==1.1.1` (installed with mol_props), else their GitHub
    repository. Each file is checked against the md5 its committed `.dvc` file records; a file
    without one is added to DVC. With `push`, the files go to the DVC remote.
    """
    raw_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in B3DB_FILES:
        destination = raw_dir / name
        if _copy_from_package(name, destination):
            origin = f"package {B3DB_PACKAGE}"
        else:
            try:
                _download_from_github(name, destination)
            except OSError as error:
                raise ArtifactError(
                    f"cannot fetch {name}: package {B3DB_PACKAGE} is not installed and GitHub "
                    f"is unreachable ({error}). Install it (`uv sync`) or place the file at "
                    f"{destination}"
                ) from error
            origin = "GitHub theochem/B3DB"
        expected = recorded_md5(dvc_file_for(destination))
        actual = md5_of(destination)
        if expected is not None and actual != expected:
            raise ArtifactError(
                f"{destination} from {origin} has md5 {actual}, but "
                f"{dvc_file_for(destination)} records {expected}: the source changed. "
                "Check the file, then `dvc add` it and commit the new .dvc file"
            )
        LOGGER.info("data: %s from %s (md5 %s)", destination, origin, actual)
        paths.append(destination)
    if push and dvc is not None and dvc.enabled:
        _push(paths, dvc)
    return paths


def _push(paths: list[Path], dvc: DvcConfig) -> None:
    dvc_add_and_push(paths, dvc)
    LOGGER.info("data: pushed %s to DVC remote %r", ", ".join(map(str, paths)), dvc.remote)


def ensure_data(config: DataConfig) -> Path:
    """Make `config.path` present and intact: local copy, else DVC pull, else download_data()."""
    path = Path(config.path)
    dvc_file = dvc_file_for(path)
    if is_intact(path) and (dvc_file.is_file() or config.source != "b3db"):
        LOGGER.info("data: %s present (hash verified)", path)
        return path
    if path.is_file() and dvc_file.is_file():
        LOGGER.warning("data: %s does not match the hash in %s; re-fetching", path, dvc_file)
    if config.dvc.enabled and dvc_file.is_file():
        try:
            dvc_pull([dvc_file], config.dvc)
        except Exception as error:  # dvc raises many types; all mean "not pulled"
            LOGGER.info("data: DVC pull of %s failed (%s)", dvc_file, str(error).splitlines()[0])
        else:
            if is_intact(path):
                LOGGER.info("data: pulled %s from DVC remote %r", path, config.dvc.remote)
                return path
    if config.source != "b3db":
        raise ArtifactError(
            f"data file {path} is missing or corrupt and DVC could not pull it; "
            "give an existing table with data.path=..."
        )
    LOGGER.info("data: fetching B3DB with download_data()")
    paths = download_data(path.parent, push=False, dvc=config.dvc)
    if not is_intact(path):
        raise ArtifactError(f"{path} is still missing or corrupt after download_data()")
    if config.dvc.enabled:
        try:
            _push(paths, config.dvc)
        except ArtifactError as error:
            # The data is here and verified: a remote that cannot take it must not stop a run.
            LOGGER.warning("data: %s; going on with the downloaded copy", error)
    return path


# ----------------------------------------------------------------------------- tables


@dataclass
class MoleculeTable:
    """Rows of a dataset that have a SMILES and at least one target."""

    smiles: list[str]
    targets: np.ndarray  # [M, T] float32, NaN where a target is missing
    target_names: list[str]
    split_labels: list[str] | None  # from data.split.column, when the table has one


def _separator(config: DataConfig, path: Path) -> str:
    if config.separator:
        return config.separator
    suffix = path.suffix.lower()
    if suffix in PANDAS_COMPRESSIONS:  # pandas reads these itself: the format comes before
        suffix = Path(path.stem).suffix.lower()
    return "\t" if suffix in {".tsv", ".tab"} else ","


def load_table(config: DataConfig, path: Path) -> MoleculeTable:
    """Read SMILES and targets; skip (and log, with examples) rows without SMILES or targets."""
    import pandas as pd

    separator = _separator(config, path)
    try:
        frame = pd.read_csv(
            path, sep=separator, dtype=str, keep_default_na=False, encoding=config.encoding
        )
    except LookupError:
        raise ConfigError(unknown_encoding_message("data.encoding", config.encoding)) from None
    except UnicodeDecodeError as error:
        message = undecodable_text_message(config.encoding, error, "data.encoding")
        raise DataError(f"{path} {message}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(
            f"{path} is not a readable {separator!r}-separated text table "
            f"({str(error).strip()}); "
            "data=csv reads .csv and .tsv files (data.separator sets another separator)"
        ) from None
    if frame.empty:
        raise DataError(f"{path} has a header but no data rows: there is nothing to train on")
    required = [config.smiles_column, *config.target_columns]
    if config.split.kind == "column":
        required.append(config.split.column)
    missing = [column for column in required if column not in frame.columns]
    if missing:
        hint = "set data.smiles_column / data.target_columns / data.split.column"
        if len(frame.columns) == 1:
            hint = (
                f"one column only: is {separator!r} its separator? if not, set it, e.g. "
                f"\"data.separator=';'\"; {hint}"
            )
        raise DataError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)} ({hint})")
    targets = np.stack(
        [
            read_target_column(frame[column].tolist(), column, config)
            for column in config.target_columns
        ],
        axis=1,
    )  # [rows, T]
    smiles = frame[config.smiles_column].str.strip().tolist()
    keep = np.array([bool(text) for text in smiles], dtype=bool) & ~np.isnan(targets).all(axis=1)
    dropped = np.flatnonzero(~keep)
    if len(dropped):
        examples = ", ".join(repr(smiles[i]) for i in dropped[:3])
        LOGGER.warning(
            "data: skipped %d rows without a SMILES or any target (e.g. rows %s: %s)",
            len(dropped),
            ", ".join(str(i) for i in dropped[:3]),
            examples,
        )
    split_labels = (
        [frame[config.split.column].iloc[i].strip().lower() for i in np.flatnonzero(keep)]
        if config.split.kind == "column"
        else None
    )
    return MoleculeTable(
        smiles=[smiles[i] for i in np.flatnonzero(keep)],
        targets=targets[keep].astype(np.float32),
        target_names=list(config.target_names or config.target_columns),
        split_labels=split_labels,
    )


def read_target_column(values: Sequence[str], column: str, config: DataConfig) -> np.ndarray:
    """Text -> float: label_map entries (BBB+ / BBB-), numbers, blanks as missing (NaN).

    Other text is read as missing too, and said so with examples; a column with no readable
    value at all is an error (text labels need data.label_map), and so are classification
    labels other than 0 and 1."""
    parsed = np.full(len(values), np.nan)
    unreadable: list[int] = []
    for i, value in enumerate(values):
        text = value.strip()
        if text in config.label_map:
            parsed[i] = config.label_map[text]
        elif text:
            try:
                parsed[i] = float(text)
            except ValueError:
                unreadable.append(i)
    if unreadable:
        examples = ", ".join(f"row {i}: {values[i]!r}" for i in unreadable[:3])
        if np.isnan(parsed).all():
            raise DataError(
                f"target column {column!r} holds no number (e.g. {examples}); map text labels "
                "to numbers with data.label_map, e.g. 'data.label_map={yes: 1, no: 0}'"
            )
        LOGGER.warning(
            "data: %d value(s) of column %r are neither numbers nor data.label_map keys; read "
            "as missing (e.g. %s)",
            len(unreadable),
            column,
            examples,
        )
    if config.task == "classification":
        labels = set(parsed[~np.isnan(parsed)].tolist())
        if not labels <= {0.0, 1.0}:
            raise DataError(
                f"target column {column!r} holds {sorted(labels - {0.0, 1.0})[:5]}: "
                "data.task=classification takes labels 0 and 1 (map others with "
                "data.label_map, or use data.task=regression)"
            )
    return parsed


# ----------------------------------------------------------------------------- featurization


@dataclass
class FeaturizedTable:
    """A table's molecules that featurized; `rows` index back into the MoleculeTable."""

    graphs: list[MoleculeGraph]
    rows: np.ndarray  # [M'] int64 indices into the table
    errors: dict[int, str]  # table row -> reason, for those that did not featurize


def cache_key(data_md5: str, config: PreprocessConfig, smiles_digest: str = "") -> str:
    """Names a featurization: the data, the featurizer version and every setting that shapes
    features; `smiles_digest` pins the exact rows, which depend on data settings too."""
    settings = asdict(config)
    for runtime_only in ("num_workers", "chunk_size", "cache_dir"):
        settings.pop(runtime_only)
    if settings["kernel_fingerprint"]["size"] == 0:
        # Off, it adds no feature: caches from before the setting existed stay valid.
        settings.pop("kernel_fingerprint")
    if settings["smiles_tokens"] == 0:
        settings.pop("smiles_tokens")  # likewise
    payload = json.dumps([data_md5, smiles_digest, FEATURIZER_VERSION, settings], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def smiles_digest(smiles: Sequence[str]) -> str:
    # Rows kept from one file change with data.smiles_column and data.target_columns (a row
    # without any target is dropped), so the file's md5 alone could hand back another row set.
    return hashlib.sha256("\n".join(smiles).encode()).hexdigest()


def featurize_table(
    table: MoleculeTable, config: PreprocessConfig, data_md5: str, progress: bool = True
) -> FeaturizedTable:
    """Featurize every molecule once; later runs with the same data and settings load the cache."""
    key = cache_key(data_md5, config, smiles_digest(table.smiles))
    cache_path = Path(config.cache_dir) / f"features-{key}.npz"
    if cache_path.is_file():
        LOGGER.info("featurize: loaded cache %s", cache_path)
        return _load_cache(cache_path)
    results = featurize_parallel(
        table.smiles,
        config,
        num_workers=config.num_workers,
        chunk_size=config.chunk_size,
        progress=progress,
        with_keys=True,
    )
    graphs = [result for result in results if isinstance(result, MoleculeGraph)]
    rows = np.array(
        [i for i, result in enumerate(results) if isinstance(result, MoleculeGraph)],
        dtype=np.int64,
    )
    errors = {
        i: result.reason
        for i, result in enumerate(results)
        if isinstance(result, FeaturizationError)
    }
    if errors:
        examples = "; ".join(
            f"{table.smiles[i]!r}: {reason}" for i, reason in list(errors.items())[:3]
        )
        LOGGER.warning("featurize: skipped %d unusable molecules (e.g. %s)", len(errors), examples)
    if not graphs:
        raise DataError(
            f"none of the {len(table.smiles)} molecules could be featurized"
            + (f" (e.g. {examples})" if errors else "")
            + "; check data.path and data.smiles_column"
        )
    featurized = FeaturizedTable(graphs=graphs, rows=rows, errors=errors)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _save_cache(cache_path, featurized)
    LOGGER.info("featurize: %d molecules cached at %s", len(graphs), cache_path)
    return featurized


def _save_cache(path: Path, table: FeaturizedTable) -> None:
    sizes = np.array([graph.num_atoms for graph in table.graphs], dtype=np.int64)
    # One temporary file per process: two runs featurizing the same table at once must not
    # write into one file (each replaces the cache with a whole one of its own).
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(
        temporary,
        sizes=sizes,
        atom_features=np.concatenate([graph.atom_features for graph in table.graphs]),
        adjacency=np.concatenate([graph.adjacency.ravel() for graph in table.graphs]),
        descriptors=np.stack([graph.descriptors for graph in table.graphs]),
        canonical_smiles=np.array([graph.canonical_smiles for graph in table.graphs]),
        scaffolds=np.array([graph.scaffold for graph in table.graphs]),
        rows=table.rows,
        error_rows=np.array(list(table.errors), dtype=np.int64),
        error_reasons=np.array(list(table.errors.values()), dtype=str),
    )
    temporary.replace(path)


def _load_cache(path: Path) -> FeaturizedTable:
    with np.load(path) as stored:
        # An NpzFile decompresses on every item access: read each array exactly once.
        arrays = {name: stored[name] for name in stored.files}
    sizes = arrays["sizes"]
    atom_starts = np.concatenate([[0], np.cumsum(sizes)])
    adjacency_starts = np.concatenate([[0], np.cumsum(sizes**2)])
    graphs = [
        MoleculeGraph(
            atom_features=arrays["atom_features"][atom_starts[i] : atom_starts[i + 1]],
            adjacency=arrays["adjacency"][adjacency_starts[i] : adjacency_starts[i + 1]].reshape(
                size, size
            ),
            descriptors=arrays["descriptors"][i],
            canonical_smiles=canonical,
            scaffold=scaffold,
        )
        for i, (size, canonical, scaffold) in enumerate(
            zip(sizes, arrays["canonical_smiles"].tolist(), arrays["scaffolds"].tolist())
        )
    ]
    errors = dict(zip(arrays["error_rows"].tolist(), arrays["error_reasons"].tolist()))
    return FeaturizedTable(graphs=graphs, rows=arrays["rows"], errors=errors)


# ----------------------------------------------------------------------------- duplicates


def merge_duplicates(
    featurized: FeaturizedTable, targets: np.ndarray, task: str
) -> tuple[list[MoleculeGraph], np.ndarray, np.ndarray]:
    """One entry per canonical SMILES: regression targets averaged; classification labels kept
    when all copies agree and set missing (NaN) when they conflict.

    Returns (graphs, targets [M, T], table rows of the kept copies)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for position, graph in enumerate(featurized.graphs):
        groups[graph.canonical_smiles].append(position)
    kept_graphs, kept_targets, kept_rows = [], [], []
    conflicts = merged = 0
    for positions in groups.values():
        values = targets[featurized.rows[positions]]  # [copies, T]
        if len(positions) == 1:
            merged_values = values[0]
        else:
            merged += len(positions) - 1
            # Mean over the copies that have a value; a target no copy has stays NaN. (nanmean,
            # nanmax and nanmin would warn on such all-NaN columns; fmax/fmin skip NaN quietly.)
            present = (~np.isnan(values)).sum(axis=0)
            with np.errstate(invalid="ignore", divide="ignore"):
                merged_values = np.nansum(values, axis=0) / present
            if task == "classification":
                disagree = np.fmax.reduce(values, axis=0) != np.fmin.reduce(values, axis=0)
                conflicts += int(np.any(disagree))
                merged_values = np.where(disagree, np.nan, merged_values)
        if np.isnan(merged_values).all():
            continue
        kept_graphs.append(featurized.graphs[positions[0]])
        kept_targets.append(merged_values)
        kept_rows.append(featurized.rows[positions[0]])
    if merged:
        LOGGER.info(
            "data: merged %d duplicate rows (same canonical SMILES); %d with conflicting labels",
            merged,
            conflicts,
        )
    return kept_graphs, np.array(kept_targets, dtype=np.float32), np.array(kept_rows)


# ----------------------------------------------------------------------------- splits


def scaffold_split(scaffolds: Sequence[str], fractions: Sequence[float], seed: int) -> np.ndarray:
    """Bemis-Murcko scaffold split: groups shuffled with `seed`, stably sorted largest first,
    then filled greedily (train while it stays <= its fraction, then val, then test).

    Returns [M] int8 split ids (0 train, 1 val, 2 test)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, scaffold in enumerate(scaffolds):
        groups[scaffold].append(i)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    ordered = sorted((members[i] for i in order), key=len, reverse=True)
    total = len(scaffolds)
    train_limit = fractions[0] * total
    val_limit = (fractions[0] + fractions[1]) * total
    assignment = np.full(total, 2, dtype=np.int8)
    train_count = val_count = 0
    for group in ordered:
        if train_count + len(group) <= train_limit:
            assignment[group] = 0
            train_count += len(group)
        elif train_count + val_count + len(group) <= val_limit:
            assignment[group] = 1
            val_count += len(group)
    return assignment


def random_split(count: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(count)
    train_end = int(round(fractions[0] * count))
    val_end = int(round((fractions[0] + fractions[1]) * count))
    assignment = np.full(count, 2, dtype=np.int8)
    assignment[order[:train_end]] = 0
    assignment[order[train_end:val_end]] = 1
    return assignment


def column_split(labels: Sequence[str]) -> np.ndarray:
    ids = {name: i for i, name in enumerate(SPLIT_NAMES)}
    unknown = sorted({label for label in labels if label not in ids})
    if unknown:
        raise DataError(f"split column holds {unknown}; expected train / val / test")
    return np.array([ids[label] for label in labels], dtype=np.int8)


def split_indices(
    config: SplitConfig, scaffolds: Sequence[str], column_labels: Sequence[str] | None
) -> dict[str, np.ndarray]:
    """{"train": idx, "val": idx, "test": idx} over the deduplicated molecules."""
    check_fractions(config)  # also checked when the config is composed; this takes any config
    if config.kind == "scaffold":
        assignment = scaffold_split(scaffolds, config.fractions, config.seed)
    elif config.kind == "random":
        assignment = random_split(len(scaffolds), config.fractions, config.seed)
    elif config.kind == "column":
        if column_labels is None:
            raise ConfigError("data.split.kind=column needs data.split.column in the table")
        assignment = column_split(column_labels)
    else:
        raise ConfigError(f"unknown data.split.kind={config.kind!r}: scaffold | random | column")
    return {name: np.flatnonzero(assignment == i) for i, name in enumerate(SPLIT_NAMES)}


# ----------------------------------------------------------------------------- all together


@dataclass
class PreparedData:
    """Deduplicated, featurized molecules with targets and split indices."""

    graphs: list[MoleculeGraph]
    targets: np.ndarray  # [M, T] float32 (NaN = missing)
    target_names: list[str]
    splits: dict[str, np.ndarray]
    data_md5: str
    source_rows: np.ndarray  # [M] row of each molecule in the input table
    smiles: list[str]  # input SMILES of each molecule


def prepare_data(data: DataConfig, preprocess: PreprocessConfig, progress: bool) -> PreparedData:
    path = ensure_data(data)
    data_md5 = md5_of(path)
    table = load_table(data, path)
    featurized = featurize_table(table, preprocess, data_md5, progress=progress)
    graphs, targets, rows = merge_duplicates(featurized, table.targets, data.task)
    column_labels = (
        [table.split_labels[row] for row in rows] if table.split_labels is not None else None
    )
    splits = split_indices(data.split, [graph.scaffold for graph in graphs], column_labels)
    LOGGER.info(
        "data: %d molecules -> train %d / val %d / test %d (%s split)",
        len(graphs),
        *(len(splits[name]) for name in SPLIT_NAMES),
        data.split.kind,
    )
    return PreparedData(
        graphs=graphs,
        targets=targets,
        target_names=table.target_names,
        splits=splits,
        data_md5=data_md5,
        source_rows=rows,
        smiles=[table.smiles[row] for row in rows],
    )
