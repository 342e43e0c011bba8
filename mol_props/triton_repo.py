"""Put an exported model into `triton_repo/` and keep the committed configs in step with it.

The configs in `triton_repo/` are committed, complete (the server runs with auto-complete off) and
commented. Their tensor dims depend on the exported model: N = max_atoms, F and D from the
featurizer config, T = number of targets. When an export changes one of them (a larger max_atoms,
Morgan bits added to the descriptors, a second target), `populate_model_repository` rewrites those
dims in place rather than failing: otherwise every such experiment would need four hand edits that
are easy to get subtly wrong, and Triton would refuse the model anyway. Only the
`dims: [ ... ]` lines and the ensemble's `targets` parameter are touched, so comments and layout
survive and an export with the default settings leaves the files byte-identical. Anything it
cannot match (a config reorganised by hand, a renamed model) is an error naming the file to fix.

It needs neither tritonclient nor protobuf, so `mol_props export` runs without the serving extras;
tests parse the results with `tritonclient.grpc.model_config_pb2` to prove them valid.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from mol_props.errors import MolPropsError
from mol_props.infer import ModelMetadata

LOGGER = logging.getLogger(__name__)

ENSEMBLE_MODEL = "mol_props"
ENSEMBLE_CONFIGS = ("config.pbtxt", "configs/tensorrt.pbtxt")  # ONNX and TensorRT variants
FEATURIZER_MODEL = "mol_props_featurizer"
ONNX_MODEL = "mol_props_onnx"  # the name the ensemble's config uses (export.triton_model_name)
TENSORRT_MODEL = "mol_props_trt"  # scripts/onnx2trt.sh writes mol_props_trt/1/model.plan
METADATA_FILE = "model.json"  # read by triton_repo/mol_props_featurizer/1/model.py
MODEL_INPUTS = ("atom_features", "adjacency", "atom_mask", "descriptors")
MODEL_OUTPUT = "prediction"
VERSION = "1"
ONNX_TYPES = {"tensor(float)": "TYPE_FP32"}  # every model tensor is float32


class ModelRepositoryError(MolPropsError, RuntimeError):
    """triton_repo/ cannot be made consistent with the exported model without a hand edit."""


def tensor_dims(metadata: ModelMetadata) -> dict[str, list[int]]:
    """Dims (batch dimension excluded) of every tensor between the ensemble's steps."""
    atoms = metadata.max_atoms
    return {
        "atom_features": [atoms, metadata.atom_feature_size],
        "adjacency": [atoms, atoms],
        "atom_mask": [atoms],
        "descriptors": [metadata.descriptor_size],
        MODEL_OUTPUT: [len(metadata.targets)],
    }


def check_model_repository(repo_dir: Path, onnx_model_name: str) -> None:
    """`repo_dir` must hold the ONNX model's config and an ensemble that runs that model."""
    onnx_config = Path(repo_dir) / onnx_model_name / "config.pbtxt"
    ensemble_config = Path(repo_dir) / ENSEMBLE_MODEL / ENSEMBLE_CONFIGS[0]
    for path in (onnx_config, ensemble_config):
        if not path.is_file():
            raise ModelRepositoryError(f"{path} does not exist: is {repo_dir} the Triton repo?")
    if f'model_name: "{onnx_model_name}"' not in ensemble_config.read_text():
        raise ModelRepositoryError(
            f"{ensemble_config} has no step running {onnx_model_name!r}: "
            "export.triton_model_name and the ensemble must name the same model"
        )


def populate_model_repository(
    repo_dir: Path, onnx_path: Path, metadata: ModelMetadata, onnx_model_name: str
) -> None:
    """Copy the ONNX model and its metadata into `repo_dir`; rewrite config dims to match them."""
    repo_dir = Path(repo_dir)
    dims = tensor_dims(metadata)
    check_onnx_model(Path(onnx_path), dims)
    check_model_repository(repo_dir, onnx_model_name)
    onnx_config = repo_dir / onnx_model_name / "config.pbtxt"
    step_tensors = {name: dims[name] for name in MODEL_INPUTS}
    targets = json.dumps(metadata.targets)
    rewrites = [
        (repo_dir / FEATURIZER_MODEL / "config.pbtxt", step_tensors, None),
        (onnx_config, dims, None),
        (repo_dir / TENSORRT_MODEL / "config.pbtxt", dims, None),
    ] + [
        (repo_dir / ENSEMBLE_MODEL / name, {MODEL_OUTPUT: dims[MODEL_OUTPUT]}, targets)
        for name in ENSEMBLE_CONFIGS
    ]
    for path, expected, targets_value in rewrites:
        if path.is_file():
            rewrite_config(path, expected, targets_value)

    model_target = repo_dir / onnx_model_name / VERSION / "model.onnx"
    model_target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_target)
    metadata_target = repo_dir / FEATURIZER_MODEL / VERSION / METADATA_FILE
    metadata_target.parent.mkdir(parents=True, exist_ok=True)
    metadata.save(metadata_target)
    LOGGER.info("Triton repository %s: %s and %s", repo_dir, model_target, metadata_target)


def check_onnx_model(onnx_path: Path, dims: dict[str, list[int]]) -> None:
    """The ONNX file must have the tensors the configs describe: names, float32, fixed dims."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tensors = {tensor.name: tensor for tensor in session.get_inputs() + session.get_outputs()}
    for name, expected in dims.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ModelRepositoryError(
                f"{onnx_path} has no tensor {name!r} (has {sorted(tensors)})"
            )
        if tensor.type not in ONNX_TYPES:
            raise ModelRepositoryError(f"{onnx_path}: {name} is {tensor.type}, expected float32")
        if list(tensor.shape[1:]) != expected:
            raise ModelRepositoryError(
                f"{onnx_path}: {name} has shape {tensor.shape}, the metadata needs "
                f"[batch, {', '.join(map(str, expected))}] (is this the fixed-atoms model?)"
            )


def rewrite_config(path: Path, dims: dict[str, list[int]], targets: str | None = None) -> bool:
    """Set each named tensor's dims (and the `targets` parameter) in a config.pbtxt in place.

    Returns whether the file changed. Tensors are found by their `name:` / `data_type:` / `dims:`
    lines, the layout every config in triton_repo/ keeps."""
    text = original = path.read_text()
    for name, expected in dims.items():
        pattern = re.compile(
            rf'(name:\s*"{re.escape(name)}"\s*data_type:\s*\w+\s*dims:\s*)\[[^\]]*\]'
        )
        text, count = pattern.subn(rf"\g<1>[ {', '.join(map(str, expected))} ]", text)
        if count == 0:
            raise ModelRepositoryError(
                f'{path}: no `name: "{name}"` / `data_type:` / `dims: [...]` block to update'
            )
    if targets is not None:
        pattern = re.compile(
            r'(key:\s*"targets"\s*value:\s*\{\s*string_value:\s*)"(?:[^"\\]|\\.)*"'
        )
        text, count = pattern.subn(lambda match: match.group(1) + _quote(targets), text)
        if count != 1:
            raise ModelRepositoryError(f'{path}: no `parameters {{ key: "targets" ... }}` block')
    if text == original:
        return False
    path.write_text(text)
    LOGGER.warning("rewrote tensor dims / targets in %s to match the exported model", path)
    return True


def _quote(value: str) -> str:
    """A protobuf text-format string literal (ASCII: json.dumps escaped anything else)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
