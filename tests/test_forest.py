"""The forest member as tensor operations: the same numbers as scikit-learn's own forest, from the
model's padded inputs, through a checkpoint and through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

from mol_props.config import compose_config
from mol_props.export import export_onnx
from mol_props.featurize import Featurizer, MoleculeGraph, pad_graphs
from mol_props.forest import (
    ForestSettings,
    TreeEnsemble,
    fit_forest,
    float32_at_most,
    forest_features,
    molecule_features,
)
from mol_props.model import Member, PredictionModel
from tests.conftest import b3db_spread, new_network

INPUT_NAMES = ["atom_features", "adjacency", "atom_mask", "descriptors"]


@pytest.fixture(scope="module")
def molecules() -> tuple[list[MoleculeGraph], np.ndarray, np.ndarray, Featurizer]:
    """160 real B3DB molecules: graphs, BBB labels [M], logBB-like values [M], the featurizer."""
    featurizer = Featurizer(compose_config([]).preprocess)
    graphs, labels, values = b3db_spread(featurizer, step=45, count=160)
    return graphs, labels, values, featurizer


def _padded(graphs: list[MoleculeGraph], featurizer: Featurizer, atoms: int) -> dict:
    batch = pad_graphs(graphs, atoms, featurizer.descriptor_size, featurizer.atom_feature_size)
    return {name: torch.from_numpy(array) for name, array in batch.as_inputs().items()}


def test_features_from_padded_inputs_match_the_unpadded_molecules(molecules):
    graphs, _, _, featurizer = molecules
    expected = forest_features(graphs[:20])
    descriptor_count = featurizer.descriptor_size
    for atoms in (64, 128):  # more padding changes nothing
        inputs = _padded(graphs[:20], featurizer, atoms)
        features = molecule_features(
            inputs["atom_features"], inputs["atom_mask"], inputs["descriptors"], descriptor_count
        )
        np.testing.assert_array_equal(features.numpy(), expected)


@pytest.mark.parametrize(
    ("depth", "class_weight"),
    [(0, "none"), (3, "none"), (0, "balanced_subsample"), (4, "balanced")],
)
def test_classification_forest_equals_scikit_learn_on_new_molecules(
    molecules, depth, class_weight
):
    graphs, labels, _, featurizer = molecules
    features = forest_features(graphs)
    settings = ForestSettings(trees=25, depth=depth, seed=3, class_weight=class_weight)
    descriptor_count = featurizer.descriptor_size
    ensemble = fit_forest(
        features[:120], labels[:120, None], "classification", settings, descriptor_count
    )
    reference = RandomForestClassifier(
        25,
        max_depth=depth or None,
        class_weight=None if class_weight == "none" else class_weight,
        n_jobs=-1,
        random_state=3,
    )
    reference.fit(features[:120], labels[:120])
    inputs = _padded(graphs[120:], featurizer, 128)
    with torch.no_grad():
        probabilities = ensemble.molecule_forward(
            inputs["atom_features"], inputs["atom_mask"], inputs["descriptors"]
        )  # [40, 1]
    expected = reference.predict_proba(features[120:])[:, 1]
    np.testing.assert_allclose(probabilities[:, 0].numpy(), expected, atol=1e-6)
    assert len(np.unique(expected)) > 5  # a forest that tells molecules apart
    if depth:
        assert ensemble.depth == depth


@pytest.mark.parametrize("max_features", [0.0, 0.33])  # scikit-learn's default, a share
def test_regression_forests_per_target_use_only_their_labelled_molecules(molecules, max_features):
    graphs, _, values, featurizer = molecules
    features = forest_features(graphs)
    targets = np.stack([values, -values], axis=1)[:120]  # [120, 2]
    targets[::3, 1] = np.nan  # the second target misses a third of its labels
    ensemble = fit_forest(
        features[:120],
        targets,
        "regression",
        ForestSettings(trees=10, depth=0, seed=0, max_features=max_features),
        featurizer.descriptor_size,
    )
    with torch.no_grad():
        predicted = ensemble(torch.from_numpy(features[120:])).numpy()  # [40, 2]
    for k in range(2):
        labelled = ~np.isnan(targets[:, k])
        reference = RandomForestRegressor(
            10, max_features=max_features or 1.0, n_jobs=-1, random_state=0
        )
        reference.fit(features[:120][labelled], targets[labelled, k])
        np.testing.assert_allclose(
            predicted[:, k], reference.predict(features[120:]), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_a_target_with_one_class_gives_that_class(molecules, label):
    graphs, _, _, featurizer = molecules
    features = forest_features(graphs[:30])
    ensemble = fit_forest(
        features,
        np.full((30, 1), label),
        "classification",
        ForestSettings(trees=3, depth=0, seed=0),
        featurizer.descriptor_size,
    )
    with torch.no_grad():
        assert (ensemble(torch.from_numpy(features)) == label).all()


def test_thresholds_round_down_so_float32_values_go_the_same_way():
    below = np.float32(1.0)
    above = np.nextafter(below, np.float32(2.0))  # adjacent float32 values
    threshold = (np.float64(below) + np.float64(above)) / 2  # scikit-learn's midpoint
    rounded = float32_at_most(np.array([threshold]))[0]
    assert np.float32(rounded) == below  # plain rounding gives `above` (ties to even)
    for value in (below, above):
        assert (value <= np.float32(rounded)) == (np.float64(value) <= threshold)
    thresholds = np.random.default_rng(0).normal(size=10_000)
    rounded = float32_at_most(thresholds)
    assert (rounded <= thresholds).all()
    assert (np.nextafter(rounded.astype(np.float32), np.float32(np.inf)) > thresholds).all()


def test_checkpoint_state_and_onnx_runtime_give_the_same_probabilities(molecules, tmp_path):
    graphs, labels, _, featurizer = molecules
    features = forest_features(graphs)
    ensemble = fit_forest(
        features,
        labels[:, None],
        "classification",
        ForestSettings(trees=15, depth=0, seed=1),
        featurizer.descriptor_size,
    )
    # Node numbers stay integers in the graph: an FP16 TensorRT engine may keep float constants
    # as halves, exact only up to 2048.
    assert ensemble.links.dtype == torch.int32
    path = tmp_path / "checkpoint.pt"
    torch.save({"forest": ensemble.state()}, path)
    restored = TreeEnsemble.from_state(torch.load(path, weights_only=True)["forest"])
    inputs = _padded(graphs, featurizer, 128)
    arguments = (inputs["atom_features"], inputs["atom_mask"], inputs["descriptors"])
    with torch.no_grad():
        expected = ensemble.molecule_forward(*arguments).numpy()
        torch.testing.assert_close(restored.molecule_forward(*arguments).numpy(), expected)

    # Inside the served model: the GNN's probability and the forest's averaged, exported as
    # `mol_props export` exports it.
    config = compose_config([])
    torch.manual_seed(0)
    network = new_network(featurizer, config.model).eval()
    model = PredictionModel(
        network,
        "classification",
        torch.zeros(1),
        torch.ones(1),
        [Member("forest", restored, 0.4)],
    ).eval()
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    with torch.no_grad():
        network_alone = torch.sigmoid(network(*(inputs[name] for name in INPUT_NAMES))).numpy()
        blended = model(*(inputs[name] for name in INPUT_NAMES)).numpy()
    np.testing.assert_allclose(blended, 0.6 * network_alone + 0.4 * expected, atol=1e-6)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, feeds, onnx_path, opset=17, dynamic_atoms=False)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_values,) = session.run(None, {name: feeds[name] for name in INPUT_NAMES})
    np.testing.assert_allclose(onnx_values, blended, atol=1e-5)
