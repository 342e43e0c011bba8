"""Export: models/best.ckpt -> ONNX (fixed max_atoms, dynamic batch), checked against PyTorch.

Writes
  models/model.onnx                 [B, max_atoms, ...] inputs: the Triton / TensorRT contract
  models/model_dynamic_atoms.onnx   same graph with the atom axis dynamic: local size buckets
  models/model.json                 ModelMetadata: task, targets, featurizer settings and widths
and copies the fixed model into triton_repo/. The model outputs what a user wants (probability or
original units), so no step after it needs to know about scaling.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mol_props.config import Config, ModelConfig, PreprocessConfig
from mol_props.errors import MolPropsError
from mol_props.featurize import FEATURIZER_VERSION, Featurizer, MoleculeGraph, pad_graphs
from mol_props.infer import ModelMetadata, preprocess_from_dict
from mol_props.model import MEMBER_CLASSES, Member, MoleculeGNN, PredictionModel

LOGGER = logging.getLogger(__name__)

INPUT_NAMES = ["atom_features", "adjacency", "atom_mask", "descriptors"]
OUTPUT_NAME = "prediction"
EXPORTERS = ("torchscript", "dynamo")
PARITY_SMALL_BATCH = 3  # molecules in the second parity batch (any size but the traced one)


class ExportError(MolPropsError, RuntimeError):
    """The exported model is missing, invalid, or disagrees with PyTorch."""


def load_prediction_model(checkpoint: Path) -> tuple[PredictionModel, dict]:
    """The trained network wrapped with its output step, in eval mode, plus the checkpoint."""
    if not checkpoint.is_file():
        raise ExportError(
            f"no checkpoint at {checkpoint}: train first with `uv run mol_props train`"
        )
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_config = ModelConfig(**payload["model_config"])
    preprocess = preprocess_from_dict(payload["preprocess"])  # older checkpoints: fewer settings
    network = MoleculeGNN(
        payload["atom_feature_size"],
        payload["descriptor_size"],
        len(payload["targets"]),
        model_config,
        fingerprint_size=preprocess.fingerprint.size,
        kernel_fingerprint_size=preprocess.kernel_fingerprint.size,
        smiles_token_count=preprocess.smiles_tokens,
    )
    network.load_state_dict(payload["model"])
    weights = {
        "forest": model_config.forest_weight,
        "kernel": model_config.kernel_weight,
        "chemnet": model_config.chemnet_weight,
    }
    members = [
        Member(name, member_class.from_state(payload[name]), weights[name])
        for name, member_class in MEMBER_CLASSES.items()
        if name in payload
    ]
    model = PredictionModel(
        network,
        payload["task"],
        torch.tensor(payload["target_mean"], dtype=torch.float32),
        torch.tensor(payload["target_std"], dtype=torch.float32),
        members,
    )
    return model.eval(), payload


def example_inputs(
    graphs: list[MoleculeGraph], num_atoms: int, featurizer: Featurizer
) -> dict[str, np.ndarray]:
    batch = pad_graphs(graphs, num_atoms, featurizer.descriptor_size, len(featurizer))
    return batch.as_inputs()


def export_onnx(
    model: PredictionModel,
    inputs: dict[str, np.ndarray],
    path: Path,
    opset: int,
    dynamic_atoms: bool,
    exporter: str = "torchscript",
) -> None:
    """ONNX export with a dynamic batch (and optionally atom) axis.

    `exporter`: "torchscript" (torch.jit tracing; the default, needs nothing beyond torch) or
    "dynamo" (torch.export; needs the onnxscript package)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"export.exporter={exporter!r}: use one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ExportError(
            "export.exporter=dynamo needs the onnxscript package; "
            "use export.exporter=torchscript or install onnxscript"
        )
    batch_axes = {name: {0: "batch"} for name in INPUT_NAMES}
    batch_axes[OUTPUT_NAME] = {0: "batch"}
    if dynamic_atoms:
        batch_axes["atom_features"][1] = "atoms"
        batch_axes["adjacency"].update({1: "atoms", 2: "atoms"})
        batch_axes["atom_mask"][1] = "atoms"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                tuple(torch.from_numpy(inputs[name]) for name in INPUT_NAMES),
                str(path),
                input_names=INPUT_NAMES,
                output_names=[OUTPUT_NAME],
                dynamic_axes=batch_axes,
                opset_version=opset,
                dynamo=exporter == "dynamo",
            )
    except RuntimeError as error:
        if "opset" not in str(error).lower():
            raise  # anything else is a bug, with its traceback
        raise ExportError(f"export.opset={opset}: {error} (the default, 17, works)") from None
    _restore_unread_inputs(path, inputs, batch_axes)


