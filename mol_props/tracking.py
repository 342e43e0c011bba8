"""MLflow for a training run: server if it answers, else a local store, said once, never a hang."""

from __future__ import annotations

import logging
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mol_props.config import LoggingConfig

LOGGER = logging.getLogger(__name__)
# MLflow's HTTP retries when a server stops answering (its defaults: 7 retries with backoff
# factor 2, ~4 minutes per call); a user's own settings of these variables are kept.
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


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
    """One MLflow run: params, per-epoch metrics, tags, artifacts.

    Through MlflowClient with the run's id rather than mlflow's module-level active run, so a
    run whose server went away leaves nothing behind in this process. A server that stops
    answering mid-run costs one short wait (HTTP_RETRIES), one warning, and the rest of the
    run's MLflow logging; training goes on (its checkpoint, plots and log are local files).
    Before, one call waited ~4 minutes in MLflow's own retries and then failed the run."""

    def __init__(self, config: LoggingConfig, run_name: str) -> None:
        from mlflow.tracking import MlflowClient

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
            for name, value in HTTP_RETRIES.items():
                os.environ.setdefault(name, value)  # MLflow reads these per request
        self.tracking_uri = uri
        self.lost: str | None = None  # why the server stopped answering, once it has
        self._client = MlflowClient(tracking_uri=uri)
        experiment = self._client.get_experiment_by_name(config.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._client.create_experiment(
                config.experiment_name, artifact_location=artifact_location
            )
        )
        self.run = self._client.create_run(experiment_id, run_name=run_name)
        self._run_id = self.run.info.run_id
        LOGGER.info("MLflow: run %s at %s", self._run_id, uri)

    def _send(self, function: Callable[[], object]) -> None:
        from mlflow.exceptions import MlflowException

        if self.lost is not None:
            return
        try:
            function()
        except MlflowException as error:
            self.lost = str(error).splitlines()[0][:300]
            LOGGER.warning(
                "MLflow at %s stopped answering (%s); training goes on, and the rest of run %s "
                "is only in its local files (checkpoint, plots, train.log)",
                self.tracking_uri,
                self.lost,
                self._run_id,
            )

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        # MLflow caps a batch at 100 params.
        items = [Param(_metric_key(key), str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):
            batch = items[start : start + 100]
            self._send(lambda: self._client.log_batch(self._run_id, params=batch))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)) for key, value in tags.items()]
        self._send(lambda: self._client.log_batch(self._run_id, tags=items))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(_metric_key(key), float(value), now, step or 0)
            for key, value in metrics.items()
            if value == value  # NaN (an undefined metric) is left out
        ]
        self._send(lambda: self._client.log_batch(self._run_id, metrics=items))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._send(lambda: self._client.log_artifact(self._run_id, str(path), folder))

    def finish(self, status: str = "FINISHED") -> None:
        self._send(lambda: self._client.set_terminated(self._run_id, status))


def _metric_key(key: str) -> str:
    """MLflow keys allow letters, digits and "_-./ " only; B3DB's label column holds "+"."""
    return "".join(
        character if character.isalnum() or character in "_-./ " else "_" for character in key
    )
