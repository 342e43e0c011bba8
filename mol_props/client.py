"""`mol_props infer --server URL`: the same predictions as local inference, computed by Triton.

`TritonPredictor` is a `Predictor` (mol_props.infer): it sends SMILES strings, the server's
ensemble featurizes them with the project's featurizer and runs the model, and it returns the same
`Predictions` as `LocalPredictor`, so `predict_smiles` / `predict_file` write identical outputs.

    http://127.0.0.1:8000   Triton's HTTP/REST endpoint (tritonclient.http)
    grpc://127.0.0.1:8001   Triton's gRPC endpoint (tritonclient.grpc)

Only numpy and the one tritonclient flavour the URL names are imported: no RDKit, no torch.
Target names and the largest request come from the served model's config, so the client needs no
local model files.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from mol_props.config import Config
from mol_props.infer import InferenceError, Predictions

DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
INPUT_NAME = "smiles"
OUTPUT_NAMES = ("prediction", "valid", "error")
# A server that is down or dies mid-run: refused or reset sockets (OSError), or an HTTP response
# cut off (geventhttpclient's HTTPConnectionClosed is an http.client.HTTPException).
CONNECTION_ERRORS = (OSError, http.client.HTTPException)


def parse_server_url(url: str) -> tuple[str, str]:
    """`http://host:port` / `grpc://host:port` (scheme optional: http) -> (protocol, host:port)."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme not in DEFAULT_PORTS:
        raise InferenceError(f"server URL {url!r}: use http://HOST:PORT or grpc://HOST:PORT")
    if parsed.path not in ("", "/") or parsed.query or not parsed.hostname:
        raise InferenceError(f"server URL {url!r}: expected only a host and a port")
    port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return parsed.scheme, f"{host}:{port}"


class _HttpTransport:
    """tritonclient.http: greenlet-based; `concurrency` connections for requests in flight."""

    def __init__(self, address: str, timeout: float, concurrency: int) -> None:
        import gevent
        import tritonclient.http as module

        # A request's connection error reaches TritonPredictor._call through get_result, which
        # reports it in one line; without this, gevent also prints each failed request's
        # traceback to stderr (two full tracebacks when a server dies mid-file).
        hub = gevent.get_hub()
        hub.NOT_ERROR += tuple(set(CONNECTION_ERRORS) - set(hub.NOT_ERROR))  # once per process
        self.module = module
        self.client = module.InferenceServerClient(
            address,
            concurrency=concurrency,
            connection_timeout=timeout,
            network_timeout=timeout,
        )

    def model_config(self, model_name: str) -> dict:
        return self.client.get_model_config(model_name)

    def submit(self, model_name: str, inputs: list, outputs: list) -> Callable[[], Any]:
        return self.client.async_infer(model_name, inputs, outputs=outputs).get_result

    def output(self, name: str) -> Any:
        # Binary tensors: no JSON round trip of floats, and the exact float32 bits come back.
        return self.module.InferRequestedOutput(name, binary_data=True)

    def close(self) -> None:
        self.client.close()


class _GrpcTransport:
    """tritonclient.grpc: one channel; async_infer completes on grpc's own threads."""

    def __init__(self, address: str, timeout: float, concurrency: int) -> None:
        import tritonclient.grpc as module

        self.module = module
        self.timeout = timeout
        self.client = module.InferenceServerClient(address)

    def model_config(self, model_name: str) -> dict:
        return self.client.get_model_config(model_name, as_json=True, client_timeout=self.timeout)[
            "config"
        ]

    def submit(self, model_name: str, inputs: list, outputs: list) -> Callable[[], Any]:
        future: Future = Future()

        def done(result: Any, error: Exception | None) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.client.async_infer(
            model_name, inputs, done, outputs=outputs, client_timeout=self.timeout
        )
        return future.result

    def output(self, name: str) -> Any:
        return self.module.InferRequestedOutput(name)

    def close(self) -> None:
        self.client.close()


