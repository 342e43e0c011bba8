"""`mol_props infer`: command-line parsing, per-molecule errors, file mode, size buckets, the
torch-free import rule, the composed-config cache, and pulling a missing model with DVC.

Most runs go through fire in this process (fast); the ones that must prove something about a
fresh process (imports, worker processes, a clone without the model) start one.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mol_props import infer
from mol_props.config import compose_config
from mol_props.infer import (
    InferenceError,
    LocalPredictor,
    ModelMetadata,
    compose_config_cached,
    parse_smiles_argument,
    read_smiles_file,
)

from .conftest import REPO_ROOT, ExportedModel, b3db_rows, run_cli, run_process

# Never imported by `mol_props infer` (DESIGN.md: featurize -> infer stays light).
HEAVY_MODULES = [
    "torch",
    "torch_geometric",
    "lightning",
    "lightning_fabric",
    "mlflow",
    "dvc",
    "pandas",
    "onnx",
    "tritonclient",
    "matplotlib",
    "sklearn",
]
BUCKET_TOLERANCE = 1e-5
LONG_CHAIN = "C" * 200  # more heavy atoms than max_atoms (128)


@pytest.fixture(autouse=True)
def config_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Composed configs are cached under $XDG_CACHE_HOME: keep them out of the real home."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def target_of(model: ExportedModel) -> str:
    """The name of the model's (first) output column."""
    return ModelMetadata.load(model.metadata_path).targets[0]


def local_overrides(model: ExportedModel) -> list[str]:
    # One process: in-process tests must not fork pytest (it holds torch from the fixture).
    return [*model.overrides, "infer.num_workers=1"]


# --- --smiles as the shell hands it over ---------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("CCO", ["CCO"]),
        ("[H]", ["[H]"]),  # not a Python list
        ("[Na+].[Cl-]", ["[Na+].[Cl-]"]),
        ("C#N", ["C#N"]),
        ("1", ["1"]),
        ("CCO,c1ccccc1", ["CCO", "c1ccccc1"]),
        ("CCO, c1ccccc1 ", ["CCO", "c1ccccc1"]),
        ('["CCO","c1ccccc1"]', ["CCO", "c1ccccc1"]),
        (("CCO", "C(=O)O"), ["CCO", "C(=O)O"]),
        ("", [""]),
        (None, []),
    ],
)
def test_parse_smiles_argument(typed: object, expected: list[str]):
    assert parse_smiles_argument(typed) == expected


@pytest.mark.parametrize("smiles", ["[H]", "C#N", "C(=O)O", "CC(C)(C)O", "O=C=O", "[2H]C"])
def test_fire_hands_smiles_over_unmangled(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, smiles: str
):
    """fire evaluates flag values as Python: "[H]" would become ['H'] and "C#N" would become "C"
    ('#' starts a comment). Each must reach the model exactly as typed."""
    code, out, err = run_cli(capsys, "infer", "--smiles", smiles, *local_overrides(exported_model))
    assert code == 0, err
    (record,) = json_lines(out)
    assert record["smiles"] == smiles
    assert record["error"] is None
    expected = infer.local_predictor(exported_model.config).predict([smiles]).values[0, 0]
    assert record[target_of(exported_model)] == pytest.approx(float(expected))


def test_several_smiles_one_json_object_each_in_order(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture
):
    code, out, err = run_cli(
        capsys, "infer", "--smiles", "CCO,c1ccccc1,CC(=O)O", *local_overrides(exported_model)
    )
    assert code == 0, err
    records = json_lines(out)
    assert [record["smiles"] for record in records] == ["CCO", "c1ccccc1", "CC(=O)O"]
    target = target_of(exported_model)
    assert set(records[0]) == {"smiles", target, "error"}
    assert all(0.0 <= record[target] <= 1.0 for record in records)  # BBB+ probabilities


