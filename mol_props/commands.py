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
from collections.abc import Iterator
from pathlib import Path

import fire

from mol_props.config import Config, compose_config

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
def _reported_errors(*also: type[Exception]) -> Iterator[None]:
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


def _check_infer_arguments(overrides: tuple[str, ...]) -> None:
    """Catch the two ways of asking for several molecules that fire would silently mangle."""
    from mol_props.infer import InferenceError

    flags = [
        arg for arg in sys.argv[1:] if arg in ("--smiles", "-s") or arg.startswith("--smiles=")
    ]
    if len(flags) > 1:
        # fire keeps only the last of repeated flags: the other molecules would vanish.
        raise InferenceError(
            "--smiles given more than once; give several molecules as --smiles 'CCO,c1ccccc1'"
        )
    for override in overrides:
        if "=" not in str(override) and not str(override).startswith("~"):
            raise InferenceError(
                f"{override!r} is not a config override (KEY=VALUE); "
                "give several molecules as --smiles 'CCO,c1ccccc1'"
            )


class Commands:
    """Molecular property prediction: train, export, infer, serve."""

    def train(self, *overrides: str) -> None:
        """Train the GNN (fetching data with DVC), log to MLflow, export ONNX at the end."""
        with _reported_errors():
            config = _setup(overrides)
            if config.train.export_after:
                # Checked now rather than by the export after minutes of training.
                from mol_props.triton_repo import check_model_repository

                check_model_repository(
                    Path(config.serving.triton_repo), config.export.triton_model_name
                )
            from mol_props import train

            try:
                result = train.run(config)
            except KeyboardInterrupt:
                print(
                    "\ntraining interrupted; continue with: mol_props train train.resume=true",
                    file=sys.stderr,
                )
                raise SystemExit(130)
            if config.train.export_after:
                from mol_props import export

                export.run(config)
        metrics = ", ".join(f"{name}={value:.4f}" for name, value in result.test_metrics.items())
        print(
            f"done: {result.epochs_run} epochs; test {metrics or '(no test split)'}; "
            f"model {result.checkpoint}; plots {result.run_directory}"
        )

    def export(self, *overrides: str) -> None:
        """Export models/best.ckpt to ONNX (+ parity check) and fill triton_repo/."""
        with _reported_errors():
            config = _setup(overrides)
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
            with _reported_errors(RuntimeError):
                _check_infer_arguments(overrides)
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
        """Start a Triton Inference Server on triton_repo/ (Ctrl-C stops it)."""
        with _reported_errors():
            config = _setup(overrides)
            from mol_props import serve

            code = serve.serve(config)
        raise SystemExit(code)

    def download_data(self, *overrides: str) -> None:
        """Fetch B3DB from its source, verify its DVC hash and push it to the DVC remote."""
        with _reported_errors():
            config = _setup(overrides)
            from mol_props.data import download_data

            paths = download_data(Path(config.data.path).parent, push=True, dvc=config.data.dvc)
        print("done: " + ", ".join(str(path) for path in paths))


def main() -> None:
    fire.Fire(Commands(), name="mol_props")


if __name__ == "__main__":
    main()
