"""Fixtures for the Triton tests: an exported model, a filled model repository, a real server.

The model is the project's own tiny trained export (`exported_model` from tests/conftest.py) when
that fixture exists; otherwise an ONNX model with the same contract built here from onnx.helper, so
the serving tests never depend on training to run. One real `tritonserver` is started for the whole
session on free loopback ports; the tests are skipped only where no server binary can exist.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mol_props.config import Config, compose_config
from mol_props.featurize import FEATURIZER_VERSION, Featurizer
from mol_props.infer import ModelMetadata
from mol_props.serve import ServeError, TritonServer, bundled_server_dir
from mol_props.triton_repo import populate_model_repository

from ..conftest import b3db_rows

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED_REPOSITORY = REPO_ROOT / "triton_repo"
ONNX_MODEL_NAME = "mol_props_onnx"
TINY_HIDDEN = 16
TINY_TARGETS = ["bbb_probability"]


@dataclasses.dataclass
class ServingModel:
    onnx_path: Path  # fixed atoms: what Triton serves
    dynamic_onnx_path: Path  # atoms axis dynamic: what `mol_props infer` runs locally
    metadata_path: Path
    metadata: ModelMetadata


@dataclasses.dataclass
class RunningServer:
    server: TritonServer
    repository: Path
    config: Config  # with the server's ports; infer.* as a client would use it
    model: ServingModel

    @property
    def urls(self) -> dict[str, str]:
        return {"http": self.server.http_url, "grpc": self.server.grpc_url}


def build_tiny_onnx(
    path: Path, metadata: ModelMetadata, dynamic_atoms: bool = False, seed: int = 0
) -> None:
    """A small message-passing model with the export contract: same names, dtypes and shapes.

    prediction = sigmoid(W_head [masked-mean(relu(A h + h)), tanh(W_desc d)]), h = X W_atom; it
    reads every input, so a featurization or padding error changes its output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    atoms = "atoms" if dynamic_atoms else metadata.max_atoms
    features, descriptors = metadata.atom_feature_size, metadata.descriptor_size
    targets = len(metadata.targets)

    def weight(name: str, shape: tuple[int, ...], scale: float):
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        return numpy_helper.from_array(values, name)

    initializers = [
        weight("w_atom", (features, TINY_HIDDEN), 0.3),
        # Descriptors are unscaled (molecular weight ~300): small weights keep tanh unsaturated.
        weight("w_desc", (descriptors, TINY_HIDDEN), 0.003),
        weight("w_head", (2 * TINY_HIDDEN, targets), 0.3),
        numpy_helper.from_array(np.array([2], np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], np.int64), "atom_axis"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("MatMul", ["atom_features", "w_atom"], ["hidden"]),  # [B, N, H]
        helper.make_node("MatMul", ["adjacency", "hidden"], ["messages"]),  # [B, N, H]
        helper.make_node("Add", ["messages", "hidden"], ["summed"]),
        helper.make_node("Relu", ["summed"], ["activated"]),
        helper.make_node("Unsqueeze", ["atom_mask", "last_axis"], ["mask"]),  # [B, N, 1]
        helper.make_node("Mul", ["activated", "mask"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "atom_axis"], ["pooled_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "atom_axis"], ["count"], keepdims=0),  # [B, 1]
        helper.make_node("Max", ["count", "one"], ["safe_count"]),
        helper.make_node("Div", ["pooled_sum", "safe_count"], ["pooled"]),  # [B, H]
        helper.make_node("MatMul", ["descriptors", "w_desc"], ["descriptor_hidden"]),
        helper.make_node("Tanh", ["descriptor_hidden"], ["descriptor_activated"]),  # [B, H]
        helper.make_node("Concat", ["pooled", "descriptor_activated"], ["joined"], axis=1),
        helper.make_node("MatMul", ["joined", "w_head"], ["logits"]),  # [B, T]
        helper.make_node("Sigmoid", ["logits"], ["prediction"]),
    ]
    float32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("atom_features", float32, ["batch", atoms, features]),
        helper.make_tensor_value_info("adjacency", float32, ["batch", atoms, atoms]),
        helper.make_tensor_value_info("atom_mask", float32, ["batch", atoms]),
        helper.make_tensor_value_info("descriptors", float32, ["batch", descriptors]),
    ]
    output = helper.make_tensor_value_info("prediction", float32, ["batch", targets])
    graph = helper.make_graph(nodes, "tiny_mol_props", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime we support
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def tiny_metadata(config: Config, targets: list[str] | None = None) -> ModelMetadata:
    featurizer = Featurizer(config.preprocess)
    return ModelMetadata(
        task="classification",
        targets=list(targets or TINY_TARGETS),
        max_atoms=config.preprocess.max_atoms,
        atom_feature_size=featurizer.atom_feature_size,
        descriptor_size=featurizer.descriptor_size,
        featurizer_version=FEATURIZER_VERSION,
        preprocess=dataclasses.asdict(config.preprocess),
    )


def build_tiny_model(
    folder: Path, config: Config, targets: list[str] | None = None
) -> ServingModel:
    folder.mkdir(parents=True, exist_ok=True)
    metadata = tiny_metadata(config, targets)
    model = ServingModel(
        onnx_path=folder / "model.onnx",
        dynamic_onnx_path=folder / "model_dynamic_atoms.onnx",
        metadata_path=folder / "model.json",
        metadata=metadata,
    )
    build_tiny_onnx(model.onnx_path, metadata)
    build_tiny_onnx(model.dynamic_onnx_path, metadata, dynamic_atoms=True)
    metadata.save(model.metadata_path)
    return model


@pytest.fixture(scope="session")
def serving_model(request: pytest.FixtureRequest, tmp_path_factory) -> ServingModel:
    """The project's tiny trained export when tests/conftest.py provides it, else an ONNX one."""
    try:
        exported = request.getfixturevalue("exported_model")
    except pytest.FixtureLookupError:
        return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), compose_config())
    return ServingModel(
        onnx_path=Path(exported.onnx_path),
        dynamic_onnx_path=Path(exported.dynamic_onnx_path),
        metadata_path=Path(exported.metadata_path),
        metadata=ModelMetadata.load(exported.metadata_path),
    )