def _restore_unread_inputs(
    path: Path, inputs: dict[str, np.ndarray], axes: dict[str, dict[int, str]]
) -> None:
    """PyTorch's exporter drops an input the model never reads (the descriptors, with
    model.descriptor_hidden_dim=0); Triton's configs and `mol_props infer` feed all four to
    every model, so such an input is put back, unread (ONNX Runtime and Triton accept that)."""
    import onnx

    model = onnx.load(str(path))
    present = {value.name for value in model.graph.input}
    missing = [name for name in INPUT_NAMES if name not in present]
    if not missing:
        return
    for name in missing:
        shape = [axes[name].get(i, size) for i, size in enumerate(inputs[name].shape)]
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
        )
    onnx.save(model, str(path))


def _shapes(values) -> dict[str, list[int | str]]:
    """Name -> shape of ONNX graph inputs or outputs: an int per fixed dim, a symbol otherwise."""
    return {
        value.name: [
            dim.dim_value if dim.HasField("dim_value") else dim.dim_param
            for dim in value.type.tensor_type.shape.dim
        ]
        for value in values
    }


def onnx_input_shapes(path: Path) -> dict[str, list[int | str]]:
    """Input name -> shape of an ONNX model: an int per fixed dim, the symbol of a dynamic one."""
    import onnx

    return _shapes(onnx.load(str(path), load_external_data=False).graph.input)


