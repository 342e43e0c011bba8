"""mol_props.artifacts and the data path through DVC, in a throwaway git repository.

The round trip is the one a new team member lives through: a repository holding only the
committed `.dvc` files and an empty remote -> `ensure_data` falls back to `download_data` (the
qc-b3db package copy) and pushes to the remote -> a fresh `git clone` gets the data from the
remote, not from the package -> a corrupted copy is caught by its hash and fetched again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from mol_props import data
from mol_props.artifacts import (
    ArtifactError,
    dvc_file_for,
    dvc_pull,
    find_repo_root,
    is_intact,
    md5_of,
    recorded_md5,
)
from mol_props.config import DataConfig, compose_config
from tests.conftest import REPO_ROOT

# What a fresh clone of the project holds for DVC, relative to the repository root.
DVC_FILES = [
    ".dvcignore",
    ".dvc/.gitignore",
    "data/raw/.gitignore",
    *(f"data/raw/{name}.dvc" for name in data.B3DB_FILES),
]


def packaged_table(name: str) -> Path:
    spec = importlib.util.find_spec("B3DB")
    assert spec is not None and spec.origin is not None, "qc-b3db is a dependency of mol_props"
    return Path(spec.origin).parent / name


def flip_byte(path: Path, offset: int = 1000) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


# ----------------------------------------------------------------------------- hashes


def test_md5_of_matches_hashlib_across_blocks(tmp_path: Path):
    content = bytes(range(256)) * 10_000  # 2.5 MB: several of md5_of's 1 MiB blocks
    path = tmp_path / "blob.bin"
    path.write_bytes(content)
    assert md5_of(path) == hashlib.md5(content).hexdigest()


def test_committed_dvc_files_record_the_packaged_b3db_tables():
    for name in data.B3DB_FILES:
        dvc_file = REPO_ROOT / "data" / "raw" / f"{name}.dvc"
        assert dvc_file_for(REPO_ROOT / "data" / "raw" / name) == dvc_file
        assert recorded_md5(dvc_file) == md5_of(packaged_table(name)), name


def test_is_intact(tmp_path: Path):
    path = tmp_path / "table.tsv"
    assert not is_intact(path)  # missing
    path.write_text("smiles\tlabel\nCCO\t1\n")
    assert is_intact(path)  # no .dvc file: nothing to check against
    dvc_file_for(path).write_text(f"outs:\n- md5: {md5_of(path)}\n  path: table.tsv\n")
    assert is_intact(path)
    path.write_text("smiles\tlabel\nCCO\t0\n")
    assert not is_intact(path)
    assert recorded_md5(tmp_path / "absent.dvc") is None


def test_find_repo_root(tmp_path: Path):
    assert find_repo_root(REPO_ROOT / "data" / "raw") == REPO_ROOT
    (tmp_path / "project" / ".dvc").mkdir(parents=True)
    nested = tmp_path / "project" / "data" / "raw"
    nested.mkdir(parents=True)
    assert find_repo_root(nested) == tmp_path / "project"


def test_dvc_outside_a_repository_says_so(tmp_path: Path):
    stray = tmp_path / "table.tsv.dvc"
    stray.write_text("outs: []\n")
    settings = compose_config().data.dvc
    if find_repo_root(tmp_path) is not None:
        pytest.skip("the temporary directory lies inside a DVC repository")
    with pytest.raises(ArtifactError, match="no DVC repository"):
        dvc_pull([stray], settings)


# ----------------------------------------------------------------------------- DVC round trip


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def isolated_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """git and DVC that read no user or system settings and write only under tmp_path."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "mol_props tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "tests@mol-props.invalid")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "dvc-system"))


def make_project(root: Path, remote: Path, remote_name: str) -> Path:
    """A git repository with the project's committed DVC files and a local remote."""
    for relative in DVC_FILES:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / relative, root / relative)
    (root / ".dvc" / "config").write_text(
        f"[core]\n    remote = {remote_name}\n    autostage = false\n"
        f"['remote \"{remote_name}\"']\n    url = {remote}\n"
    )
    git("init", "--quiet", cwd=root)
    git("add", "--all", cwd=root)
    git("commit", "--quiet", "--message", "data: DVC files only", cwd=root)
    return root