class TritonPredictor:
    """Predictions from the `mol_props` ensemble on a running Triton server."""

    def __init__(self, server_url: str, config: Config) -> None:
        from tritonclient.utils import InferenceServerException

        self._server_error = InferenceServerException
        self.url = server_url
        self.model_name = config.infer.server_model_name
        self.in_flight = max(1, config.infer.server_concurrency)
        protocol, address = parse_server_url(server_url)
        transport = _HttpTransport if protocol == "http" else _GrpcTransport
        self.transport = self._call(
            "connect", lambda: transport(address, config.infer.server_timeout_s, self.in_flight)
        )
        model_config = self._call(
            "read the model config", lambda: self.transport.model_config(self.model_name)
        )
        self.targets = _targets(model_config, self.model_name)
        # The server refuses a request larger than its max_batch_size.
        self.batch_size = max(1, min(config.infer.batch_size, model_config["max_batch_size"]))
        self.outputs = [self.transport.output(name) for name in OUTPUT_NAMES]

    def predict(self, smiles: Sequence[str]) -> Predictions:
        """One row per input: [B, T] float32 (NaN where the server reports an error)."""
        values = np.full((len(smiles), len(self.targets)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(smiles)
        starts = list(range(0, len(smiles), self.batch_size))
        # A few requests in flight keep the server's batcher fed while results are unpacked.
        for window in range(0, len(starts), self.in_flight):
            pending = [
                (start, self._submit(smiles[start : start + self.batch_size]))
                for start in starts[window : window + self.in_flight]
            ]
            for start, result in pending:
                size = min(self.batch_size, len(smiles) - start)
                self._unpack(self._call("infer", result), start, size, values, errors)
        # The ensemble has no output for unknown elements: the server cannot say.
        return Predictions(values=values, errors=errors, unknown_elements=[()] * len(smiles))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> TritonPredictor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit(self, smiles: Sequence[str]) -> Callable[[], Any]:
        encoded = np.array([[_encode(text)] for text in smiles], dtype=np.object_)  # [b, 1]
        request_input = self.transport.module.InferInput(INPUT_NAME, list(encoded.shape), "BYTES")
        request_input.set_data_from_numpy(encoded)
        return self._call(
            "send a request",
            lambda: self.transport.submit(self.model_name, [request_input], self.outputs),
        )

    def _unpack(
        self, result: Any, start: int, size: int, values: np.ndarray, errors: list[str | None]
    ) -> None:
        prediction = result.as_numpy("prediction")  # [b, T] float32
        valid = result.as_numpy("valid").reshape(-1)  # [b]
        messages = result.as_numpy("error").reshape(-1)  # [b] bytes
        if not (len(prediction) == len(valid) == len(messages) == size):
            raise InferenceError(f"Triton at {self.url} answered {len(valid)} of {size} rows")
        rows = np.arange(start, start + size)
        values[rows[valid]] = prediction[valid]
        for row, ok, message in zip(rows, valid, messages):
            if not ok:
                errors[row] = message.decode("utf-8", errors="replace") or "failed on the server"

    def _call(self, action: str, function: Callable[[], Any]) -> Any:
        """Run a tritonclient call; its failures become InferenceError naming the server."""
        try:
            return function()
        except self._server_error as error:
            if "UNAVAILABLE" in str(error.status()):
                raise InferenceError(
                    f"no Triton server answers at {self.url}; start one with `mol_props serve`"
                ) from error
            raise InferenceError(
                f"Triton at {self.url} could not {action} ({self.model_name}): {error.message()}"
            ) from error
        except CONNECTION_ERRORS as error:
            raise InferenceError(
                f"no Triton server answers at {self.url} ({type(error).__name__}: {error}); "
                "start one with `mol_props serve`"
            ) from error


def _encode(text: str) -> bytes:
    # A lone surrogate cannot be UTF-8; send it escaped so the server rejects that molecule alone.
    return text.encode("utf-8", errors="backslashreplace")


def _targets(model_config: dict, model_name: str) -> list[str]:
    """Target names from the ensemble's `targets` parameter (written by `mol_props export`)."""
    parameter = model_config.get("parameters", {}).get("targets", {}).get("string_value")
    if not parameter:
        raise InferenceError(f"model {model_name!r} on the server has no `targets` parameter")
    targets = json.loads(parameter)
    (prediction,) = [tensor for tensor in model_config["output"] if tensor["name"] == "prediction"]
    if [len(targets)] != [int(dim) for dim in prediction["dims"]]:
        raise InferenceError(f"model {model_name!r}: `targets` disagrees with the prediction dims")
    return targets