def copy_repository(target: Path) -> Path:
    """The committed triton_repo/ configs and code, without any model files left in it."""
    ignored = shutil.ignore_patterns("model.onnx", "model.plan", "*.json", "__pycache__")
    shutil.copytree(COMMITTED_REPOSITORY, target, ignore=ignored)
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_config(repository: Path, work_dir: Path, overrides: list[str] = ()) -> Config:
    return compose_config(
        [
            f"serving.triton_repo={repository}",
            f"serving.work_dir={work_dir}",
            f"serving.http_port={free_port()}",
            f"serving.grpc_port={free_port()}",
            f"serving.metrics_port={free_port()}",
            "infer.progress=false",
            *overrides,
        ]
    )


def require_server_binary() -> None:
    """Skip only where a tritonserver cannot exist: not Linux, or neither wheel nor container."""
    if shutil.which("tritonserver") is None and bundled_server_dir() is None:
        pytest.skip("no tritonserver: needs Linux with nvidia-pytriton, or the Triton container")


@pytest.fixture(scope="session")
def filled_repository(serving_model: ServingModel, tmp_path_factory) -> Path:
    repository = copy_repository(tmp_path_factory.mktemp("serving") / "triton_repo")
    populate_model_repository(
        repository, serving_model.onnx_path, serving_model.metadata, ONNX_MODEL_NAME
    )
    return repository


@pytest.fixture(scope="session")
def triton(
    serving_model: ServingModel, filled_repository: Path, tmp_path_factory
) -> Iterator[RunningServer]:
    """One real Triton server for the session, on free ports, logging to a file."""
    require_server_binary()
    folder = tmp_path_factory.mktemp("triton_server")
    config = server_config(filled_repository, folder / "work")
    server = TritonServer(config.serving, log_path=folder / "tritonserver.log")
    try:
        server.__enter__()
    except ServeError as error:
        pytest.fail(f"the Triton server did not start: {error}")
    yield RunningServer(server, filled_repository, config, serving_model)
    server.stop()


def real_smiles(count: int) -> list[str]:
    """The first `count` SMILES of B3DB: real molecules, a few of them unparsable."""
    return [row["SMILES"] for row in b3db_rows(count)]
