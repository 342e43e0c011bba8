"""The `mol_props` command line: fire + Hydra's compose API.

    mol_props train [OVERRIDES...]          e.g. mol_props train model.hidden_dim=256
    mol_props export [OVERRIDES...]
    mol_props infer --smiles "CCO" [--smiles "c1ccccc1"] [OVERRIDES...]
    mol_props infer --input mols.csv --output preds.csv [--server http://127.0.0.1:8000]
    mol_props serve [OVERRIDES...]
    mol_props download_data

Each command imports its heavy modules only when it runs: `infer` must never load torch.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import fire

from mol_props.config import Config, compose_config


def _setup(overrides: tuple[str, ...]) -> Config:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return compose_config([str(override) for override in overrides])


def _as_list(value: str | list | tuple | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return [str(value)]


class Commands:
    """Molecular property prediction: train, export, infer, serve."""

    def train(self, *overrides: str) -> None:
        """Train the GNN (fetching data with DVC), log to MLflow, export ONNX at the end."""
        config = _setup(overrides)
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
        config = _setup(overrides)
        from mol_props import export

        result = export.run(config)
        print(f"done: {result.onnx_path}, {result.dynamic_onnx_path}, {result.metadata_path}")

    def infer(
        self,
        *overrides: str,
        smiles: str | list[str] | None = None,
        input: str | None = None,
        output: str | None = None,
        server: str | None = None,
    ) -> None:
        """Predict for --smiles (JSON lines) or --input FILE --output FILE.csv; --server URL
        sends them to a Triton server instead of running the model here."""
        config = _setup(overrides)
        from mol_props import infer

        try:
            code = infer.run(
                config,
                smiles=_as_list(smiles),
                input_path=Path(input) if input else None,
                output_path=Path(output) if output else None,
                server=server,
            )
        except (infer.InferenceError, RuntimeError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2)
        if code:
            raise SystemExit(code)

    def serve(self, *overrides: str) -> None:
        """Start a Triton Inference Server on triton_repo/ (Ctrl-C stops it)."""
        config = _setup(overrides)
        from mol_props import serve

        raise SystemExit(serve.serve(config))

    def download_data(self, *overrides: str) -> None:
        """Fetch B3DB from its source, verify its DVC hash and push it to the DVC remote."""
        config = _setup(overrides)
        from mol_props.data import download_data

        paths = download_data(Path(config.data.path).parent, push=True, dvc=config.data.dvc)
        print("done: " + ", ".join(str(path) for path in paths))


def main() -> None:
    fire.Fire(Commands, name="mol_props")


if __name__ == "__main__":
    main()
