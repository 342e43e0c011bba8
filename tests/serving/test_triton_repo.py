"""triton_repo/: configs parse as Triton's own protobuf, agree with the featurizer and the ONNX
model, wire the ensemble correctly, and `populate_model_repository` keeps them in step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnxruntime
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from mol_props.config import compose_config
from mol_props.featurize import Featurizer
from mol_props.triton_repo import ModelRepositoryError, populate_model_repository, tensor_dims

from .conftest import (
    COMMITTED_REPOSITORY,
    REPO_ROOT,
    ServingModel,
    build_tiny_model,
    copy_repository,
)

DataType = model_config_pb2.DataType
MODEL_INPUTS = ["atom_features", "adjacency", "atom_mask", "descriptors"]
ENSEMBLE_OUTPUTS = {"prediction": "TYPE_FP32", "valid": "TYPE_BOOL", "error": "TYPE_STRING"}
MODELS = ["mol_props", "mol_props_featurizer", "mol_props_onnx", "mol_props_trt"]


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def load_repository(repository: Path) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {name: parse(repository / name / "config.pbtxt") for name in MODELS}
    configs["mol_props:tensorrt"] = parse(repository / "mol_props" / "configs" / "tensorrt.pbtxt")
    return configs


def tensors(tensor_list) -> dict[str, tuple[str, list[int]]]:
    return {
        tensor.name: (DataType.Name(tensor.data_type), list(tensor.dims)) for tensor in tensor_list
    }


def onnx_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (Triton data type, dims without the batch dimension) of an ONNX model."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert all(tensor.type == "tensor(float)" for tensor in session.get_inputs())
    assert all(tensor.type == "tensor(float)" for tensor in session.get_outputs())
    return {
        tensor.name: ("TYPE_FP32", list(tensor.shape[1:]))
        for tensor in session.get_inputs() + session.get_outputs()
    }


def check_ensemble_wiring(configs: dict[str, model_config_pb2.ModelConfig], variant: str) -> None:
    """Each step gets every input it needs, from the ensemble or an earlier step, with matching
    dtype and dims; every ensemble output is produced by a step with the declared dtype/dims."""
    ensemble = configs[variant]
    available = tensors(ensemble.input)
    for step in ensemble.ensemble_scheduling.step:
        step_config = configs[step.model_name]
        assert step.model_version == -1
        assert ensemble.max_batch_size <= step_config.max_batch_size
        step_inputs = tensors(step_config.input)
        assert set(step.input_map) == set(step_inputs), step.model_name
        for model_input, ensemble_tensor in step.input_map.items():
            assert available[ensemble_tensor] == step_inputs[model_input], model_input
        step_outputs = tensors(step_config.output)
        for model_output, ensemble_tensor in step.output_map.items():
            available[ensemble_tensor] = step_outputs[model_output]
    for name, spec in tensors(ensemble.output).items():
        assert available[name] == spec, name


def test_configs_parse_complete_and_named_after_their_folders():
    configs = load_repository(COMMITTED_REPOSITORY)
    for name in MODELS:
        config = configs[name]
        assert config.name == name
        assert config.max_batch_size == configs["mol_props"].max_batch_size > 0
        if name != "mol_props":
            # Complete for a server with auto-complete off: batching and placement are explicit.
            assert config.HasField("dynamic_batching"), name
            assert len(config.instance_group) == 1, name
    assert configs["mol_props"].platform == "ensemble"
    assert configs["mol_props_featurizer"].backend == "python"
    assert configs["mol_props_onnx"].platform == "onnxruntime_onnx"
    assert configs["mol_props_trt"].platform == "tensorrt_plan"
    assert (
        configs["mol_props_trt"].instance_group[0].kind
        == model_config_pb2.ModelInstanceGroup.KIND_GPU
    )
    # The model step keeps pace with the featurizer: as many instances (README, "Benchmark
    # results").
    assert (
        configs["mol_props_onnx"].instance_group[0].count
        == configs["mol_props_featurizer"].instance_group[0].count
    )


def test_public_interface_is_smiles_in_prediction_valid_error_out():
    configs = load_repository(COMMITTED_REPOSITORY)
    for variant in ("mol_props", "mol_props:tensorrt"):
        ensemble = configs[variant]
        assert ensemble.name == "mol_props"  # one public name for both variants
        assert tensors(ensemble.input) == {"smiles": ("TYPE_STRING", [1])}
        outputs = tensors(ensemble.output)
        assert {name: spec[0] for name, spec in outputs.items()} == ENSEMBLE_OUTPUTS
        targets = json.loads(ensemble.parameters["targets"].string_value)
        assert outputs["prediction"][1] == [len(targets)]


def test_committed_configs_match_the_default_featurizer():
    config = compose_config()
    featurizer = Featurizer(config.preprocess)
    atoms, features = config.preprocess.max_atoms, featurizer.atom_feature_size
    expected = {
        "atom_features": ("TYPE_FP32", [atoms, features]),
        "adjacency": ("TYPE_FP32", [atoms, atoms]),
        "atom_mask": ("TYPE_FP32", [atoms]),
        "descriptors": ("TYPE_FP32", [featurizer.descriptor_size]),
    }
    configs = load_repository(COMMITTED_REPOSITORY)
    featurizer_outputs = tensors(configs["mol_props_featurizer"].output)
    assert {name: featurizer_outputs[name] for name in MODEL_INPUTS} == expected
    for name in ("mol_props_onnx", "mol_props_trt"):
        assert tensors(configs[name].input) == expected
    targets = json.loads(configs["mol_props"].parameters["targets"].string_value)
    # What `mol_props export` writes with the default config (so it leaves this file alone).
    assert targets == (config.data.target_names or config.data.target_columns)


@pytest.mark.parametrize("variant", ["mol_props", "mol_props:tensorrt"])
def test_ensemble_steps_are_wired(variant: str):
    configs = load_repository(COMMITTED_REPOSITORY)
    check_ensemble_wiring(configs, variant)
    steps = [step.model_name for step in configs[variant].ensemble_scheduling.step]
    model = "mol_props_trt" if variant.endswith("tensorrt") else "mol_props_onnx"
    assert steps == ["mol_props_featurizer", model]


def test_variants_differ_only_in_the_model_step():
    onnx_text = (COMMITTED_REPOSITORY / "mol_props" / "config.pbtxt").read_text()
    tensorrt_text = (COMMITTED_REPOSITORY / "mol_props" / "configs" / "tensorrt.pbtxt").read_text()
    onnx_config = text_format.Parse(onnx_text, model_config_pb2.ModelConfig())
    tensorrt_config = text_format.Parse(
        tensorrt_text.replace('"mol_props_trt"', '"mol_props_onnx"'),
        model_config_pb2.ModelConfig(),
    )
    assert onnx_config == tensorrt_config


def test_version_folders_are_kept_and_model_files_ignored():
    for name in MODELS:
        version = COMMITTED_REPOSITORY / name / "1"
        assert (version / ".gitkeep").is_file() or (version / "model.py").is_file(), name
    generated = [
        "triton_repo/mol_props_onnx/1/model.onnx",
        "triton_repo/mol_props_trt/1/model.plan",
        "triton_repo/mol_props_featurizer/1/model.json",
    ]
    result = subprocess.run(
        ["git", "check-ignore", *generated], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.stdout.split() == generated


def test_filled_repository_matches_the_onnx_model(
    filled_repository: Path, serving_model: ServingModel
):
    configs = load_repository(filled_repository)
    model = onnx_tensors(serving_model.onnx_path)
    expected_inputs = {tensor: model[tensor] for tensor in MODEL_INPUTS}
    for name in ("mol_props_onnx", "mol_props_trt"):
        assert tensors(configs[name].input) == expected_inputs
        assert tensors(configs[name].output) == {"prediction": model["prediction"]}
    for variant in ("mol_props", "mol_props:tensorrt"):
        check_ensemble_wiring(configs, variant)
    assert (filled_repository / "mol_props_onnx" / "1" / "model.onnx").is_file()
    metadata = json.loads((filled_repository / "mol_props_featurizer/1/model.json").read_text())
    assert metadata["targets"] == serving_model.metadata.targets


def test_populate_with_default_dims_leaves_configs_untouched(tmp_path: Path):
    model = build_tiny_model(tmp_path / "model", compose_config())
    repository = copy_repository(tmp_path / "triton_repo")
    populate_model_repository(repository, model.onnx_path, model.metadata, "mol_props_onnx")
    for config in COMMITTED_REPOSITORY.rglob("*.pbtxt"):
        relative = config.relative_to(COMMITTED_REPOSITORY)
        assert (repository / relative).read_text() == config.read_text(), relative


def test_populate_rewrites_dims_and_targets_for_another_model(tmp_path: Path):
    config = compose_config(["preprocess.max_atoms=64", "preprocess.fingerprint.size=32"])
    targets = ["logBB", 'odd "name"']
    model = build_tiny_model(tmp_path / "model", config, targets=targets)
    repository = copy_repository(tmp_path / "triton_repo")
    populate_model_repository(repository, model.onnx_path, model.metadata, "mol_props_onnx")

    configs = load_repository(repository)
    dims = tensor_dims(model.metadata)
    assert dims["descriptors"] == [13 + 32] and dims["prediction"] == [2]
    for name in ("mol_props_onnx", "mol_props_trt"):
        input_dims = {tensor: spec[1] for tensor, spec in tensors(configs[name].input).items()}
        assert input_dims == {tensor: dims[tensor] for tensor in MODEL_INPUTS}
    for variant in ("mol_props", "mol_props:tensorrt"):
        check_ensemble_wiring(configs, variant)
        assert json.loads(configs[variant].parameters["targets"].string_value) == targets
    # Only dims and the targets changed: the explanatory comments are still there.
    assert "# Step 2 of the ensemble" in (repository / "mol_props_onnx/config.pbtxt").read_text()


def test_populate_refuses_a_model_that_breaks_the_contract(tmp_path: Path):
    model = build_tiny_model(tmp_path / "model", compose_config())
    repository = copy_repository(tmp_path / "triton_repo")
    with pytest.raises(ModelRepositoryError, match="fixed-atoms"):
        populate_model_repository(
            repository, model.dynamic_onnx_path, model.metadata, "mol_props_onnx"
        )
    with pytest.raises(ModelRepositoryError, match="does not exist"):
        populate_model_repository(repository, model.onnx_path, model.metadata, "other_name")
    assert not (repository / "mol_props_onnx" / "1" / "model.onnx").exists()
