"""mol_props.data: reading tables, the featurization cache, duplicates, splits, and prepare_data.

Every table here is a small CSV written into a temporary directory from real B3DB molecules or
well-known small ones; nothing touches the network or the DVC remote.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import logging
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mol_props import data
from mol_props.artifacts import ArtifactError, md5_of
from mol_props.config import Config, SplitConfig, compose_config
from mol_props.data import (
    FeaturizedTable,
    MoleculeTable,
    cache_key,
    column_split,
    ensure_data,
    featurize_table,
    load_table,
    merge_duplicates,
    prepare_data,
    random_split,
    scaffold_split,
    split_indices,
)
from mol_props.errors import ConfigError, DataError
from mol_props.featurize import Featurizer, MoleculeGraph
from tests.conftest import b3db_rows, workspace_overrides, write_molecule_csv

SCAFFOLD_MOLECULES = 400


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def base_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The csv data config with everything pointed into a temporary workspace."""
    root = tmp_path_factory.mktemp("data")
    return compose_config(workspace_overrides(root, root / "molecules.csv"))


def csv_config(config: Config, path: Path, **changes) -> Config:
    """`config` reading `path`, data settings replaced (split={...} replaces split settings)."""
    split = dataclasses.replace(config.data.split, **changes.pop("split", {}))
    return dataclasses.replace(
        config, data=dataclasses.replace(config.data, path=str(path), split=split, **changes)
    )


def featurized(smiles: list[str], config: Config) -> FeaturizedTable:
    results = Featurizer(config.preprocess).featurize_many(smiles, with_keys=True)
    keep = [i for i, result in enumerate(results) if isinstance(result, MoleculeGraph)]
    return FeaturizedTable(
        graphs=[results[i] for i in keep],
        rows=np.array(keep, dtype=np.int64),
        errors={i: result.reason for i, result in enumerate(results) if i not in keep},
    )


@pytest.fixture(scope="module")
def scaffolds(base_config: Config) -> list[str]:
    """Bemis-Murcko scaffolds of real B3DB molecules, from the featurizer's own keys."""
    smiles = [row["SMILES"] for row in b3db_rows(SCAFFOLD_MOLECULES)]
    return [graph.scaffold for graph in featurized(smiles, base_config).graphs]


# ----------------------------------------------------------------------------- tables


def test_load_table_skips_rows_without_smiles_or_targets(
    tmp_path: Path, base_config: Config, caplog: pytest.LogCaptureFixture
):
    path = write_csv(
        tmp_path / "table.csv",
        ["smiles", "label"],
        [
            ["CCO", "1"],
            ["", "0"],  # no SMILES
            ["   ", "1"],  # whitespace only
            ["CCN", ""],  # no target
            ["CCC", "not a number"],  # unreadable target
            [" c1ccccc1 ", "0"],  # kept, trimmed
            ["CC O", "1"],  # kept here; the featurizer refuses it later
        ],
    )
    config = csv_config(base_config, path)
    with caplog.at_level(logging.WARNING, logger="mol_props.data"):
        table = load_table(config.data, path)
    assert table.smiles == ["CCO", "c1ccccc1", "CC O"]
    np.testing.assert_array_equal(table.targets, [[1.0], [0.0], [1.0]])
    assert table.targets.dtype == np.float32
    assert table.target_names == ["label"] and table.split_labels is None
    assert "skipped 4 rows" in caplog.text
    assert "1 value(s) of column 'label' are neither numbers" in caplog.text
    assert "row 4: 'not a number'" in caplog.text


def test_text_labels_without_a_label_map_say_how_to_map_them(tmp_path: Path, base_config: Config):
    path = write_csv(tmp_path / "t.csv", ["smiles", "label"], [["CCO", "yes"], ["CCN", "no"]])
    with pytest.raises(DataError, match=r"holds no number .*'data.label_map=\{yes: 1"):
        load_table(csv_config(base_config, path).data, path)
    mapped = csv_config(base_config, path, label_map={"yes": 1.0, "no": 0.0})
    np.testing.assert_array_equal(load_table(mapped.data, path).targets[:, 0], [1.0, 0.0])


def test_classification_labels_must_be_0_or_1(tmp_path: Path, base_config: Config):
    path = write_csv(tmp_path / "t.csv", ["smiles", "label"], [["CCO", "1"], ["CCN", "2"]])
    with pytest.raises(DataError, match=r"holds \[2.0\]: data.task=classification"):
        load_table(csv_config(base_config, path).data, path)
    regression = csv_config(base_config, path, task="regression")
    np.testing.assert_array_equal(load_table(regression.data, path).targets[:, 0], [1.0, 2.0])


