"""MLflow for a training run: server if it answers, else a local store, said once, never a hang."""

from __future__ import annotations

import logging
import subprocess
import urllib.request
from pathlib import Path

from mol_props.config import LoggingConfig

LOGGER = logging.getLogger(__name__)


def server_answers(uri: str, timeout_s: float) -> bool:
    """True when an MLflow server at `uri` answers its health check within the timeout."""
    if not uri.startswith(("http://", "https://")):
        return True  # a local store always "answers"
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def git_state(directory: Path = Path(".")) -> tuple[str, bool]:
    """(commit id, dirty?) of the checkout; ("unknown", False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


class RunLogger:
    """One MLflow run: params, per-epoch metrics, tags, artifacts."""

    def __init__(self, config: LoggingConfig, run_name: str) -> None:
        import mlflow

        self._mlflow = mlflow
        uri = config.tracking_uri
        if not server_answers(uri, config.connect_timeout_s):
            fallback = Path(config.fallback_uri)
            fallback.mkdir(parents=True, exist_ok=True)
            LOGGER.warning(
                "MLflow server at %s does not answer; logging to the local store %s "
                "(start one with `uv run mlflow server --host 127.0.0.1 --port 8080`)",
                uri,
                fallback,
            )
            uri = f"sqlite:///{(fallback / 'mlflow.db').resolve()}"
            artifact_location = (fallback / "artifacts").resolve().as_uri()
        else:
            artifact_location = None
        self.tracking_uri = uri
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(config.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else mlflow.create_experiment(
                config.experiment_name, artifact_location=artifact_location
            )
        )
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
        LOGGER.info("MLflow: run %s at %s", self.run.info.run_id, uri)

    def log_params(self, params: dict[str, str]) -> None:
        # MLflow caps a batch at 100 params.
        items = [(_metric_key(key), value) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self._mlflow.log_params(dict(items[start : start + 100]))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        cleaned = {_metric_key(key): value for key, value in metrics.items() if value == value}
        self._mlflow.log_metrics(cleaned, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits and "_-./ " only; B3DB's label column holds "+"."""
    return "".join(
        character if character.isalnum() or character in "_-./ " else "_" for character in key
    )
