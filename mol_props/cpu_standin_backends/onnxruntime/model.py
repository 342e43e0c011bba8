"""CPU STAND-IN for Triton's onnxruntime backend, written as a Triton python-based backend.

The `tritonserver` that the nvidia-pytriton wheel bundles has only the python backend, and no
onnxruntime backend exists on the package registry. `mol_props serve` copies this file to
`<backend-dir>/onnxruntime/model.py`; Triton then serves every model whose config says
`platform: "onnxruntime_onnx"` with it, so `triton_repo/` stays exactly what the official Triton
container (with its real onnxruntime backend) loads. It is for CPU machines and tests only.

Like the real backend with auto-complete off, it refuses a config whose inputs or outputs disagree
with the ONNX file, and it reads the real backend's `intra_op_thread_count` /
`inter_op_thread_count` parameters. A dynamic batch of requests is run as one ONNX Runtime call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

DEFAULT_MODEL_FILENAME = "model.onnx"

# ONNX Runtime's type strings -> Triton's config data types.
ONNX_TO_TRITON = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        model_file = config.get("default_model_filename") or DEFAULT_MODEL_FILENAME
        model_path = Path(args["model_repository"]) / args["model_version"] / model_file
        if not model_path.is_file():
            raise pb_utils.TritonModelException(
                f"{config['name']}: no ONNX model at {model_path} (run `mol_props export`)"
            )
        parameters = {
            key: value["string_value"] for key, value in config.get("parameters", {}).items()
        }
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_thread_count", 0))
        options.inter_op_num_threads = int(parameters.get("inter_op_thread_count", 0))
        # Idle pool threads would otherwise spin on the cores the featurizer needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        _check_tensors("input", config["input"], self.session.get_inputs(), self.batched)
        _check_tensors("output", config["output"], self.session.get_outputs(), self.batched)

    def execute(self, requests: list) -> list:
        """Concatenate the batch's requests, run once, split the outputs back per request."""
        responses: list = [None] * len(requests)
        inputs: dict[int, list[np.ndarray]] = {}
        for i, request in enumerate(requests):
            arrays = [
                pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.input_names
            ]
            if len({len(array) for array in arrays}) > 1:
                responses[i] = _error("the inputs of this request differ in batch size")
            else:
                inputs[i] = arrays
        if not inputs:
            return responses
        try:
            feed = {
                name: _concatenate([arrays[k] for arrays in inputs.values()])
                for k, name in enumerate(self.input_names)
            }
            outputs = self.session.run(self.output_names, feed)
        except Exception:  # a request that breaks the batch must fail alone: run them one by one
            for i, arrays in inputs.items():
                responses[i] = self._run(arrays)
            return responses
        start = 0
        for i, arrays in inputs.items():
            size = len(arrays[0])
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(output[start : start + size]))
                for name, output in zip(self.output_names, outputs)
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += size
        return responses

    def _run(self, arrays: list[np.ndarray]):
        try:
            outputs = self.session.run(self.output_names, dict(zip(self.input_names, arrays)))
        except Exception as error:  # this request's own failure, reported to its client
            return _error(str(error))
        tensors = [
            pb_utils.Tensor(name, output) for name, output in zip(self.output_names, outputs)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def _check_tensors(kind: str, configured: list[dict], actual: list, batched: bool) -> None:
    """Config tensors must match the ONNX model's names, types and shapes (batch dim aside)."""
    by_name = {tensor.name: tensor for tensor in actual}
    for tensor in configured:
        model_tensor = by_name.get(tensor["name"])
        if model_tensor is None:
            raise pb_utils.TritonModelException(
                f"config {kind} {tensor['name']!r} is not in the ONNX model "
                f"(it has {sorted(by_name)})"
            )
        model_type = ONNX_TO_TRITON.get(model_tensor.type, model_tensor.type)
        if model_type != tensor["data_type"]:
            raise pb_utils.TritonModelException(
                f"{kind} {tensor['name']!r}: config says {tensor['data_type']}, "
                f"the ONNX model has {model_type}"
            )
        model_dims = model_tensor.shape[1:] if batched else model_tensor.shape
        config_dims = [int(dim) for dim in tensor["dims"]]
        # A named (symbolic) ONNX dimension is dynamic: only -1 in the config matches it.
        expected = [dim if isinstance(dim, int) else -1 for dim in model_dims]
        if config_dims != expected:
            raise pb_utils.TritonModelException(
                f"{kind} {tensor['name']!r}: config dims {config_dims}, "
                f"the ONNX model has {expected} (batch dimension excluded)"
            )