def test_load_table_multi_target_with_missing_values(tmp_path: Path, base_config: Config):
    path = write_csv(
        tmp_path / "multi.csv",
        ["smiles", "logbb", "solubility"],
        [["CCO", "-0.5", ""], ["CCN", "", "1.25"], ["CCC", "0.1", "2"], ["CCCl", "", ""]],
    )
    config = csv_config(
        base_config, path, target_columns=["logbb", "solubility"], task="regression"
    )
    table = load_table(config.data, path)
    assert table.smiles == ["CCO", "CCN", "CCC"]
    np.testing.assert_array_equal(
        table.targets, np.array([[-0.5, np.nan], [np.nan, 1.25], [0.1, 2.0]], dtype=np.float32)
    )
    assert table.target_names == ["logbb", "solubility"]


def test_load_table_reads_b3db_labels(tmp_path: Path, base_config: Config):
    rows = b3db_rows(6)
    path = tmp_path / "b3db.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    b3db = compose_config(["data=b3db_classification"]).data
    table = load_table(dataclasses.replace(b3db, path=str(path)), path)
    expected = [1.0 if row["BBB+/BBB-"] == "BBB+" else 0.0 for row in rows]
    np.testing.assert_array_equal(table.targets[:, 0], expected)
    assert table.target_names == list(b3db.target_names)


def test_load_table_names_a_missing_column(tmp_path: Path, base_config: Config):
    path = write_csv(tmp_path / "table.csv", ["SMILES", "label"], [["CCO", "1"]])
    with pytest.raises(ValueError, match="smiles_column"):
        load_table(csv_config(base_config, path).data, path)


def test_load_table_reads_a_compressed_tsv_as_tab_separated(tmp_path: Path, base_config: Config):
    path = tmp_path / "table.tsv.gz"
    path.write_bytes(gzip.compress(b"smiles\tlabel\nCCO\t1\nCCN\t0\n"))
    table = load_table(csv_config(base_config, path).data, path)
    assert table.smiles == ["CCO", "CCN"]
    np.testing.assert_array_equal(table.targets[:, 0], [1.0, 0.0])


def test_load_table_refuses_a_header_without_rows(tmp_path: Path, base_config: Config):
    path = tmp_path / "header_only.csv"
    path.write_text("smiles,label\n")
    with pytest.raises(DataError, match="has a header but no data rows"):
        load_table(csv_config(base_config, path).data, path)


def test_load_table_suggests_the_separator_of_a_one_column_table(
    tmp_path: Path, base_config: Config
):
    path = tmp_path / "semicolons.csv"
    path.write_text("smiles;label\nCCO;1\nCCN;0\n")
    with pytest.raises(DataError, match="one column only: is ',' its separator"):
        load_table(csv_config(base_config, path).data, path)
    table = load_table(csv_config(base_config, path, separator=";").data, path)
    assert table.smiles == ["CCO", "CCN"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89ONNX\xab\xff binary", "is not utf-8 text (it holds the byte 0x89)"),
        (b"", "is not a readable ','-separated text table"),
    ],
)
def test_load_table_refuses_what_is_not_a_text_table(
    tmp_path: Path, base_config: Config, content: bytes, message: str
):
    path = tmp_path / "model.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_table(csv_config(base_config, path).data, path)


def test_load_table_reads_the_configured_encoding(tmp_path: Path, base_config: Config):
    path = tmp_path / "excel.csv"
    path.write_bytes("smiles,label,name\nCCO,1,\u00e9thanol\nCCN,0,amine\n".encode("cp1252"))
    with pytest.raises(DataError, match="save it as UTF-8, or name its encoding"):
        load_table(csv_config(base_config, path).data, path)
    cp1252 = csv_config(base_config, path, encoding="cp1252")
    assert load_table(cp1252.data, path).smiles == ["CCO", "CCN"]
    unknown = csv_config(base_config, path, encoding="no-such-codec")
    with pytest.raises(ConfigError, match="data.encoding=no-such-codec"):
        load_table(unknown.data, path)


def test_a_ragged_table_is_refused_with_the_line_on_one_line(tmp_path: Path, base_config: Config):
    path = tmp_path / "ragged.csv"
    path.write_text("smiles,label\nCCO,1\nCCN,0,extra\n")
    with pytest.raises(DataError) as caught:
        load_table(csv_config(base_config, path).data, path)
    # pandas ends its own message with a newline, which split the error in two.
    assert "Expected 2 fields in line 3, saw 3)" in str(caught.value)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- duplicates


