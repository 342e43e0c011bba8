"""The `mol_props` command line: fire + Hydra's compose API.

    mol_props train [OVERRIDES...]          e.g. mol_props train model.hidden_dim=256
    mol_props export [OVERRIDES...]
    mol_props infer --smiles "CCO" [OVERRIDES...]   several: --smiles "CCO,c1ccccc1"
    mol_props infer --input mols.csv --output preds.csv [--server http://127.0.0.1:8000]
    mol_props serve [OVERRIDES...]
    mol_props download_data

Each command imports its heavy modules only when it runs: `infer` must never load torch.

A failure the user can act on (a bad config value or input, a missing file; see
mol_props/errors.py) ends a command with one `error: ...` line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import fire

from mol_props.config import Config, compose_config
from mol_props.errors import UsageError

USAGE_ERROR = 2  # exit status of a request that cannot run as given


def _is_user_error(error: Exception, also: tuple[type[Exception], ...]) -> bool:
    from mol_props.errors import MolPropsError

    if isinstance(error, (MolPropsError, OSError, *also)):
        return True
    # Hydra's and OmegaConf's own errors: an unknown config group or key, a value of the wrong
    # type. Imported only now: a cold `mol_props infer` reads a cached config without them.
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (HydraException, OmegaConfBaseException))


@contextlib.contextmanager
def reported_errors(*also: type[Exception]) -> Iterator[None]:
    """Turn an error a user can act on into `error: MESSAGE` on stderr and exit status 2."""
    try:
        yield
    except Exception as error:
        if not _is_user_error(error, also):
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None


def _setup(overrides: tuple[str, ...]) -> Config:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return compose_config([str(override) for override in overrides])


def _check_triton_repo(config: Config) -> None:
    """The model repository that export fills must be there, with its configs."""
    from mol_props.triton_repo import check_model_repository

    check_model_repository(Path(config.serving.triton_repo), config.export.triton_model_name)


# infer's options as fire accepts them (a unique first letter works as a short flag; -s is
# ambiguous between smiles and server, and fire refuses it itself). The other commands take
# config overrides only.
INFER_OPTIONS = ("--smiles", "--input", "-i", "--output", "-o", "--server")
HELP_OPTIONS = ("--help", "-h")


def check_arguments(arguments: Sequence[str]) -> None:
    """Refuse, before anything runs, what fire would run anyway and complain about only at the
    end (an unknown option: `mol_props train --max_epochs 3` trained a whole default run, then
    said "Could not consume arg") or silently drop (all but the last of repeated --smiles)."""
    if not arguments or arguments[0].startswith("-"):
        return
    command, rest = arguments[0], list(arguments[1:])
    if "--" in rest:  # after it come fire's own flags (--trace, --verbose, ...)
        rest = rest[: rest.index("--")]
    known = (INFER_OPTIONS if command == "infer" else ()) + HELP_OPTIONS
    for argument in rest:
        option = argument.split("=", 1)[0]
        if argument.startswith("-") and option not in known:
            takes = f"{', '.join(INFER_OPTIONS)} and " if command == "infer" else ""
            raise UsageError(
                f"mol_props {command}: unknown option {option!r}; it takes {takes}config "
                f"overrides KEY=VALUE{_override_hint(option)} (see `mol_props {command} --help`)"
            )
    smiles_options = [
        argument for argument in rest if argument == "--smiles" or argument.startswith("--smiles=")
    ]
    if len(smiles_options) > 1:
        raise UsageError(
            "--smiles given more than once; give several molecules as --smiles 'CCO,c1ccccc1'"
        )


def _override_hint(option: str) -> str:
    """`, e.g. train.max_epochs=...` for `--max_epochs` / `--max-epochs`, if a key ends so."""
    name = option.lstrip("-").replace("-", "_")
    if not name:
        return ""
    from mol_props.config import to_flat_dict

    matches = [key for key in to_flat_dict(compose_config([])) if key.rsplit(".", 1)[-1] == name]
    return f", e.g. {matches[0]}=..." if len(matches) == 1 else ""


def _check_infer_overrides(overrides: tuple[str, ...]) -> None:
    """A positional argument that is not KEY=VALUE is a molecule given the wrong way."""
    from mol_props.infer import InferenceError

    for override in overrides:
        if "=" not in str(override) and not str(override).startswith("~"):
            raise InferenceError(
                f"{override!r} is not a config override (KEY=VALUE); "
                "give several molecules as --smiles 'CCO,c1ccccc1'"
            )


class Commands:
    """Molecular property prediction: train, export, infer, serve."""

    def train(self, *overrides: str) -> None:
        """Train the GNN (fetching data with DVC), log to MLflow, export ONNX at the end.

        OVERRIDES are Hydra settings, KEY=VALUE; configs/ holds every one, with comments:
          train.max_epochs=5 model.hidden_dim=64      change values
          data=b3db_regression train=small_data       choose a group's option
          data=csv data.path=F.csv data.smiles_column=smiles data.target_columns=[y]
          'data.label_map={yes: 1, no: 0}'            text labels of a csv table
          train.resume=true                           continue an interrupted run"""
        with reported_errors():
            config = _setup(overrides)
            if config.train.export_after:
                # Checked now rather than by the export after minutes of training.
                _check_triton_repo(config)
            from mol_props import train
            from mol_props.metrics import MONITORED

            try:
                result = train.run(config)
            except KeyboardInterrupt:
                print(
                    "\ntraining interrupted; continue with: mol_props train train.resume=true",
                    file=sys.stderr,
                )
                raise SystemExit(130)
            if not result.is_global_zero:
                return  # another process of a DDP run: the first exports and reports
            if config.train.export_after:
                from mol_props import export

                export.run(config)
        metrics = ", ".join(f"{name}={value:.4f}" for name, value in result.test_metrics.items())
        refit = f", refit on train + val for {result.refit_epochs}" if result.refit_epochs else ""
        # The forest member's run: the main metric of each member alone, after the blend's.
        members = "".join(
            f", {member}_{name}={value:.4f}"
            for member, member_metrics in result.member_test_metrics.items()
            for name, value in member_metrics.items()
            if name == MONITORED[config.data.task][0]
        )
        print(
            f"done: {result.epochs_run} epochs (best {result.best_epoch}){refit}; "
            f"test {metrics or '(no test split)'}{members}; "
            f"model {result.checkpoint}; plots {result.run_directory}"
        )

    def export(self, *overrides: str) -> None:
        """Export models/best.ckpt to ONNX (+ parity check) and fill triton_repo/.

        OVERRIDES: Hydra settings as for train, e.g. export.checkpoint=PATH."""
        with reported_errors():
            config = _setup(overrides)
            _check_triton_repo(config)  # before models/ is rewritten, not after
            from mol_props import export

            result = export.run(config)
        print(f"done: {result.onnx_path}, {result.dynamic_onnx_path}, {result.metadata_path}")

    @fire.decorators.SetParseFn(str, "smiles", "input", "output", "server")
    def infer(
        self,
        *overrides: str,
        smiles: str | list[str] | None = None,
        input: str | None = None,
        output: str | None = None,
        server: str | None = None,
    ) -> None:
        """Predict with the exported model (pulled with DVC if it is not here).

        --smiles CCO                 one JSON object per molecule per line on stdout
        --smiles "CCO,c1ccccc1"      several (a SMILES never holds a comma), or
        --smiles '["CCO","c1ccccc1"]'
        --input F.csv --output G.csv every row of F (.csv/.tsv with a SMILES column, .smi/.txt)
                                     with one column per target and `error`
        --server http://HOST:8000    send the molecules to a Triton server instead

        Exit status: 0 when something was predicted (a file run always, with a summary on
        stderr), 1 when every --smiles molecule failed, 2 for a request that cannot run."""
        # SetParseFn(str): fire would otherwise evaluate values as Python literals, turning
        # "[H]" into ['H'], "1" into an int and "C#N" into "C" ('#' starts a comment).
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        from mol_props import infer

        try:
            # RuntimeError too: a file run whose worker process died (RDKit crashed, the OOM
            # killer) ends with BrokenProcessPool, which says so.
            with reported_errors(RuntimeError):
                _check_infer_overrides(overrides)
                # Cached on disk by the content of configs/: composing costs half a cold start.
                config = infer.compose_config_cached(overrides)
                code = infer.run(
                    config,
                    smiles=infer.parse_smiles_argument(smiles),
                    input_path=Path(input) if input else None,
                    output_path=Path(output) if output else None,
                    server=server,
                )
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            raise SystemExit(130)
        if code:
            raise SystemExit(code)

    def serve(self, *overrides: str) -> None:
        """Start a Triton Inference Server on triton_repo/ (Ctrl-C stops it).

        OVERRIDES: Hydra settings as for train, e.g. serving.http_port=8000."""
        with reported_errors():
            config = _setup(overrides)
            from mol_props import serve

            code = serve.serve(config)
        raise SystemExit(code)

    def download_data(self, *overrides: str) -> None:
        """Fetch B3DB from its source, verify its DVC hash and push it to the DVC remote."""
        with reported_errors():
            config = _setup(overrides)
            from mol_props.data import download_data

            paths = download_data(Path(config.data.path).parent, push=True, dvc=config.data.dvc)
        print("done: " + ", ".join(str(path) for path in paths))


def main() -> None:
    arguments = sys.argv[1:]
    with reported_errors():
        check_arguments(arguments)
    fire.Fire(Commands(), command=arguments, name="mol_props")


if __name__ == "__main__":
    main()
