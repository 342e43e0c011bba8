"""`mol_props export`: the ONNX contract (fixed atoms and widths, dynamic batch), the checker,
parity with PyTorch on real molecules (and a loud failure when they disagree), the metadata."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from mol_props import export
from mol_props.config import compose_config
from mol_props.export import (
    INPUT_NAMES,
    ExportError,
    check_parity,
    example_inputs,
    export_onnx,
    load_prediction_model,
    onnx_input_shapes,
)
from mol_props.featurize import FEATURIZER_VERSION, Featurizer, MoleculeGraph
from mol_props.infer import ModelMetadata

from .conftest import REPO_ROOT, ExportedModel, b3db_rows

TOLERANCE = 1e-4  # the acceptance bound for ONNX Runtime vs PyTorch


def real_graphs(metadata: ModelMetadata, count: int) -> list[MoleculeGraph]:
    featurizer = Featurizer(metadata.preprocess_config())
    results = featurizer.featurize_many([row["SMILES"] for row in b3db_rows(count)])
    return [result for result in results if isinstance(result, MoleculeGraph)]


@pytest.fixture(scope="module")
def metadata(exported_model: ExportedModel) -> ModelMetadata:
    return ModelMetadata.load(exported_model.metadata_path)


def output_shape(path: Path) -> list[int | str]:
    (output,) = onnx.load(str(path)).graph.output
    return [dim.dim_value or dim.dim_param for dim in output.type.tensor_type.shape.dim]


def test_fixed_model_fixes_atoms_and_widths_with_a_dynamic_batch(
    exported_model: ExportedModel, metadata: ModelMetadata
):
    atoms, width = metadata.max_atoms, metadata.atom_feature_size
    assert onnx_input_shapes(exported_model.onnx_path) == {
        "atom_features": ["batch", atoms, width],
        "adjacency": ["batch", atoms, atoms],
        "atom_mask": ["batch", atoms],
        "descriptors": ["batch", metadata.descriptor_size],
    }
    assert output_shape(exported_model.onnx_path) == ["batch", len(metadata.targets)]


def test_dynamic_atoms_model_leaves_the_atom_axis_open(
    exported_model: ExportedModel, metadata: ModelMetadata
):
    shapes = onnx_input_shapes(exported_model.dynamic_onnx_path)
    assert shapes["adjacency"] == ["batch", "atoms", "atoms"]
    assert shapes["atom_features"] == ["batch", "atoms", metadata.atom_feature_size]
    assert shapes["descriptors"] == ["batch", metadata.descriptor_size]


@pytest.mark.parametrize("name", ["onnx_path", "dynamic_onnx_path"])
def test_exported_models_pass_the_onnx_checker(exported_model: ExportedModel, name: str):
    onnx.checker.check_model(onnx.load(str(getattr(exported_model, name))), full_check=True)


def test_metadata_file_sits_beside_the_model_and_matches_the_checkpoint(
    exported_model: ExportedModel, metadata: ModelMetadata
):
    assert exported_model.metadata_path.parent == exported_model.onnx_path.parent
    _, payload = load_prediction_model(exported_model.models_dir / "best.ckpt")
    assert metadata.task == payload["task"] == "classification"
    assert metadata.targets == list(payload["targets"])
    assert metadata.featurizer_version == FEATURIZER_VERSION
    assert metadata.max_atoms == payload["preprocess"]["max_atoms"]
    featurizer = metadata.featurizer()  # refuses widths that differ from the model's
    assert metadata.atom_feature_size == payload["atom_feature_size"] == len(featurizer)
    assert metadata.descriptor_size == payload["descriptor_size"]


@pytest.mark.parametrize("batch", [1, 5, 64])
def test_onnx_runtime_matches_pytorch_on_real_molecules(
    exported_model: ExportedModel, metadata: ModelMetadata, batch: int
):
    """Any batch size (the batch axis is dynamic), at the fixed and at a smaller padding."""
    model, _ = load_prediction_model(exported_model.models_dir / "best.ckpt")
    graphs = real_graphs(metadata, 80)[:batch]
    featurizer = metadata.featurizer()
    fixed = example_inputs(graphs, metadata.max_atoms, featurizer)
    small = example_inputs(graphs, max(graph.num_atoms for graph in graphs), featurizer)
    assert check_parity(model, exported_model.onnx_path, fixed, TOLERANCE) <= TOLERANCE
    assert check_parity(model, exported_model.dynamic_onnx_path, small, TOLERANCE) <= TOLERANCE


def test_a_checkpoint_from_before_the_kernel_member_loads_with_it_off(
    exported_model: ExportedModel, metadata: ModelMetadata, tmp_path: Path
):
    payload = torch.load(exported_model.models_dir / "best.ckpt", weights_only=True)
    del payload["preprocess"]["kernel_fingerprint"]  # what checkpoints of that time held
    older = tmp_path / "older.ckpt"
    torch.save(payload, older)
    model, _ = load_prediction_model(exported_model.models_dir / "best.ckpt")
    older_model, _ = load_prediction_model(older)
    assert older_model.network.counts_end == model.network.counts_end
    inputs = example_inputs(real_graphs(metadata, 8), metadata.max_atoms, metadata.featurizer())
    tensors = [torch.from_numpy(inputs[name]) for name in INPUT_NAMES]
    with torch.no_grad():
        assert torch.equal(older_model(*tensors), model(*tensors))


def test_parity_check_fails_loudly_when_onnx_and_pytorch_disagree(
    exported_model: ExportedModel, metadata: ModelMetadata
):
    model, _ = load_prediction_model(exported_model.models_dir / "best.ckpt")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05)  # the ONNX file keeps the trained weights
    inputs = example_inputs(real_graphs(metadata, 16), metadata.max_atoms, metadata.featurizer())
    with pytest.raises(ExportError, match="differs from PyTorch by"):
        check_parity(model, exported_model.onnx_path, inputs, TOLERANCE)


def test_export_command_prints_the_max_difference_and_writes_all_files(
    exported_model: ExportedModel,
    metadata: ModelMetadata,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
):
    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")
    config = compose_config(
        [
            *exported_model.overrides,
            f"export.onnx_path={tmp_path / 'model.onnx'}",
            f"export.dynamic_onnx_path={tmp_path / 'model_dynamic_atoms.onnx'}",
            f"export.metadata_path={tmp_path / 'model.json'}",
            f"serving.triton_repo={tmp_path / 'triton_repo'}",
        ]
    )
    result = export.run(config, validation_graphs=real_graphs(metadata, 40))
    printed = capsys.readouterr().out
    assert "parity ONNX Runtime vs PyTorch on" in printed
    assert f"max |diff| = {result.max_difference:.2e}" in printed
    assert result.max_difference <= TOLERANCE
    assert ModelMetadata.load(tmp_path / "model.json") == metadata
    assert (tmp_path / "triton_repo" / "mol_props_onnx" / "1" / "model.onnx").is_file()
    # The new fixed model answers like the one the fixture exported.
    inputs = example_inputs(real_graphs(metadata, 8), metadata.max_atoms, metadata.featurizer())
    answers = [
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, inputs
        )[0]
        for path in (tmp_path / "model.onnx", exported_model.onnx_path)
    ]
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-6)


def test_unknown_exporter_is_refused(exported_model: ExportedModel, tmp_path: Path):
    model, _ = load_prediction_model(exported_model.models_dir / "best.ckpt")
    with pytest.raises(ExportError, match="export.exporter='jit'"):
        export_onnx(model, {}, tmp_path / "m.onnx", 17, dynamic_atoms=False, exporter="jit")


def test_dynamo_exporter_without_onnxscript_says_what_is_missing(
    exported_model: ExportedModel, tmp_path: Path
):
    if importlib.util.find_spec("onnxscript") is not None:
        pytest.skip("onnxscript is installed: the dynamo exporter can run")
    model, _ = load_prediction_model(exported_model.models_dir / "best.ckpt")
    with pytest.raises(ExportError, match="onnxscript"):
        export_onnx(model, {}, tmp_path / "m.onnx", 17, dynamic_atoms=False, exporter="dynamo")


def test_missing_checkpoint_names_the_training_command(tmp_path: Path):
    with pytest.raises(ExportError, match="mol_props train"):
        load_prediction_model(tmp_path / "best.ckpt")


def export_config_with_opset(exported_model: ExportedModel, tmp_path: Path, opset: int):
    """The exported model's config, exporting at `opset` into `tmp_path`."""
    return compose_config(
        [
            *exported_model.overrides,
            f"export.opset={opset}",
            f"export.onnx_path={tmp_path / 'model.onnx'}",
            f"export.dynamic_onnx_path={tmp_path / 'model_dynamic_atoms.onnx'}",
            f"export.metadata_path={tmp_path / 'model.json'}",
            f"serving.triton_repo={tmp_path / 'triton_repo'}",
        ]
    )


def test_an_opset_that_drops_the_output_shape_is_refused_before_publishing(
    exported_model: ExportedModel, metadata: ModelMetadata, tmp_path: Path
):
    """PyTorch loses the output's target axis at opset 10 (declared [batch], or with the forest
    member [batch, <symbol>]; ONNX Runtime still answers [batch, T]); Triton would refuse that
    model, so export stops and names the setting."""
    config = export_config_with_opset(exported_model, tmp_path, 10)
    with pytest.raises(ExportError, match=r"declared as \['batch'.*export.opset=11 or later"):
        export.run(config, validation_graphs=real_graphs(metadata, 8))
    assert not (tmp_path / "model.json").exists()


def test_an_opset_pytorch_cannot_export_names_the_setting(
    exported_model: ExportedModel, metadata: ModelMetadata, tmp_path: Path
):
    config = export_config_with_opset(exported_model, tmp_path, 99)
    with pytest.raises(ExportError, match="export.opset=99: .*the default, 17, works"):
        export.run(config, validation_graphs=real_graphs(metadata, 8))
    assert not (tmp_path / "model.json").exists()