def test_duplicates_averaged_for_regression(base_config: Config):
    smiles = ["CCO", "c1ccccc1", "OCC", "C(C)O"]  # three spellings of ethanol
    targets = np.array([[1.0], [5.0], [3.0], [5.0]], dtype=np.float32)
    graphs, merged, rows = merge_duplicates(featurized(smiles, base_config), targets, "regression")
    assert [graph.canonical_smiles for graph in graphs] == ["CCO", "c1ccccc1"]
    np.testing.assert_allclose(merged, [[3.0], [5.0]])
    np.testing.assert_array_equal(rows, [0, 1])


def test_conflicting_classification_labels_dropped(base_config: Config):
    smiles = ["CCO", "OCC", "CCN", "NCC", "c1ccccc1", "C1CC"]
    targets = np.array([[1], [0], [1], [1], [0], [1]], dtype=np.float32)
    table = featurized(smiles, base_config)
    assert list(table.errors) == [5]
    graphs, merged, rows = merge_duplicates(table, targets, "classification")
    # Ethanol's copies disagree: dropped. Ethylamine's agree: kept once.
    assert [graph.canonical_smiles for graph in graphs] == ["CCN", "c1ccccc1"]
    np.testing.assert_array_equal(merged, [[1.0], [0.0]])
    np.testing.assert_array_equal(rows, [2, 4])


def test_multi_target_duplicates_keep_what_agrees_without_warnings(base_config: Config):
    smiles = ["CCO", "OCC", "CCN", "NCC"]
    targets = np.array(
        [[1, 0, np.nan], [1, 1, np.nan], [0, np.nan, np.nan], [0, 1, np.nan]], dtype=np.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-NaN target must not raise numpy warnings
        graphs, merged, _ = merge_duplicates(
            featurized(smiles, base_config), targets, "classification"
        )
    assert len(graphs) == 2
    np.testing.assert_array_equal(merged, [[1, np.nan, np.nan], [0, 1, np.nan]])


# ----------------------------------------------------------------------------- splits


def test_scaffold_split_keeps_each_scaffold_in_one_split(scaffolds: list[str]):
    assignment = scaffold_split(scaffolds, [0.8, 0.1, 0.1], seed=0)
    splits_of = {}
    for scaffold, split in zip(scaffolds, assignment):
        splits_of.setdefault(scaffold, set()).add(int(split))
    assert all(len(splits) == 1 for splits in splits_of.values())
    # Several scaffolds are shared (benzene, acyclic ""), so the test is not vacuous.
    assert Counter(scaffolds).most_common(1)[0][1] >= 10
    fractions = np.bincount(assignment, minlength=3) / len(scaffolds)
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.03)
    assert fractions[0] <= 0.8  # train is filled only while it stays within its fraction


def test_scaffold_split_is_seeded(scaffolds: list[str]):
    first = scaffold_split(scaffolds, [0.8, 0.1, 0.1], seed=0)
    np.testing.assert_array_equal(first, scaffold_split(scaffolds, [0.8, 0.1, 0.1], seed=0))
    assert not np.array_equal(first, scaffold_split(scaffolds, [0.8, 0.1, 0.1], seed=1))


def test_random_split():
    assignment = random_split(1000, [0.7, 0.2, 0.1], seed=3)
    np.testing.assert_array_equal(np.bincount(assignment), [700, 200, 100])
    np.testing.assert_array_equal(assignment, random_split(1000, [0.7, 0.2, 0.1], seed=3))
    assert not np.array_equal(assignment, random_split(1000, [0.7, 0.2, 0.1], seed=4))


@pytest.mark.parametrize("kind", ["scaffold", "random"])
def test_test_fraction_of_zero(kind: str, scaffolds: list[str]):
    config = SplitConfig(kind=kind, fractions=[0.9, 0.1, 0.0], seed=0, column="split")
    splits = split_indices(config, scaffolds, None)
    assert len(splits["test"]) == 0
    assert len(splits["train"]) > 0 and len(splits["val"]) > 0
    covered = np.sort(np.concatenate(list(splits.values())))
    np.testing.assert_array_equal(covered, np.arange(len(scaffolds)))