def remote_holds(remote: Path, md5: str) -> bool:
    return (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def no_source_fetch(*args, **kwargs):
    raise AssertionError("fetched from the source although DVC should have provided the data")


def test_dvc_round_trip_in_a_fresh_clone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    isolated_tools: None,
):
    caplog.set_level(logging.INFO, logger="mol_props.data")
    classification: DataConfig = compose_config().data
    regression: DataConfig = compose_config(["data=b3db_regression"]).data
    assert classification.source == "b3db" and classification.dvc.enabled
    remote = tmp_path / "remote"
    remote.mkdir()
    origin = make_project(tmp_path / "origin", remote, classification.dvc.remote)
    table = Path(classification.path)  # relative to the repository root, like in the project
    expected = {
        name: recorded_md5(origin / "data" / "raw" / f"{name}.dvc") for name in data.B3DB_FILES
    }

    # 1. Empty remote: the pull fails, download_data() copies from qc-b3db and pushes both tables.
    monkeypatch.chdir(origin)
    assert data.ensure_data(classification) == table
    assert md5_of(origin / table) == expected[table.name]
    assert "fetching B3DB with download_data()" in caplog.text
    for name, md5 in expected.items():
        assert remote_holds(remote, md5), f"{name} was not pushed to the remote"
    # The committed .dvc files still describe the data: nothing new to commit.
    assert git("status", "--porcelain", "--", "data", cwd=origin) == ""

    # 2. A fresh clone: the data comes from the remote; fetching from the source would fail.
    clone = tmp_path / "clone"
    git("clone", "--quiet", str(origin), str(clone), cwd=tmp_path)
    assert not (clone / table).exists()
    monkeypatch.chdir(clone)
    monkeypatch.setattr(data, "_copy_from_package", no_source_fetch)
    monkeypatch.setattr(data, "_download_from_github", no_source_fetch)
    caplog.clear()
    assert data.ensure_data(classification) == table
    assert md5_of(clone / table) == expected[table.name]
    assert "pulled data/raw/B3DB_classification.tsv" in caplog.text
    regression_table = data.ensure_data(regression)
    assert md5_of(clone / regression_table) == expected[regression_table.name]

    # 3. A corrupted copy is caught by its hash and replaced.
    flip_byte(clone / table)
    assert not is_intact(clone / table)
    caplog.clear()
    assert data.ensure_data(classification) == table
    assert "does not match the hash" in caplog.text
    assert md5_of(clone / table) == expected[table.name]


def test_download_data_refuses_a_changed_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for name in data.B3DB_FILES:
        shutil.copyfile(REPO_ROOT / "data" / "raw" / f"{name}.dvc", raw / f"{name}.dvc")

    def copy_changed(name: str, destination: Path) -> bool:
        shutil.copyfile(packaged_table(name), destination)
        flip_byte(destination)
        return True

    monkeypatch.setattr(data, "_copy_from_package", copy_changed)
    settings = dataclasses.replace(compose_config().data.dvc, enabled=False)
    with pytest.raises(ArtifactError, match="the source changed"):
        data.download_data(raw, push=False, dvc=settings)


def test_a_remote_that_cannot_take_the_data_is_named_and_does_not_stop_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    isolated_tools: None,
):
    classification: DataConfig = compose_config().data
    remote = tmp_path / "remote"
    remote.mkdir()
    origin = make_project(tmp_path / "origin", remote, classification.dvc.remote)
    monkeypatch.chdir(origin)
    misnamed = dataclasses.replace(
        classification, dvc=dataclasses.replace(classification.dvc, remote="nosuch")
    )
    # The download_data command: pushing is its job, so the failure is an error that says where.
    with pytest.raises(ArtifactError, match="to remote 'nosuch'.*check data.dvc.remote"):
        data.download_data(Path(classification.path).parent, push=True, dvc=misnamed.dvc)
    # Training: the table is fetched and verified; the push failure is a warning.
    Path(classification.path).unlink()
    caplog.set_level(logging.INFO, logger="mol_props.data")
    assert data.ensure_data(misnamed) == Path(classification.path)
    assert is_intact(origin / classification.path)
    assert (
        "DVC could not push" in caplog.text and "going on with the downloaded copy" in caplog.text
    )