def test_bad_molecules_get_reasons_and_never_fail_the_batch(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture
):
    typed = ["CCO", "C1CC", "", "C(C)(C)(C)(C)C", LONG_CHAIN, "[Zz]", "  c1ccccc1O "]
    code, out, err = run_cli(
        capsys, "infer", "--smiles", json.dumps(typed), *local_overrides(exported_model)
    )
    assert code == 0, err  # some molecules were predicted
    assert "Traceback" not in err
    records = {record["smiles"]: record for record in json_lines(out)}
    target = target_of(exported_model)
    assert records["CCO"]["error"] is None and records["CCO"][target] is not None
    assert records["c1ccccc1O"]["error"] is None  # stray whitespace around a SMILES is fine
    assert records["C1CC"]["error"] == "unparsable SMILES (unclosed ring)"
    assert records[""]["error"] == "empty SMILES"
    assert "valence" in records["C(C)(C)(C)(C)C"]["error"]
    assert "max_atoms" in records[LONG_CHAIN]["error"]
    assert records["[Zz]"]["error"] is not None
    assert all(record[target] is None for record in records.values() if record["error"])


def test_salts_and_unknown_elements_are_predicted(exported_model: ExportedModel):
    """A salt is reduced to its largest organic fragment; an element outside the vocabulary
    falls into the featurizer's unknown slot instead of failing."""
    predictor = infer.local_predictor(exported_model.config)
    predictions = predictor.predict(["CC(=O)[O-].[Na+]", "CC(=O)[O-]", "[Xe]", "CC O"])
    assert predictions.errors[:3] == [None, None, None]
    assert predictions.values[0, 0] == predictions.values[1, 0]
    assert "whitespace" in predictions.errors[3]
    assert predictions.unknown_elements == [(), (), ("Xe",), ()]


def test_unknown_elements_are_predicted_with_a_note(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    code, out, err = run_cli(
        capsys, "infer", "--smiles", "CCO,C[U]C", *local_overrides(exported_model)
    )
    assert code == 0
    assert [record["error"] for record in json_lines(out)] == [None, None]
    assert "infer: 'C[U]C': U is not among the model's elements" in err
    assert "'CCO'" not in err
    written, err = infer_text(
        capsys, exported_model, tmp_path / "in.smi", "CCO\nC1CC\nC[Gd]\nC[U]C\n"
    )
    assert [bool(row["error"]) for row in written] == [False, True, False, False]
    assert "warning: 2 molecules hold elements the model does not know (first: data row 3)" in err
    assert "Gd, U are not among the model's elements" in err


def test_only_invalid_smiles_exits_non_zero(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture
):
    code, out, err = run_cli(
        capsys, "infer", "--smiles", "C1CC,not_a_smiles", *local_overrides(exported_model)
    )
    assert code == 1
    assert [record["error"] is not None for record in json_lines(out)] == [True, True]
    assert "Traceback" not in err


def test_a_file_name_given_as_smiles_gets_a_hint(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture
):
    code, out, err = run_cli(
        capsys, "infer", "--smiles", "molecules.csv,CCO", *local_overrides(exported_model)
    )
    assert code == 0  # CCO was predicted
    assert [record["error"] is None for record in json_lines(out)] == [False, True]
    assert "'molecules.csv' looks like a file name" in err
    assert "--input molecules.csv --output predictions.csv" in err
    assert "CCO" not in err  # no hint for a molecule that worked


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--smiles", "CCO", "--smiles", "CCC"], "more than once"),
        (["--smiles", "CCO", "--bogus", "1"], "unknown option '--bogus'"),
        (["--smiles", "CCO", "c1ccccc1"], "not a config override"),
        ([], "nothing to predict"),
        (["--smiles", "CCO", "--input", "x.csv", "--output", "y.csv"], "not both"),
        (["--input", "x.csv"], "--input needs --output"),
        (["--smiles", "CCO", "infer.no_such_key=1"], "configuration"),
    ],
)
def test_unusable_requests_exit_2_with_a_message(
    exported_model: ExportedModel,
    capsys: pytest.CaptureFixture,
    args: list[str],
    message: str,
):
    code, out, err = run_cli(capsys, "infer", *args, *local_overrides(exported_model))
    assert code == 2
    assert message in err
    assert out == "" and "Traceback" not in err