def test_column_split_from_a_table(tmp_path: Path, base_config: Config):
    path = write_csv(
        tmp_path / "split.csv",
        ["smiles", "label", "split"],
        [["CCO", 1, "train"], ["CCN", 0, " Val "], ["CCC", 1, "TEST"], ["CCCl", 0, "train"]],
    )
    config = csv_config(base_config, path, split={"kind": "column"})
    table = load_table(config.data, path)
    assert table.split_labels == ["train", "val", "test", "train"]
    splits = split_indices(config.data.split, ["", "", "", ""], table.split_labels)
    assert {name: list(rows) for name, rows in splits.items()} == {
        "train": [0, 3],
        "val": [1],
        "test": [2],
    }


def test_column_split_rejects_unknown_labels():
    with pytest.raises(ValueError, match="validation"):
        column_split(["train", "validation", "test"])
    config = SplitConfig(kind="column", fractions=[0.8, 0.1, 0.1], seed=0, column="split")
    with pytest.raises(ValueError, match="data.split.column"):
        split_indices(config, ["", ""], None)


@pytest.mark.parametrize(
    ("kind", "fractions", "message"),
    [
        ("scaffold", [0.8, 0.1], "3 numbers"),
        ("scaffold", [0.8, 0.3, 0.1], "summing to 1"),
        ("random", [1.2, -0.1, -0.1], "summing to 1"),
        ("stratified", [0.8, 0.1, 0.1], "unknown data.split.kind"),
    ],
)
def test_bad_split_settings(kind: str, fractions: list[float], message: str):
    config = SplitConfig(kind=kind, fractions=fractions, seed=0, column="split")
    with pytest.raises(ValueError, match=message):
        split_indices(config, ["", "", ""], None)


# ----------------------------------------------------------------------------- cache


def cache_files(config: Config) -> list[Path]:
    return sorted(Path(config.preprocess.cache_dir).glob("features-*.npz"))


def assert_same_featurization(first: FeaturizedTable, second: FeaturizedTable) -> None:
    np.testing.assert_array_equal(first.rows, second.rows)
    assert first.errors == second.errors
    assert len(first.graphs) == len(second.graphs)
    for one, other in zip(first.graphs, second.graphs):
        np.testing.assert_array_equal(one.atom_features, other.atom_features)
        np.testing.assert_array_equal(one.adjacency, other.adjacency)
        np.testing.assert_array_equal(one.descriptors, other.descriptors)
        assert (one.canonical_smiles, one.scaffold) == (other.canonical_smiles, other.scaffold)


def refuse_to_featurize(*args, **kwargs):
    raise AssertionError("featurize_parallel ran although the cache should have answered")


def test_featurization_cache(tmp_path: Path, base_config: Config, monkeypatch: pytest.MonkeyPatch):
    config = dataclasses.replace(
        base_config,
        preprocess=dataclasses.replace(base_config.preprocess, cache_dir=str(tmp_path / "cache")),
    )
    smiles = [row["SMILES"] for row in b3db_rows(20)] + ["CC O", "C1CC"]
    table = MoleculeTable(
        smiles=smiles,
        targets=np.ones((len(smiles), 1), dtype=np.float32),
        target_names=["label"],
        split_labels=None,
    )
    first = featurize_table(table, config.preprocess, "md5-a", progress=False)
    assert set(first.errors) == {20, 21} and "whitespace" in first.errors[20]
    assert len(cache_files(config)) == 1

    monkeypatch.setattr(data, "featurize_parallel", refuse_to_featurize)
    second = featurize_table(table, config.preprocess, "md5-a", progress=False)
    assert_same_featurization(first, second)

    # A setting that shapes features is a different featurization: not taken from the cache.
    smaller = dataclasses.replace(config.preprocess, max_atoms=20)
    with pytest.raises(AssertionError, match="cache should have answered"):
        featurize_table(table, smaller, "md5-a", progress=False)
    # So is another row set from the same file (e.g. other target columns drop other rows).
    fewer = dataclasses.replace(table, smiles=smiles[1:], targets=table.targets[1:])
    with pytest.raises(AssertionError, match="cache should have answered"):
        featurize_table(fewer, config.preprocess, "md5-a", progress=False)


