"""The kernel member as tensor operations: scikit-learn's kernel ridge regression on the same
Tanimoto similarities, from the model's padded inputs, through a checkpoint and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from sklearn.kernel_ridge import KernelRidge

from mol_props.config import compose_config
from mol_props.errors import ConfigError
from mol_props.export import (
    ExportError,
    check_parity,
    example_inputs,
    export_onnx,
    float32_rounding,
)
from mol_props.featurize import Featurizer, MoleculeGraph, pad_graphs
from mol_props.kernel import TanimotoKernelRidge, fit_kernel, tanimoto
from mol_props.model import Member, PredictionModel
from tests.conftest import b3db_spread, new_network

INPUT_NAMES = ["atom_features", "adjacency", "atom_mask", "descriptors"]
KERNEL_COUNTS = 128


@pytest.fixture(scope="module")
def molecules() -> tuple[list[MoleculeGraph], np.ndarray, np.ndarray, Featurizer]:
    """120 real B3DB molecules featurized with a kernel fingerprint: graphs, BBB labels [M],
    logBB-like values [M], the featurizer."""
    featurizer = Featurizer(
        compose_config([f"preprocess.kernel_fingerprint.size={KERNEL_COUNTS}"]).preprocess
    )
    graphs, labels, values = b3db_spread(featurizer, step=60, count=120)
    return graphs, labels, values, featurizer


def _counts(graphs: list[MoleculeGraph]) -> np.ndarray:
    return np.stack([graph.descriptors[-KERNEL_COUNTS:] for graph in graphs])  # [M, K]


def _padded(graphs: list[MoleculeGraph], featurizer: Featurizer) -> dict[str, torch.Tensor]:
    batch = pad_graphs(graphs, 128, featurizer.descriptor_size, featurizer.atom_feature_size)
    return {name: torch.from_numpy(array) for name, array in batch.as_inputs().items()}


def test_tanimoto_of_counts():
    counts = np.array([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    similarity = tanimoto(counts, counts)
    assert similarity[0, 1] == 1.0  # the same counts
    assert similarity[0, 2] == 0.0  # no environment in common
    assert similarity[3, 3] == 0.0  # nothing to compare: 0, not NaN
    partial = tanimoto(np.array([[2.0, 1.0]]), np.array([[1.0, 1.0]]))[0, 0]
    assert partial == pytest.approx(3.0 / (5.0 + 2.0 - 3.0))  # a.b / (|a|^2 + |b|^2 - a.b)


def test_regression_equals_scikit_learn_kernel_ridge_per_labelled_target(molecules):
    graphs, _, values, featurizer = molecules
    counts = _counts(graphs)
    targets = np.stack([values, -2 * values], axis=1)[:90]  # [90, 2]
    targets[::3, 1] = np.nan  # the second target misses a third of its labels
    kernel = fit_kernel(counts[:90], targets, "regression", ridge=0.1)
    inputs = _padded(graphs[90:], featurizer)
    with torch.no_grad():
        predicted = kernel.molecule_forward(
            inputs["atom_features"], inputs["atom_mask"], inputs["descriptors"]
        ).numpy()  # [30, 2]
    for k in range(2):
        labelled = ~np.isnan(targets[:, k])
        train = counts[:90][labelled]
        mean = targets[labelled, k].mean()
        reference = KernelRidge(alpha=0.1, kernel="precomputed")
        reference.fit(tanimoto(train, train), targets[labelled, k] - mean)
        expected = reference.predict(tanimoto(counts[90:], train)) + mean
        np.testing.assert_allclose(predicted[:, k], expected, rtol=1e-4, atol=1e-4)
        assert np.std(expected) > 0.1  # it tells molecules apart
    # A molecule without a label for a target has no say in its predictions.
    assert (kernel.coefficients[::3, 1] == 0).all()


def test_classification_gives_probabilities_clipped_to_zero_and_one(molecules):
    graphs, labels, _, _ = molecules
    counts = _counts(graphs)
    kernel = fit_kernel(counts, labels[:, None], "classification", ridge=0.01)
    with torch.no_grad():
        raw = tanimoto(counts, counts) @ kernel.coefficients.double().numpy() + labels.mean()
        probabilities = kernel(torch.from_numpy(counts)).numpy()[:, 0]
    assert raw.min() < 0 or raw.max() > 1  # with little smoothing it overshoots the labels
    np.testing.assert_allclose(probabilities, np.clip(raw[:, 0], 0, 1), atol=1e-4)


def test_a_target_without_labels_is_a_clear_error(molecules):
    graphs, _, values, _ = molecules
    targets = np.stack([values[:20], np.full(20, np.nan)], axis=1)
    with pytest.raises(ConfigError, match="target 1: no labelled training molecule"):
        fit_kernel(_counts(graphs[:20]), targets, "regression", ridge=0.1)


def test_a_table_too_large_for_the_kernel_is_refused_before_the_fit(molecules, monkeypatch):
    from mol_props import kernel

    graphs, _, values, _ = molecules
    monkeypatch.setattr(kernel, "MAX_KERNEL_MOLECULES", 50)
    with pytest.raises(
        ConfigError, match="the kernel member keeps every training molecule, and 60"
    ):
        fit_kernel(_counts(graphs[:60]), values[:60, None], "regression", ridge=0.1)


def test_checkpoint_state_and_onnx_runtime_give_the_same_values(molecules, tmp_path):
    graphs, _, values, featurizer = molecules
    kernel = fit_kernel(_counts(graphs[:90]), values[:90, None], "regression", ridge=0.03)
    path = tmp_path / "checkpoint.pt"
    torch.save({"kernel": kernel.state()}, path)
    restored = TanimotoKernelRidge.from_state(torch.load(path, weights_only=True)["kernel"])
    inputs = _padded(graphs[90:], featurizer)
    arguments = (inputs["atom_features"], inputs["atom_mask"], inputs["descriptors"])
    with torch.no_grad():
        expected = kernel.molecule_forward(*arguments).numpy()
        np.testing.assert_array_equal(restored.molecule_forward(*arguments).numpy(), expected)

    # Inside the served model beside the network, in standardized units, exported as `mol_props
    # export` exports it.
    torch.manual_seed(0)
    network = new_network(featurizer, compose_config([]).model).eval()
    target_mean, target_std = torch.tensor([1.5]), torch.tensor([2.0])
    model = PredictionModel(
        network, "regression", target_mean, target_std, [Member("kernel", restored, 0.3)]
    ).eval()
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    with torch.no_grad():
        network_alone = network(*(inputs[name] for name in INPUT_NAMES)).numpy()
        served = model(*(inputs[name] for name in INPUT_NAMES)).numpy()
    blended = (0.7 * network_alone + 0.3 * expected) * 2.0 + 1.5
    np.testing.assert_allclose(served, blended, rtol=1e-5, atol=1e-5)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, feeds, onnx_path, opset=17, dynamic_atoms=False)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_values,) = session.run(None, {name: feeds[name] for name in INPUT_NAMES})
    np.testing.assert_allclose(onnx_values, served, rtol=1e-4, atol=1e-4)


def test_export_parity_allows_the_models_own_float32_rounding_and_no_more(molecules, tmp_path):
    graphs, _, values, featurizer = molecules
    # So little smoothing gives large coefficients whose products cancel: float32 sums of them
    # lose digits that no exporter can keep (thousands of molecules do the same at ridge 0.03).
    kernel = fit_kernel(_counts(graphs), values[:, None], "regression", ridge=1e-3)
    torch.manual_seed(0)
    network = new_network(featurizer, compose_config([]).model).eval()
    model = PredictionModel(
        network, "regression", torch.zeros(1), torch.ones(1), [Member("kernel", kernel, 1.0)]
    ).eval()
    inputs = example_inputs(graphs, 128, featurizer)
    rounding = float32_rounding(model, inputs)
    assert rounding > 1e-6
    path = tmp_path / "model.onnx"
    export_onnx(model, inputs, path, opset=17, dynamic_atoms=False)
    difference = check_parity(model, path, inputs, tolerance=1e-9)
    assert 1e-9 < difference <= 2 * rounding + 1e-9  # above the tolerance, within the rounding
    with torch.no_grad():
        kernel.offsets.add_(10 * rounding)  # a model the file no longer matches
    with pytest.raises(ExportError, match="plus twice PyTorch's own float32 rounding"):
        check_parity(model, path, inputs, tolerance=1e-9)
