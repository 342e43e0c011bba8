"""Step 1 of the `mol_props` ensemble: SMILES strings -> the model's padded input tensors.

A Triton python-backend model that runs the project's one featurizer (mol_props.featurize: RDKit +
numpy), rebuilt in `initialize` from the metadata `mol_props export` wrote next to this file, so a
molecule is featurized here exactly as in training and `mol_props infer`.

Every molecule gets an answer. One that cannot be featurized gets `valid = false` and the
featurizer's reason in `error`; a placeholder graph (one atom, all features zero) goes on to the
model in its place so that its row stays finite (an all-padding row could divide by zero atoms in
mean pooling). Its prediction means nothing: clients read `valid`. Only a request that is not a
request for SMILES at all is refused, by Triton itself, before it reaches this code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mol_props.featurize import FeaturizationError, MoleculeGraph, pad_graphs
from mol_props.infer import ModelMetadata

METADATA_FILE = "model.json"  # written by mol_props.triton_repo.populate_model_repository
NOT_UTF8 = "SMILES is not valid UTF-8"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        metadata_path = Path(args["model_repository"]) / args["model_version"] / METADATA_FILE
        if not metadata_path.is_file():
            raise pb_utils.TritonModelException(
                f"no model metadata at {metadata_path}: run `mol_props export` first"
            )
        metadata = ModelMetadata.load(metadata_path)
        self.featurizer = metadata.featurizer()
        self.num_atoms = metadata.max_atoms
        self.descriptor_size = self.featurizer.descriptor_size
        self.atom_feature_size = self.featurizer.atom_feature_size
        self.placeholder = MoleculeGraph(
            atom_features=np.zeros((1, self.atom_feature_size), dtype=np.float32),
            adjacency=np.zeros((1, 1), dtype=np.float32),
            descriptors=np.zeros(self.descriptor_size, dtype=np.float32),
        )
        _check_config_dims(json.loads(args["model_config"]), self._output_dims())

    def _output_dims(self) -> dict[str, list[int]]:
        return {
            "atom_features": [self.num_atoms, self.atom_feature_size],
            "adjacency": [self.num_atoms, self.num_atoms],
            "atom_mask": [self.num_atoms],
            "descriptors": [self.descriptor_size],
            "valid": [1],
            "error": [1],
        }

    def execute(self, requests: list) -> list:
        """Featurize the whole dynamic batch at once, then hand each request its own rows."""
        smiles: list[str | None] = []
        sizes: list[int] = []
        for request in requests:
            texts = _decode(pb_utils.get_input_tensor_by_name(request, "smiles").as_numpy())
            smiles.extend(texts)
            sizes.append(len(texts))
        graphs: list[MoleculeGraph] = []
        errors: list[str] = []
        for result in self._featurize(smiles):
            if isinstance(result, MoleculeGraph):
                graphs.append(result)
                errors.append("")
            else:
                graphs.append(self.placeholder)
                errors.append(result)
        batch = pad_graphs(graphs, self.num_atoms, self.descriptor_size, self.atom_feature_size)
        arrays = batch.as_inputs()  # atom_features [B, N, F], adjacency [B, N, N], ...
        arrays["valid"] = np.array([[not error] for error in errors], dtype=bool)  # [B, 1]
        arrays["error"] = np.array([[error.encode()] for error in errors], dtype=np.object_)
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, array[start : start + size])
                for name, array in arrays.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def _featurize(self, smiles: list[str | None]) -> list[MoleculeGraph | str]:
        """A graph or the reason why not, per molecule. Undecodable bytes never reach RDKit."""
        texts = [text if text is not None else "" for text in smiles]
        try:
            results = self.featurizer.featurize_many(texts)
        except Exception:  # an RDKit failure the featurizer did not foresee: find its molecule
            results = [self._featurize_one(text) for text in texts]
        outcomes: list[MoleculeGraph | str] = []
        for text, result in zip(smiles, results):
            if text is None:
                outcomes.append(NOT_UTF8)
            elif isinstance(result, FeaturizationError):
                outcomes.append(result.reason)
            else:
                outcomes.append(result)
        return outcomes

    def _featurize_one(self, text: str) -> MoleculeGraph | FeaturizationError:
        try:
            return self.featurizer.featurize_many([text])[0]
        except Exception as error:
            return FeaturizationError(text, f"featurization failed: {type(error).__name__}")


def _decode(values: np.ndarray) -> list[str | None]:
    """[b, 1] object array of bytes -> one str per molecule (None where not UTF-8)."""
    texts: list[str | None] = []
    for value in values.reshape(-1):
        try:
            texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
        except UnicodeDecodeError:
            texts.append(None)
    return texts


def _check_config_dims(config: dict, expected: dict[str, list[int]]) -> None:
    """Fail at load, not at the first request, if config.pbtxt disagrees with the metadata."""
    for tensor in config["output"]:
        dims = [int(dim) for dim in tensor["dims"]]
        if tensor["name"] in expected and dims != expected[tensor["name"]]:
            raise pb_utils.TritonModelException(
                f"output {tensor['name']!r}: config.pbtxt dims {dims}, the exported model needs "
                f"{expected[tensor['name']]}; re-run `mol_props export` to rewrite the configs"
            )