def test_cache_key_tracks_what_shapes_features(base_config: Config):
    preprocess = base_config.preprocess
    key = cache_key("md5-a", preprocess, "rows")
    assert key == cache_key("md5-a", preprocess, "rows")
    # Where and how fast it runs does not change the features.
    for runtime in ({"num_workers": 7}, {"chunk_size": 3}, {"cache_dir": "elsewhere"}):
        assert cache_key("md5-a", dataclasses.replace(preprocess, **runtime), "rows") == key
    changed = [
        cache_key("md5-b", preprocess, "rows"),
        cache_key("md5-a", preprocess, "other rows"),
        cache_key("md5-a", dataclasses.replace(preprocess, max_atoms=64), "rows"),
        cache_key("md5-a", dataclasses.replace(preprocess, fragments="keep_all"), "rows"),
        cache_key("md5-a", dataclasses.replace(preprocess, descriptors=["MolWt"]), "rows"),
        cache_key("md5-a", dataclasses.replace(preprocess, smiles_tokens=350), "rows"),
        cache_key(
            "md5-a",
            dataclasses.replace(
                preprocess,
                kernel_fingerprint=dataclasses.replace(preprocess.kernel_fingerprint, size=64),
            ),
            "rows",
        ),
        cache_key(
            "md5-a",
            dataclasses.replace(
                preprocess, atom=dataclasses.replace(preprocess.atom, elements=[6, 7, 8])
            ),
            "rows",
        ),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


def test_a_kernel_fingerprint_or_tokens_that_are_off_keep_the_keys_of_caches_made_before_them(
    base_config: Config,
):
    preprocess = base_config.preprocess
    # Both off by default.
    assert preprocess.kernel_fingerprint.size == 0 and preprocess.smiles_tokens == 0
    settings = dataclasses.asdict(preprocess)
    for left_out in (
        "num_workers",
        "chunk_size",
        "cache_dir",
        "kernel_fingerprint",
        "smiles_tokens",
    ):
        settings.pop(left_out)
    # The key as it was computed before the settings existed.
    payload = json.dumps(["md5-a", "rows", data.FEATURIZER_VERSION, settings], sort_keys=True)
    assert (
        cache_key("md5-a", preprocess, "rows") == hashlib.sha256(payload.encode()).hexdigest()[:16]
    )


def test_cache_key_changes_with_featurizer_version(
    base_config: Config, monkeypatch: pytest.MonkeyPatch
):
    key = cache_key("md5-a", base_config.preprocess)
    monkeypatch.setattr(data, "FEATURIZER_VERSION", "a newer one")
    assert cache_key("md5-a", base_config.preprocess) != key


def test_featurize_table_refuses_a_table_with_no_usable_molecule(
    tmp_path: Path, base_config: Config
):
    preprocess = dataclasses.replace(base_config.preprocess, cache_dir=str(tmp_path / "cache"))
    table = MoleculeTable(
        smiles=["C1CC", "not smiles"],
        targets=np.ones((2, 1), dtype=np.float32),
        target_names=["label"],
        split_labels=None,
    )
    with pytest.raises(ValueError, match="none of the 2 molecules could be featurized"):
        featurize_table(table, preprocess, "md5-a", progress=False)


# ----------------------------------------------------------------------------- end to end


def test_prepare_data_on_a_csv(tmp_path: Path, base_config: Config):
    path = write_molecule_csv(tmp_path / "molecules.csv", 40)
    config = csv_config(
        base_config,
        path,
        split={"kind": "scaffold"},
    )
    config = dataclasses.replace(
        config,
        preprocess=dataclasses.replace(config.preprocess, cache_dir=str(tmp_path / "cache")),
    )
    prepared = prepare_data(config.data, config.preprocess, progress=False)
    count = len(prepared.graphs)
    assert 30 <= count <= 40
    assert prepared.targets.shape == (count, 1)
    assert prepared.data_md5 == md5_of(path)
    covered = np.sort(np.concatenate([prepared.splits[name] for name in ("train", "val", "test")]))
    np.testing.assert_array_equal(covered, np.arange(count))
    # Each molecule still points at its own row of the input table.
    featurizer = Featurizer(config.preprocess)
    for i in (0, count // 2, count - 1):
        graph = featurizer(prepared.smiles[i], with_keys=True)
        assert graph.canonical_smiles == prepared.graphs[i].canonical_smiles
    rows = list(csv.DictReader(path.open()))
    assert [rows[row]["smiles"] for row in prepared.source_rows] == prepared.smiles


def test_ensure_data_for_a_missing_csv(tmp_path: Path, base_config: Config):
    missing = csv_config(base_config, tmp_path / "absent.csv")
    with pytest.raises(ArtifactError, match="absent.csv"):
        ensure_data(missing.data)
    present = write_csv(tmp_path / "present.csv", ["smiles", "label"], [["CCO", 1]])
    assert ensure_data(csv_config(base_config, present).data) == present