# --- files --------------------------------------------------------------------------------------


def write_table(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ","):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def infer_file(
    capsys: pytest.CaptureFixture, source: Path, output: Path, *overrides: str
) -> tuple[int, str, str]:
    """`mol_props infer --input SOURCE --output OUTPUT OVERRIDES...` (see run_cli)."""
    return run_cli(capsys, "infer", "--input", str(source), "--output", str(output), *overrides)


def infer_text(
    capsys: pytest.CaptureFixture,
    exported_model: ExportedModel,
    source: Path,
    text: str,
    *overrides: str,
) -> tuple[list[dict[str, str]], str]:
    """Write `text` to `source` and predict it into preds.csv beside it, which must succeed:
    the rows written, and stderr."""
    source.write_text(text)
    output = source.with_name("preds.csv")
    code, _, err = infer_file(capsys, source, output, *local_overrides(exported_model), *overrides)
    assert code == 0, err
    return read_rows(output), err


def test_csv_file_keeps_every_row_and_column_in_order(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    target = target_of(exported_model)
    molecules = [row["SMILES"] for row in b3db_rows(30)]
    smiles = molecules[:10] + ["C1CC", "", LONG_CHAIN] + molecules[10:]
    rows = [[f"id{i}", text, str(i % 2)] for i, text in enumerate(smiles)]
    # B3DB spells the column "SMILES": found although infer.smiles_column is "smiles". The third
    # column holds true labels under the target's own name: kept, predictions go beside it.
    source = write_table(tmp_path / "in.csv", ["id", "SMILES", target], rows)
    output = tmp_path / "out" / "preds.csv"
    code, out, err = run_cli(
        capsys,
        "infer",
        "--input",
        str(source),
        "--output",
        str(output),
        *local_overrides(exported_model),
        "infer.chunk_size=7",  # several chunks
    )
    assert code == 0, err
    written = read_rows(output)
    predicted = f"mol_props_{target}"
    assert list(written[0]) == ["id", "SMILES", target, predicted, "error"]
    assert f"the input has a column {target!r}; writing {predicted!r}" in err
    assert [[row["id"], row["SMILES"], row[target]] for row in written] == rows
    failed = [row for row in written if row["error"]]
    assert [row["SMILES"] for row in failed] == ["C1CC", "", LONG_CHAIN]
    assert all(row[predicted] == "" for row in failed)
    expected = infer.local_predictor(exported_model.config).predict(molecules)
    values = [float(row[predicted]) for row in written if not row["error"]]
    np.testing.assert_allclose(values, expected.values[:, 0], atol=1e-5)
    assert f"{len(molecules)} ok, 3 failed -> {output}" in err
    assert out == ""  # stdout stays free for --smiles JSON


def test_smi_file_with_names_and_a_header(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    written, err = infer_text(
        capsys,
        exported_model,
        tmp_path / "in.smi",
        "SMILES Name\nCCO ethanol\nc1ccccc1\tbenzene\nC1CC broken ring\n\n",
    )
    assert [(row["smiles"], row["name"]) for row in written] == [
        ("CCO", "ethanol"),
        ("c1ccccc1", "benzene"),
        ("C1CC", "broken ring"),
        ("", ""),
    ]
    assert [bool(row["error"]) for row in written] == [False, False, True, True]
    assert "2 ok, 2 failed" in err


def test_header_only_file_gives_a_header_only_output(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    source = write_table(tmp_path / "in.tsv", ["smiles", "note"], [], delimiter="\t")
    output = tmp_path / "preds.csv"
    code, _, err = run_cli(
        capsys, "infer", "--input", str(source), "--output", str(output), *exported_model.overrides
    )
    assert code == 0, err
    target = target_of(exported_model)
    assert output.read_text().strip() == f"smiles,note,{target},error"
    assert "0 ok, 0 failed" in err


def test_input_encoding_is_configurable_and_output_is_utf8(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    source = tmp_path / "excel.csv"
    source.write_bytes("smiles,name\nCCO,\u00e9thanol\n".encode("cp1252"))
    output = tmp_path / "preds.csv"
    overrides = local_overrides(exported_model)
    code, _, err = infer_file(capsys, source, output, *overrides)
    assert code == 2 and not output.exists()
    assert "it is not utf-8 text (it holds the byte 0xe9)" in err
    assert "infer.encoding=cp1252" in err
    code, _, err = infer_file(capsys, source, output, *overrides, "infer.encoding=cp1252")
    assert code == 0, err
    assert output.read_text(encoding="utf-8").splitlines()[1].startswith("CCO,\u00e9thanol,")
    code, _, err = infer_file(capsys, source, output, *overrides, "infer.encoding=no-such-codec")
    assert code == 2 and "infer.encoding=no-such-codec: not a text encoding" in err
    # A UTF-8 byte-order mark, as spreadsheet programs write, is not part of the first column name.
    marked = tmp_path / "marked.csv"
    marked.write_text("\ufeffsmiles,name\nCCO,ethanol\n", encoding="utf-8")
    code, _, err = infer_file(capsys, marked, output, *overrides)
    assert code == 0, err
    assert read_rows(output)[0]["smiles"] == "CCO"


def test_cells_beyond_the_header_are_reported_not_silently_dropped(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    written, err = infer_text(
        capsys,
        exported_model,
        tmp_path / "in.csv",
        "smiles,id\nCCO,1\nc1ccccc1,2,extra,more\nCC(=O)O\nCCN,4,x\n",
    )
    assert [(row["smiles"], row["id"]) for row in written] == [
        ("CCO", "1"),
        ("c1ccccc1", "2"),
        ("CC(=O)O", ""),  # a short row: its missing cells stay empty
        ("CCN", "4"),
    ]
    assert "warning: 2 rows have more cells than the header (first: data row 2)" in err


def test_blank_lines_are_not_rows_and_the_summary_says_they_were_skipped(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    # A blank line before the header (skipped, unreported), blank lines 4, 9 and 11
    # among and after the rows, and a quoted cell (lines 6-8) whose value holds an empty line.
    text = '\nsmiles,id\nCCO,1\n\nc1ccccc1,2\nCCN,"a\n\nb"\n\nCC(=O)O,4\n\n'
    written, err = infer_text(
        capsys, exported_model, tmp_path / "in.csv", text, "infer.chunk_size=2"
    )
    assert [(row["smiles"], row["id"]) for row in written] == [
        ("CCO", "1"),
        ("c1ccccc1", "2"),
        ("CCN", "a\n\nb"),
        ("CC(=O)O", "4"),
    ]
    assert not any(row["error"] for row in written)
    assert "4 ok, 0 failed" in err
    assert "note: skipped 3 blank lines (first: line 4)" in err


def test_a_cell_longer_than_the_csv_modules_limit_fails_nothing(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    # Python's csv module refuses any field over 128 KiB unless told otherwise; a long note in
    # another column used to fail the whole file.
    notes = "x" * 200_000
    rows = [["CCO", notes], ["c1ccccc1", "short"]]
    source = write_table(tmp_path / "in.csv", ["smiles", "notes"], rows)
    output = tmp_path / "preds.csv"
    code, _, err = infer_file(capsys, source, output, *local_overrides(exported_model))
    assert code == 0, err
    written = read_rows(output)
    assert [[row["smiles"], row["notes"], row["error"]] for row in written] == [
        ["CCO", notes, ""],
        ["c1ccccc1", "short", ""],
    ]
    assert "2 ok, 0 failed" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("in.csv", "id,structure\n1,CCO\n", "has no column 'smiles'"),
        ("in.csv", "smiles;id\nCCO;1\n", "one column only, is it not comma-separated?"),
        ("in.csv", "", "is empty"),
        ("in.csv", b"smiles\n\xff\xfe\x00CCO\n", "cannot read"),
        ("in.sdf", "CCO\n", "unsupported file type .sdf"),
        ("missing.csv", None, "does not exist"),
        ("in.csv.gz", "smiles\nCCO\n", "cannot read {source} as gzip: Not a gzipped file"),
        (
            "in.csv.gz",
            gzip.compress(b"smiles\n" + b"CCO\n" * 5000)[:-20],  # a download cut short
            "as gzip: Compressed file ended before the end-of-stream marker",
        ),
    ],
)
def test_bad_input_files_exit_2_and_leave_no_output(
    exported_model: ExportedModel,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    name: str,
    content: str | bytes | None,
    message: str,
):
    source = tmp_path / name
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif content is not None:
        source.write_text(content)
    output = tmp_path / "preds.csv"
    code, out, err = run_cli(
        capsys, "infer", "--input", str(source), "--output", str(output), *exported_model.overrides
    )
    assert code == 2
    assert message.format(source=source) in err and "Traceback" not in err
    assert not output.exists()
    assert list(tmp_path.glob(".*partial")) == []


@pytest.mark.parametrize("output_name", ["preds.csv.gz", "preds.tsv.gz"])
def test_gzip_compressed_inputs_and_outputs(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path, output_name: str
):
    table = tmp_path / "in.tsv.gz"
    table.write_bytes(gzip.compress(b"id\tsmiles\n1\tCCO\n2\tC1CC\n3\tc1ccccc1\n"))
    molecules = tmp_path / "in.smi.gz"
    molecules.write_bytes(gzip.compress(b"CCO ethanol\nC1CC broken\nc1ccccc1 benzene\n"))
    expected = infer.local_predictor(exported_model.config).predict(["CCO", "c1ccccc1"])
    delimiter = "\t" if output_name.endswith(".tsv.gz") else ","
    for source, name_column in ((table, "id"), (molecules, "name")):
        output = tmp_path / output_name
        code, _, err = infer_file(capsys, source, output, *local_overrides(exported_model))
        assert code == 0, err
        with gzip.open(output, "rt", newline="") as handle:
            written = list(csv.DictReader(handle, delimiter=delimiter))
        assert [bool(row["error"]) for row in written] == [False, True, False]
        assert [row[name_column] for row in written][0] in ("1", "ethanol")
        values = [float(row[target_of(exported_model)]) for row in written if not row["error"]]
        np.testing.assert_allclose(values, expected.values[:, 0], atol=1e-5)


def test_output_may_not_overwrite_the_input(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    source = write_table(tmp_path / "in.csv", ["smiles"], [["CCO"]])
    code, _, err = run_cli(
        capsys, "infer", "--input", str(source), "--output", str(source), *exported_model.overrides
    )
    assert code == 2 and "overwrite the input" in err
    assert source.read_text().splitlines() == ["smiles", "CCO"]


def test_an_output_that_cannot_be_written_is_named(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    source = write_table(tmp_path / "in.csv", ["smiles"], [["CCO"]])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output = blocker / "preds.csv"  # a folder that cannot exist: a file has its name
    code, _, err = infer_file(capsys, source, output, *exported_model.overrides)
    assert code == 2 and f"cannot write --output {output}:" in err
    assert "partial" not in err  # the hidden file written first is not the user's concern


def test_output_format_follows_its_suffix(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    """.tsv is written tab-separated, like a .tsv input is read; a suffix that promises another
    format is refused before the model loads, instead of getting comma-separated text."""
    source = write_table(
        tmp_path / "in.csv", ["smiles", "name"], [["CCO", "ethanol"], ["C1CC", ""]]
    )
    output = tmp_path / "preds.tsv"
    code, _, err = run_cli(
        capsys, "infer", "--input", str(source), "--output", str(output), *exported_model.overrides
    )
    assert code == 0, err
    with output.open(newline="") as handle:
        written = list(csv.DictReader(handle, delimiter="\t"))
    assert [(row["smiles"], row["name"], bool(row["error"])) for row in written] == [
        ("CCO", "ethanol", False),
        ("C1CC", "", True),
    ]
    for name in ("preds.json", "preds"):
        code, _, err = infer_file(capsys, source, tmp_path / name, *exported_model.overrides)
        assert code == 2 and "name a .csv or .tsv file" in err
        assert not (tmp_path / name).exists()


def test_reading_streams_in_chunks(tmp_path: Path):
    source = write_table(tmp_path / "in.csv", ["smiles"], [["C" * (i + 1)] for i in range(10)])
    chunks = list(read_smiles_file(source, "smiles", chunk_size=4))
    assert [len(chunk.rows) for chunk in chunks] == [4, 4, 2]
    assert chunks[2].smiles == ["C" * 9, "C" * 10]


# --- buckets -----------------------------------------------------------------------------------


def test_a_model_exported_before_the_kernel_fingerprint_existed_still_loads(
    exported_model: ExportedModel,
):
    metadata = ModelMetadata.load(exported_model.metadata_path)
    older = dataclasses.replace(
        metadata,
        preprocess={
            name: value
            for name, value in metadata.preprocess.items()
            if name != "kernel_fingerprint"
        },
    )
    assert older.preprocess_config().kernel_fingerprint.size == 0  # the setting off
    assert older.featurizer().descriptor_size == metadata.descriptor_size


def test_predictions_identical_across_atom_buckets(exported_model: ExportedModel):
    """Padding to 32/64/128 by size, all to 128, or the fixed-shape Triton model: same numbers."""
    smiles = [row["SMILES"] for row in b3db_rows(400)]
    metadata = ModelMetadata.load(exported_model.metadata_path)
    config = exported_model.config.infer
    predictors = {
        "buckets": LocalPredictor(
            exported_model.dynamic_onnx_path,
            metadata,
            dataclasses.replace(config, atom_buckets=[32, 64, 128]),
        ),
        "all 128": LocalPredictor(
            exported_model.dynamic_onnx_path,
            metadata,
            dataclasses.replace(config, atom_buckets=[128]),
        ),
        "fixed model.onnx": LocalPredictor(exported_model.onnx_path, metadata, config),
    }
    results = {name: predictor.predict(smiles) for name, predictor in predictors.items()}
    assert predictors["buckets"].buckets == [32, 64, 128]
    assert predictors["fixed model.onnx"].buckets == [metadata.max_atoms]
    # Every bucket is exercised: molecules of <= 32, 33-64 and > 64 heavy atoms.
    sizes = [
        graph.num_atoms
        for graph in predictors["buckets"].featurizer.featurize_many(smiles)
        if not isinstance(graph, Exception)
    ]
    assert min(sizes) <= 32 and any(32 < size <= 64 for size in sizes) and max(sizes) > 64
    reference = results["buckets"]
    for name, result in results.items():
        assert result.errors == reference.errors, name
        valid = ~np.isnan(reference.values)
        assert np.array_equal(valid, ~np.isnan(result.values)), name
        difference = np.max(np.abs(result.values[valid] - reference.values[valid]))
        assert difference <= BUCKET_TOLERANCE, f"{name}: max |diff| {difference:.2e}"


# --- fresh processes: imports, workers ----------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    import concurrent.futures

    heavy = json.loads(sys.argv[1])
    sys.argv = ["mol_props", "infer", *json.loads(sys.argv[2])]
    pools = []  # the worker count of every process pool started

    class CountingPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, max_workers=None, *args, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers, *args, **kwargs)

    concurrent.futures.ProcessPoolExecutor = CountingPool
    from mol_props import commands
    try:
        commands.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    loaded = sorted(name for name in heavy if name in sys.modules)
    report = {"code": code, "heavy": loaded, "pools": pools}
    print("PROBE " + json.dumps(report), file=sys.stderr)
    """
)


def probe(args: list[str], cache: Path) -> tuple[dict, subprocess.CompletedProcess]:
    """Run `mol_props infer ARGS` in a fresh interpreter; report exit code and heavy imports."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HEAVY_MODULES), json.dumps(args)],
        cwd=REPO_ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("PROBE ")]
    assert lines, result.stderr
    return json.loads(lines[-1][len("PROBE ") :]), result


def test_smiles_mode_never_imports_torch(exported_model: ExportedModel, config_cache: Path):
    # Twice: the first run composes the config with Hydra, the second reads the cached one.
    for _ in range(2):
        report, result = probe(["--smiles", "CCO", *exported_model.overrides], config_cache)
        assert report == {"code": 0, "heavy": [], "pools": []}, result.stderr
        (record,) = json_lines(result.stdout)
        assert record["smiles"] == "CCO" and record["error"] is None


def test_file_mode_with_worker_processes_never_imports_torch(
    exported_model: ExportedModel, config_cache: Path, tmp_path: Path
):
    """Several chunks over two worker processes: same rows, same order, same numbers as one
    process, and still no torch."""
    smiles = [row["SMILES"] for row in b3db_rows(150)] + ["C1CC"]
    source = write_table(
        tmp_path / "in.csv", ["n", "smiles"], [[str(i), text] for i, text in enumerate(smiles)]
    )
    outputs = {}
    for workers in (1, 2):
        outputs[workers] = tmp_path / f"preds-{workers}.csv"
        args = ["--input", str(source), "--output", str(outputs[workers])]
        overrides = [f"infer.num_workers={workers}", "infer.chunk_size=16"]
        report, result = probe([*args, *exported_model.overrides, *overrides], config_cache)
        pools = [] if workers == 1 else [workers]
        assert report == {"code": 0, "heavy": [], "pools": pools}, result.stderr
        assert f"{len(smiles) - 1} ok, 1 failed" in result.stderr
    single, pooled = read_rows(outputs[1]), read_rows(outputs[2])
    assert [row["n"] for row in pooled] == [str(i) for i in range(len(smiles))]
    target = target_of(exported_model)
    for one, other in zip(single, pooled):
        assert one["error"] == other["error"]
        if one[target]:
            assert float(one[target]) == pytest.approx(float(other[target]), abs=1e-5)


def test_a_damaged_model_is_a_clear_error_also_in_worker_processes(
    exported_model: ExportedModel,
    capsys: pytest.CaptureFixture,
    config_cache: Path,
    tmp_path: Path,
):
    models = tmp_path / "models"
    shutil.copytree(exported_model.models_dir, models)
    model = models / "model_dynamic_atoms.onnx"
    model.write_bytes(model.read_bytes()[:1000])  # an interrupted copy
    overrides = [
        *exported_model.overrides,
        f"infer.model_path={model}",
        f"infer.metadata_path={models / 'model.json'}",
    ]
    code, out, err = run_cli(capsys, "infer", "--smiles", "CCO", *overrides, "infer.num_workers=1")
    assert code == 2 and out == ""
    assert f"cannot load the model {model}" in err and "Traceback" not in err

    rows = [[text] for text in ["CCO", "c1ccccc1", "CC(=O)O", "CCN"] * 10]
    source = write_table(tmp_path / "in.csv", ["smiles"], rows)
    output = tmp_path / "preds.csv"
    report, result = probe(
        ["--input", str(source), "--output", str(output), *overrides]
        + ["infer.num_workers=2", "infer.chunk_size=8"],
        config_cache,
    )
    assert report["code"] == 2 and report["pools"] == [2], result.stderr
    assert f"cannot load the model {model}" in result.stderr
    assert "Traceback" not in result.stderr and not output.exists()


# --- the composed-config cache -------------------------------------------------------------------


def test_cached_config_equals_a_fresh_composition(config_cache: Path):
    overrides = ["infer.batch_size=17", "model.hidden_dim=40"]
    first = compose_config_cached(overrides)
    entries = list((config_cache / "mol_props").glob("config-*.json"))
    assert entries, "the composed config was not cached"
    second = compose_config_cached(overrides)  # read back from the cache
    assert first == second == compose_config(overrides)
    assert second.infer.batch_size == 17
    for entry in entries:
        entry.write_text("{not json")  # a damaged entry is recomposed, not trusted
    assert compose_config_cached(overrides) == first


def test_a_setting_read_from_the_environment_is_never_cached(
    config_cache: Path, monkeypatch: pytest.MonkeyPatch
):
    overrides = ["infer.model_path=${oc.env:MOL_PROPS_TEST_MODEL}"]
    monkeypatch.setenv("MOL_PROPS_TEST_MODEL", "first.onnx")
    assert compose_config_cached(overrides).infer.model_path == "first.onnx"
    monkeypatch.setenv("MOL_PROPS_TEST_MODEL", "second.onnx")
    assert compose_config_cached(overrides).infer.model_path == "second.onnx"
    # A reference to another setting depends on the files alone: cached, and resolved.
    before = set((config_cache / "mol_props").glob("config-*.json"))
    config = compose_config_cached(["train.models_dir=elsewhere"])
    assert config.infer.model_path == "elsewhere/model_dynamic_atoms.onnx"
    assert set((config_cache / "mol_props").glob("config-*.json")) - before


def test_config_missing_marker_matches_omegaconf():
    import omegaconf

    from mol_props import config

    assert config.MISSING == omegaconf.MISSING


def test_bad_override_is_a_clear_error():
    with pytest.raises(InferenceError, match="configuration"):
        compose_config_cached(["infer.batch_size=lots"])


# --- a model from DVC, or a message saying how to make one ---------------------------------------


def test_no_model_anywhere_names_the_commands_that_make_one(
    exported_model: ExportedModel, capsys: pytest.CaptureFixture, tmp_path: Path
):
    empty = tmp_path / "models"
    code, out, err = run_cli(
        capsys,
        "infer",
        "--smiles",
        "CCO",
        *exported_model.overrides,
        f"train.models_dir={empty}",
        f"infer.model_path={empty / 'model_dynamic_atoms.onnx'}",
        f"infer.metadata_path={empty / 'model.json'}",
    )
    assert code == 2 and out == ""
    assert "mol_props train" in err and "mol_props export" in err
    assert "Traceback" not in err


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_fresh_clone_pulls_the_model_from_the_dvc_remote(
    exported_model: ExportedModel, config_cache: Path, tmp_path: Path
):
    """A repository whose exported model was `dvc push`ed: its clone infers without training."""
    from dvc.repo import Repo

    origin, storage, clone = tmp_path / "origin", tmp_path / "storage", tmp_path / "clone"
    origin.mkdir()
    shutil.copytree(exported_model.models_dir, origin / "models")
    git("init", "-q", cwd=origin)
    Repo.init(str(origin)).close()
    (origin / ".dvc" / "config").write_text(
        f"[core]\n    remote = local\n['remote \"local\"']\n    url = {storage}\n"
    )
    with Repo(str(origin)) as repo:
        repo.add(str(origin / "models"))
        repo.push()
    git("add", "-A", cwd=origin)
    git("commit", "-q", "-m", "model in DVC", cwd=origin)
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert (clone / "models.dvc").is_file() and not (clone / "models").exists()

    result = run_process(
        [
            "infer",
            "--smiles",
            "CCO",
            *exported_model.overrides,
            "data.dvc.enabled=true",
            "train.models_dir=models",  # relative: the clone is the working directory
            "infer.model_path=models/model_dynamic_atoms.onnx",
            "infer.metadata_path=models/model.json",
        ],
        cwd=clone,
        env={"XDG_CACHE_HOME": str(config_cache)},
    )
    assert result.returncode == 0, result.stderr
    assert "pulled" in result.stderr
    (record,) = json_lines(result.stdout)  # nothing but predictions on stdout
    expected = infer.local_predictor(exported_model.config).predict(["CCO"]).values[0, 0]
    target = target_of(exported_model)
    assert record[target] == pytest.approx(float(expected), abs=1e-6)
    assert (
        clone / "models" / "model.json"
    ).read_text() == exported_model.metadata_path.read_text()
