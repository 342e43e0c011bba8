"""TritonPredictor without a server: URL parsing and a clear error when nothing answers."""

from __future__ import annotations

import pytest

from mol_props.client import TritonPredictor, parse_server_url
from mol_props.config import compose_config
from mol_props.infer import InferenceError

from .conftest import free_port


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", ("http", "127.0.0.1:8000")),
        ("grpc://localhost:8001/", ("grpc", "localhost:8001")),
        ("127.0.0.1:9000", ("http", "127.0.0.1:9000")),
        ("grpc://127.0.0.1", ("grpc", "127.0.0.1:8001")),
        ("http://[::1]:8000", ("http", "[::1]:8000")),
    ],
)
def test_parse_server_url(url: str, expected: tuple[str, str]):
    assert parse_server_url(url) == expected


@pytest.mark.parametrize("url", ["ftp://host:1", "http://host:8000/v2/models", "http://:8000"])
def test_parse_server_url_refuses_others(url: str):
    with pytest.raises(InferenceError):
        parse_server_url(url)


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_no_server_is_a_clear_error(scheme: str):
    config = compose_config(["infer.server_timeout_s=5"])
    with pytest.raises(InferenceError, match="mol_props serve"):
        TritonPredictor(f"{scheme}://127.0.0.1:{free_port()}", config)
