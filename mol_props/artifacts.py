"""DVC: pull, add, push and verify the files the project versions (raw data, exported models).

`dvc` is imported only inside these functions: inference reaches here only when its model is
missing, and must otherwise stay light.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

from mol_props.config import Config, DvcConfig
from mol_props.errors import MolPropsError


class ArtifactError(MolPropsError, RuntimeError):
    """A versioned file that cannot be found, fetched or verified; the message says what to do."""


def md5_of(path: Path) -> str:
    """The md5 DVC 3 records for a file: of its raw bytes."""
    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_file_for(path: Path) -> Path:
    return path.with_name(path.name + ".dvc")


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 a committed `.dvc` file records for its (single-file) output, if any."""
    if not dvc_file.is_file():
        return None
    import yaml

    outputs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    return outputs[0].get("md5") if outputs else None


def is_intact(path: Path) -> bool:
    """True when `path` exists and matches the hash its `.dvc` file recorded (if one exists)."""
    if not path.is_file():
        return False
    expected = recorded_md5(dvc_file_for(path))
    return expected is None or md5_of(path) == expected


def find_repo_root(start: Path) -> Path | None:
    """The nearest directory holding `.dvc/` at or above `start`."""
    for directory in [start.resolve(), *start.resolve().parents]:
        if (directory / ".dvc").is_dir():
            return directory
    return None


def _open_repo(settings: DvcConfig, near: Path):
    from dvc.repo import Repo

    root = find_repo_root(near if near.is_dir() else near.parent)
    if root is None:
        raise ArtifactError(f"no DVC repository (.dvc/) at or above {near.resolve()}")
    remote_config = {"url": settings.remote_url} if settings.remote_url else None
    return Repo(str(root), remote=settings.remote, remote_config=remote_config)


def dvc_pull(targets: Sequence[Path], settings: DvcConfig) -> None:
    """`dvc pull` the given `.dvc` files (force: a corrupt local copy is replaced)."""
    repo = _open_repo(settings, targets[0])
    with repo:
        repo.pull(targets=[str(Path(target).resolve()) for target in targets], force=True)


def dvc_add_and_push(paths: Sequence[Path], settings: DvcConfig) -> list[Path]:
    """`dvc add` then `dvc push` each path; returns the `.dvc` files to commit."""
    repo = _open_repo(settings, paths[0])
    with repo:
        resolved = [str(Path(path).resolve()) for path in paths]
        repo.add(resolved)
        try:
            repo.push(targets=resolved)
        except Exception as error:  # dvc raises many types; all mean "not pushed"
            where = f"remote {settings.remote!r}"
            if settings.remote_url:
                where += f" at {settings.remote_url}"
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ArtifactError(
                f"DVC could not push {', '.join(map(str, paths))} to {where} ({reason}); "
                "check data.dvc.remote and data.dvc.remote_url (remotes are in .dvc/config)"
            ) from error
    return [dvc_file_for(Path(path)) for path in paths]


def pull_models(config: Config, needed: Sequence[Path]) -> None:
    """Fetch the exported model from the DVC remote, or say which commands make one.

    A fresh clone of a repository whose `models.dvc` was committed (and pushed with `dvc push`)
    can run `mol_props infer` without training. Progress goes to stderr: `--smiles` prints JSON
    lines on stdout, and nothing else may land there."""
    models_dir = Path(config.train.models_dir)
    dvc_file = dvc_file_for(models_dir)
    make_one = (
        "make one with `uv run mol_props train` (it trains and exports), or "
        f"`uv run mol_props export` if {models_dir / 'best.ckpt'} exists"
    )
    missing = ", ".join(str(path) for path in needed if not Path(path).is_file())
    if not dvc_file.is_file():
        raise ArtifactError(
            f"no model at {missing} and no {dvc_file} to pull it with DVC; {make_one}"
        )
    if not config.data.dvc.enabled:
        raise ArtifactError(
            f"no model at {missing}; {dvc_file} exists but DVC is off (data.dvc.enabled=false): "
            f"run `dvc pull {dvc_file}`, or {make_one}"
        )
    print(
        f"model: {missing} not here; pulling {dvc_file} from the DVC remote ...", file=sys.stderr
    )
    try:
        dvc_pull([dvc_file], config.data.dvc)
    except ImportError as error:
        raise ArtifactError(
            f"no model at {missing}; pulling it needs dvc (`pip install 'mol_props[train]'`); "
            f"or {make_one}"
        ) from error
    except Exception as error:  # dvc raises many types; all mean "could not pull"
        raise ArtifactError(
            f"no model at {missing} and DVC could not pull {dvc_file} ({error}); {make_one}"
        ) from error
    still_missing = [str(path) for path in needed if not Path(path).is_file()]
    if still_missing:
        raise ArtifactError(f"DVC pulled {dvc_file} but {', '.join(still_missing)} is missing")
    print(f"model: pulled {models_dir} from the DVC remote", file=sys.stderr)