def check_fixed_shapes(
    path: Path, inputs: dict[str, np.ndarray], num_targets: int, opset: int
) -> None:
    """The Triton / TensorRT contract: dynamic batch, every other dim fixed as in `inputs`, and
    one output [batch, num_targets]."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = _shapes(graph.input)
    for name in INPUT_NAMES:
        expected = ["batch", *inputs[name].shape[1:]]
        if shapes.get(name) != expected:
            raise ExportError(f"{path}: input {name} has shape {shapes.get(name)}, not {expected}")
    output = _shapes(graph.output).get(OUTPUT_NAME)
    if output != ["batch", num_targets]:
        # PyTorch's exporter declares the output as [batch] below opset 11 (7, 9 and 10 seen
        # here), although ONNX Runtime returns [batch, T]: Triton would refuse the model.
        raise ExportError(
            f"{path}: output {OUTPUT_NAME} is declared as {output}, not ['batch', {num_targets}], "
            f"with export.opset={opset}; export with export.opset=11 or later (default 17)"
        )


def float32_rounding(model: PredictionModel, inputs: dict[str, np.ndarray]) -> float:
    """Max |PyTorch in float32 - PyTorch in float64| on `inputs`: how far the model's own
    float32 arithmetic is from exact. Tiny for the network and the forest; a kernel member over
    thousands of molecules sums products that cancel, and loses ~1e-4 to rounding order."""
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        single = model(*(torch.from_numpy(inputs[name]) for name in INPUT_NAMES))
        double = reference(*(torch.from_numpy(inputs[name]).double() for name in INPUT_NAMES))
    return float((single.double() - double).abs().max())


def check_parity(
    model: PredictionModel, path: Path, inputs: dict[str, np.ndarray], tolerance: float
) -> float:
    """Max |ONNX Runtime - PyTorch| on the given inputs; raises above `tolerance` plus twice the
    model's own float32 rounding (`float32_rounding`): two float32 runs that each round that
    much may differ by both, and no exporter can do better."""
    import onnx
    import onnxruntime

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_output,) = session.run([OUTPUT_NAME], inputs)  # [B, T]
    with torch.no_grad():
        torch_output = model(*(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)).numpy()
    difference = float(np.max(np.abs(onnx_output - torch_output)))
    if difference <= tolerance:
        return difference
    rounding = float32_rounding(model, inputs)
    if not difference <= tolerance + 2 * rounding:
        raise ExportError(
            f"{path}: ONNX Runtime differs from PyTorch by {difference:.2e} (tolerance "
            f"{tolerance:.0e}, plus twice PyTorch's own float32 rounding, {rounding:.1e} "
            "against float64)"
        )
    return difference


def _validation_graphs(
    config: Config, preprocess: PreprocessConfig, count: int
) -> list[MoleculeGraph]:
    """Validation molecules of the configured data, featurized as the checkpoint was trained."""
    from mol_props.data import prepare_data

    data = prepare_data(config.data, preprocess, progress=False)
    rows = data.splits["val"] if len(data.splits["val"]) else data.splits["train"]
    return [data.graphs[i] for i in rows[:count]]


@dataclass
class ExportResult:
    onnx_path: Path
    dynamic_onnx_path: Path
    metadata_path: Path
    max_difference: float


def run(config: Config, validation_graphs: list[MoleculeGraph] | None = None) -> ExportResult:
    """The `mol_props export` command."""
    settings = config.export
    model, payload = load_prediction_model(Path(settings.checkpoint))
    # The metadata inference will read, built first so that the parity check featurizes exactly
    # as inference will (and the featurizer widths are checked against the checkpoint's).
    metadata = ModelMetadata(
        task=payload["task"],
        targets=list(payload["targets"]),
        max_atoms=payload["preprocess"]["max_atoms"],
        atom_feature_size=payload["atom_feature_size"],
        descriptor_size=payload["descriptor_size"],
        featurizer_version=FEATURIZER_VERSION,
        preprocess=payload["preprocess"],
    )
    preprocess = metadata.preprocess_config()
    featurizer = metadata.featurizer()
    graphs = validation_graphs or _validation_graphs(config, preprocess, settings.parity_molecules)
    max_atoms = preprocess.max_atoms
    fixed_path, dynamic_path = Path(settings.onnx_path), Path(settings.dynamic_onnx_path)

    tolerance = settings.parity_tolerance
    fixed_inputs = example_inputs(graphs, max_atoms, featurizer)
    # Another batch size than the traced one: proves the batch axis really is dynamic.
    few_inputs = {name: array[:PARITY_SMALL_BATCH] for name, array in fixed_inputs.items()}
    export_onnx(model, fixed_inputs, fixed_path, settings.opset, False, settings.exporter)
    check_fixed_shapes(fixed_path, fixed_inputs, len(metadata.targets), settings.opset)
    differences = [
        check_parity(model, fixed_path, fixed_inputs, tolerance),
        check_parity(model, fixed_path, few_inputs, tolerance),
    ]

    # The dynamic model is checked at a small padding, against PyTorch at the same padding.
    small_atoms = max(graph.num_atoms for graph in graphs)
    small_inputs = example_inputs(graphs, small_atoms, featurizer)
    export_onnx(model, small_inputs, dynamic_path, settings.opset, True, settings.exporter)
    differences += [
        check_parity(model, dynamic_path, small_inputs, tolerance),
        check_parity(model, dynamic_path, fixed_inputs, tolerance),
        check_parity(model, dynamic_path, few_inputs, tolerance),
    ]
    difference = max(differences)
    allowance = f"tolerance {tolerance:.0e}"
    if difference > tolerance:  # passed on the model's own float32 rounding (check_parity)
        rounding = float32_rounding(model, fixed_inputs)
        allowance += f", plus twice PyTorch's own float32 rounding: {rounding:.1e} against float64"
    print(
        f"export: parity ONNX Runtime vs PyTorch on {len(graphs)} validation molecules: "
        f"max |diff| = {difference:.2e} ({allowance})"
    )
    metadata_path = Path(settings.metadata_path)
    metadata.save(metadata_path)
    _publish(config, fixed_path, metadata)
    return ExportResult(fixed_path, dynamic_path, metadata_path, difference)


def _publish(config: Config, onnx_path: Path, metadata: ModelMetadata) -> None:
    """Copy the model into triton_repo/ and version models/ with DVC (when configured)."""
    from mol_props.triton_repo import populate_model_repository

    populate_model_repository(
        Path(config.serving.triton_repo), onnx_path, metadata, config.export.triton_model_name
    )
    print(f"export: Triton model repository updated: {config.serving.triton_repo}")
    if config.export.dvc_track and config.data.dvc.enabled:
        from mol_props.artifacts import dvc_add_and_push

        models_dir = Path(config.train.models_dir)
        try:
            (dvc_file,) = dvc_add_and_push([models_dir], config.data.dvc)
        except Exception as error:  # dvc raises many types; the export itself succeeded
            LOGGER.warning("export: could not version %s with DVC: %s", models_dir, error)
        else:
            print(f"export: {models_dir} pushed to DVC remote; commit {dvc_file} to share it")
