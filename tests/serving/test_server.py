"""Against a real Triton server: parity with local ONNX Runtime, per-molecule errors, concurrent
clients, malformed requests, and `mol_props infer --server` end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from tritonclient.utils import InferenceServerException

from mol_props.client import TritonPredictor, parse_server_url
from mol_props.infer import LocalPredictor, run

from .conftest import RunningServer, real_smiles

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5
PROTOCOLS = ["http", "grpc"]
MIXED = [
    "CCO",
    "not a smiles",  # whitespace: RDKit would read only "not"
    "",
    "C1CC",  # unclosed ring
    "c1ccccc1O",
    "C(C)(C)(C)(C)C",  # five bonds on carbon
    "C" * 300,  # more atoms than max_atoms
    "[Na+].[Cl-]",  # salt without carbon: the largest fragment is kept
    "CC(=O)Oc1ccccc1C(=O)O",
]


def local_predictions(triton: RunningServer, smiles: list[str], dynamic: bool = True):
    """What `mol_props infer` computes without a server (dynamic-atoms model, size buckets)."""
    model = triton.model
    path = model.dynamic_onnx_path if dynamic else model.onnx_path
    return LocalPredictor(path, model.metadata, triton.config.infer).predict(smiles)


def raw_client(triton: RunningServer, protocol: str):
    module = tritonclient.http if protocol == "http" else tritonclient.grpc
    return module, module.InferenceServerClient(parse_server_url(triton.urls[protocol])[1])


def send(module, client, array: np.ndarray, datatype: str, name: str = "smiles"):
    request_input = module.InferInput(name, list(array.shape), datatype)
    request_input.set_data_from_numpy(array)
    return client.infer("mol_props", [request_input])


def assert_still_serving(triton: RunningServer, protocol: str) -> None:
    module, client = raw_client(triton, protocol)
    result = send(module, client, np.array([[b"CCO"]], dtype=np.object_), "BYTES")
    expected = local_predictions(triton, ["CCO"], dynamic=False).values
    np.testing.assert_allclose(result.as_numpy("prediction"), expected, atol=TOLERANCE)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_predictions_equal_local_onnx_runtime(triton: RunningServer, protocol: str):
    smiles = real_smiles(400)
    remote = TritonPredictor(triton.urls[protocol], triton.config).predict(smiles)
    for dynamic in (True, False):
        local = local_predictions(triton, smiles, dynamic=dynamic)
        assert remote.errors == local.errors
        ok = ~np.isnan(local.values)
        assert np.array_equal(ok, ~np.isnan(remote.values))
        assert np.abs(remote.values[ok] - local.values[ok]).max() <= TOLERANCE
    assert remote.values.shape == (400, len(triton.model.metadata.targets))
    assert ok.sum() >= 390  # B3DB has a handful of unparsable rows; the rest are answered


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_mixed_batch_answers_every_molecule(triton: RunningServer, protocol: str):
    predictor = TritonPredictor(triton.urls[protocol], triton.config)
    remote = predictor.predict(MIXED)
    local = local_predictions(triton, MIXED)
    assert predictor.targets == triton.model.metadata.targets
    assert remote.errors == local.errors
    assert [error is None for error in remote.errors] == [
        True, False, False, False, True, False, False, True, True
    ]  # fmt: skip
    assert "whitespace" in remote.errors[1] and "max_atoms" in remote.errors[6]
    assert np.isnan(remote.values[1:4]).all() and not np.isnan(remote.values[0]).any()
    np.testing.assert_allclose(remote.values, local.values, atol=TOLERANCE)


def test_raw_http_json_request(triton: RunningServer):
    """What the README's curl example sends: JSON in, JSON out, errors per molecule."""
    body = {
        "inputs": [{"name": "smiles", "shape": [3, 1], "datatype": "BYTES", "data": MIXED[:3]}],
        "outputs": [{"name": "prediction"}, {"name": "valid"}, {"name": "error"}],
    }
    request = urllib.request.Request(
        f"{triton.urls['http']}/v2/models/mol_props/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        outputs = {output["name"]: output for output in json.load(response)["outputs"]}
    assert outputs["valid"]["data"] == [True, False, False]
    assert outputs["error"]["data"][0] == "" and "whitespace" in outputs["error"]["data"][1]
    assert outputs["prediction"]["shape"] == [3, len(triton.model.metadata.targets)]
    expected = local_predictions(triton, MIXED[:1]).values.reshape(-1)
    targets = len(triton.model.metadata.targets)
    np.testing.assert_allclose(outputs["prediction"]["data"][:targets], expected, atol=TOLERANCE)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bytes_that_are_not_utf8_fail_alone(triton: RunningServer, protocol: str):
    module, client = raw_client(triton, protocol)
    batch = np.array([[b"\xff\xfeCC"], [b"CCO"]], dtype=np.object_)  # [2, 1]
    result = send(module, client, batch, "BYTES")
    assert result.as_numpy("valid").reshape(-1).tolist() == [False, True]
    assert result.as_numpy("error")[0, 0] == b"SMILES is not valid UTF-8"


def test_concurrent_clients_get_their_own_answers(triton: RunningServer):
    smiles = real_smiles(240) + MIXED
    expected = local_predictions(triton, smiles)
    failures: list[str] = []

    def client(index: int) -> None:
        protocol = PROTOCOLS[index % 2]
        predictor = TritonPredictor(triton.urls[protocol], triton.config)
        # Different slices and sizes, so the dynamic batcher mixes requests of several clients.
        for round_index in range(3):
            start = (index * 37 + round_index * 11) % len(smiles)
            rows = list(range(start, min(len(smiles), start + 1 + index * 9)))
            result = predictor.predict([smiles[row] for row in rows])
            if result.errors != [expected.errors[row] for row in rows]:
                failures.append(f"client {index}: errors differ")
            difference = np.nan_to_num(np.abs(result.values - expected.values[rows]))
            if difference.max(initial=0.0) > TOLERANCE:
                failures.append(f"client {index}: max |diff| {difference.max()}")

    threads = [threading.Thread(target=client, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []


MALFORMED = {
    "wrong dtype": (np.zeros((2, 1), dtype=np.float32), "FP32", "smiles"),
    "wrong shape": (np.array([[b"C", b"C"]] * 2, dtype=np.object_), "BYTES", "smiles"),
    "no batch dimension": (np.array([b"C", b"CC"], dtype=np.object_), "BYTES", "smiles"),
    "empty batch": (np.zeros((0, 1), dtype=np.object_), "BYTES", "smiles"),
    "batch too large": (np.array([[b"C"]] * 257, dtype=np.object_), "BYTES", "smiles"),
    "unknown input": (np.array([[b"C"]], dtype=np.object_), "BYTES", "smile"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_refused_and_server_keeps_serving(
    triton: RunningServer, protocol: str, case: str
):
    array, datatype, name = MALFORMED[case]
    module, client = raw_client(triton, protocol)
    with pytest.raises(InferenceServerException):
        send(module, client, array, datatype, name=name)
    assert_still_serving(triton, protocol)


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b'{"inputs": [{"name": "smiles", "shape": [1, 1], "datatype": "BYTES", "data": [1.5]}]}',
        b'{"inputs": [{"name": "smiles", "shape": [2, 1], "datatype": "BYTES", "data": ["C"]}]}',
    ],
)
def test_malformed_http_body_is_refused_and_server_keeps_serving(
    triton: RunningServer, body: bytes
):
    request = urllib.request.Request(
        f"{triton.urls['http']}/v2/models/mol_props/infer", data=body, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert 400 <= raised.value.code < 600
    assert "error" in json.loads(raised.value.read())
    assert_still_serving(triton, "http")


def test_only_the_selected_backend_is_loaded(triton: RunningServer):
    _, client = raw_client(triton, "http")
    assert client.is_model_ready("mol_props")
    assert client.is_model_ready("mol_props_featurizer")
    assert client.is_model_ready("mol_props_onnx")
    assert not client.is_model_ready("mol_props_trt")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_command_file_mode_matches_local(
    triton: RunningServer, protocol: str, tmp_path: Path
):
    smiles = real_smiles(120) + MIXED
    source = tmp_path / "molecules.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "smiles"])
        writer.writerows([[f"m{i}", text] for i, text in enumerate(smiles)])
    remote_csv, local_csv = tmp_path / "remote.csv", tmp_path / "local.csv"
    config = triton.config
    assert (
        run(config, input_path=source, output_path=remote_csv, server=triton.urls[protocol]) == 0
    )
    local = LocalPredictor(triton.model.dynamic_onnx_path, triton.model.metadata, config.infer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mol_props.infer.local_predictor", lambda _config: local)
        assert run(config, input_path=source, output_path=local_csv) == 0
    remote_rows = list(csv.DictReader(remote_csv.open()))
    local_rows = list(csv.DictReader(local_csv.open()))
    assert [row.keys() for row in remote_rows] == [row.keys() for row in local_rows]
    for remote_row, local_row in zip(remote_rows, local_rows):
        assert remote_row["error"] == local_row["error"]
        for target in triton.model.metadata.targets:
            if local_row[target]:
                assert abs(float(remote_row[target]) - float(local_row[target])) <= TOLERANCE
            else:
                assert remote_row[target] == ""


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_command_line_against_the_server_needs_no_torch(
    triton: RunningServer, protocol: str
):
    """`mol_props infer --server URL --smiles ...` in a fresh interpreter: JSON lines, no torch."""
    command = [sys.executable, "-X", "importtime", "-m", "mol_props.commands", "infer"]
    arguments = ["--server", triton.urls[protocol], "--smiles", '["CCO", "C1CC"]']
    result = subprocess.run(command + arguments, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert imported and not imported & {"torch", "lightning", "torch_geometric", "mlflow"}
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [record["smiles"] for record in records] == ["CCO", "C1CC"]
    assert records[0]["error"] is None and "unparsable" in records[1]["error"]
    expected = local_predictions(triton, ["CCO"]).values[0]
    for k, target in enumerate(triton.model.metadata.targets):
        assert abs(records[0][target] - expected[k]) <= TOLERANCE
        assert records[1][target] is None
