"""The command line's error boundary: a failure the user can act on is one line, exit status 2."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from mol_props import commands
from mol_props.commands import USAGE_ERROR, check_arguments
from mol_props.config import compose_config
from mol_props.errors import UsageError
from tests.conftest import REPO_ROOT, run_cli, run_process, workspace_overrides, write_molecule_csv


def run_in_workspace(
    capsys: pytest.CaptureFixture, root: Path, command: str, *extra: str
) -> tuple[int, str, str]:
    """`mol_props COMMAND` on 10 real molecules, every path inside `root`."""
    data = write_molecule_csv(root / "molecules.csv", 10)
    return run_cli(capsys, command, *workspace_overrides(root, data), *extra)


def test_help_lists_every_command():
    """`mol_props --help` is where a new user looks first (fire shows the constructor's help,
    without the commands, when given the class instead of an instance)."""
    result = run_process(["--help"])
    assert result.returncode == 0, result.stderr
    # fire writes its help to stderr when that is not a terminal.
    listed = (result.stdout + result.stderr).split("COMMANDS", 1)[-1].split()
    for command in ("train", "export", "infer", "serve", "download_data"):
        assert command in listed


def test_train_help_examples_are_overrides_that_compose():
    """The examples `mol_props train --help` shows are real settings, written as a shell takes
    them (a renamed setting would otherwise leave the help showing one that fails)."""
    help_text = commands.Commands.train.__doc__
    examples = help_text.split("OVERRIDES are Hydra settings", 1)[1].splitlines()[1:]
    assert len(examples) >= 4
    for line in examples:
        overrides = shlex.split(line.split("   ")[0].strip())  # the text before the comment
        compose_config(overrides)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.hidden_dim=abc", "model.hidden_dim"),  # OmegaConf: wrong type
        ("data=nonexistent", "data/nonexistent"),  # Hydra: unknown config group option
        ("model.conv=foo", "model.conv='foo'"),  # ours: a value outside the allowed choices
    ],
)
def test_a_bad_config_is_one_error_line_without_a_traceback(override: str, named: str):
    result = run_process(["train", override])
    assert result.returncode == USAGE_ERROR, result.stderr
    assert result.stderr.startswith("error: ") and named in result.stderr
    assert "Traceback" not in result.stderr


def test_train_on_a_missing_table_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "missing.csv"
    overrides = workspace_overrides(tmp_path, missing)
    code, _, err = run_cli(capsys, "train", *overrides, "train.export_after=false")
    assert code == USAGE_ERROR
    assert f"error: data file {missing} is missing" in err


def test_train_checks_the_triton_repository_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # workspace_overrides point serving.triton_repo at an empty directory: not a model repository.
    code, _, err = run_in_workspace(capsys, tmp_path, "train")
    assert code == USAGE_ERROR
    assert f"is {tmp_path / 'triton_repo'} the Triton repo?" in err
    assert not (tmp_path / "checkpoints").exists()  # refused before any training


def test_export_checks_the_triton_repository_before_exporting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # No checkpoint either: the repository is named first, before anything is read or written.
    code, _, err = run_in_workspace(capsys, tmp_path, "export")
    assert code == USAGE_ERROR
    assert f"is {tmp_path / 'triton_repo'} the Triton repo?" in err
    assert not (tmp_path / "models").exists()


def test_export_without_a_checkpoint_says_to_train_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # a real repository
    code, _, err = run_in_workspace(capsys, tmp_path, "export")
    assert code == USAGE_ERROR
    assert f"no checkpoint at {tmp_path / 'models' / 'best.ckpt'}" in err
    assert "mol_props train" in err


def test_download_data_into_an_impossible_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "download_data", f"data.path={blocker / 'raw' / 'table.tsv'}")
    assert code == USAGE_ERROR
    assert err.startswith("error: ") and str(blocker) in err


def test_a_bug_keeps_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    from mol_props import train

    def broken_run(config):
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(train, "run", broken_run)
    with pytest.raises(ZeroDivisionError):
        run_in_workspace(capsys, tmp_path, "train", "train.export_after=false")


def test_user_errors_are_the_projects_own_and_the_config_libraries():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    from mol_props.errors import ConfigError
    from mol_props.infer import InferenceError

    for error in (
        ConfigError("model.conv='x'"),
        InferenceError("no model"),
        FileNotFoundError("x"),
        ConfigCompositionException("x"),
        ValidationError("x"),
    ):
        assert commands._is_user_error(error, ()), error
    assert not commands._is_user_error(ZeroDivisionError(), ())
    assert not commands._is_user_error(RuntimeError(), ())
    assert commands._is_user_error(RuntimeError(), (RuntimeError,))


def test_an_option_the_command_does_not_take_stops_it_before_it_runs():
    """fire would train a whole default run and only then say "Could not consume arg"."""
    result = run_process(["train", "--max_epochs", "3"])
    assert result.returncode == USAGE_ERROR, result.stderr
    assert result.stderr.startswith("error: mol_props train: unknown option '--max_epochs'")
    assert "train.max_epochs=" in result.stderr  # the override the user meant
    assert "data:" not in result.stderr  # nothing ran: no data was even looked at


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["export", "--opset=11"], "export.opset="),
        (["train", "--hidden-dim", "8"], "model.hidden_dim="),
        (["download_data", "--force"], "unknown option '--force'"),
        (["infer", "--smiles", "CCO", "--batch", "8"], "takes --smiles, --input"),
        (["infer", "--smiles", "CCO", "--smiles=CC"], "more than once"),
    ],
)
def test_check_arguments_refuses(arguments: list[str], message: str):
    with pytest.raises(UsageError, match=message):
        check_arguments(arguments)


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["--help"],
        ["train", "--help"],
        ["train", "train.max_epochs=3", "~logging.run_name"],
        ["infer", "--smiles=CCO", "-o", "x.csv", "-i", "y.csv", "infer.batch_size=8"],
        ["infer", "--smiles", "CCO", "--", "--trace"],  # fire's own flags after "--"
    ],
)
def test_check_arguments_lets_through(arguments: list[str]):
    check_arguments(arguments)
