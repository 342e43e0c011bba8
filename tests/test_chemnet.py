"""The ChemNet member: its tokens and encoder against the fcd_torch package it comes from, the
SVM as tensor operations against scikit-learn, and the member through a checkpoint and ONNX
Runtime beside the network. Real molecules, ChemNet's real weights."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from fcd_torch import FCD
from fcd_torch.utils import get_one_hot
from rdkit import Chem
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.svm import SVC

from mol_props.chemnet import (
    Calibration,
    ChemNetEncoder,
    ChemNetSVM,
    chemnet_features,
    fit_chemnet_svm,
)
from mol_props.config import compose_config
from mol_props.errors import ConfigError
from mol_props.export import export_onnx
from mol_props.featurize import (
    CHEMNET_PADDING_ID,
    CHEMNET_VOCABULARY,
    Featurizer,
    MoleculeGraph,
    chemnet_token_ids,
    pad_graphs,
)
from mol_props.model import Member, PredictionModel
from tests.conftest import b3db_spread, new_network

INPUT_NAMES = ["atom_features", "adjacency", "atom_mask", "descriptors"]
LENGTH = 350  # ChemNet's own
FINGERPRINT, KERNEL = 32, 64
# Two-letter tokens, an element outside the vocabulary (Li), charges, stereo, a second fragment.
SMILES = [
    "CCO",
    "c1ccc(Cl)cc1Br",
    "C[Si](C)(C)OC",
    "CN1CCC[C@H]1c1cccnc1",
    "[Li+].[Cl-]",
    "O=C([O-])c1ccccc1N",
]


@pytest.fixture(scope="module")
def encoder() -> ChemNetEncoder:
    return ChemNetEncoder.pretrained(LENGTH, "last")


@pytest.fixture(scope="module")
def max_encoder() -> ChemNetEncoder:
    return ChemNetEncoder.pretrained(LENGTH, "max")


@pytest.fixture(scope="module")
def molecules() -> tuple[list[MoleculeGraph], np.ndarray, Featurizer]:
    """120 real B3DB molecules featurized with token ids between two fingerprints' counts."""
    featurizer = Featurizer(
        compose_config(
            [
                f"preprocess.fingerprint.size={FINGERPRINT}",
                f"preprocess.smiles_tokens={LENGTH}",
                f"preprocess.kernel_fingerprint.size={KERNEL}",
            ]
        ).preprocess
    )
    graphs, labels, _ = b3db_spread(featurizer, step=60, count=120)
    return graphs, labels, featurizer


def _one_hot(token_ids: np.ndarray) -> np.ndarray:
    """[L, 35] the one-hot rows ChemNet reads for token ids [L] (padding: a row of zeros)."""
    rows = np.zeros((len(token_ids), len(CHEMNET_VOCABULARY)))
    real = np.flatnonzero(token_ids != CHEMNET_PADDING_ID)
    rows[real, token_ids[real].astype(int)] = 1.0
    return rows


@pytest.mark.parametrize("smiles", SMILES + ["C" * 400])
def test_token_ids_are_fcd_torch_s_one_hot_rows(smiles):
    np.testing.assert_array_equal(
        _one_hot(chemnet_token_ids(smiles, LENGTH)), get_one_hot(smiles, LENGTH)
    )


def test_tokens_end_with_the_end_mark_then_padding_or_are_cut_before_it():
    cut = chemnet_token_ids("C" * 10, 6)
    assert [CHEMNET_VOCABULARY[int(i)] for i in cut] == ["C"] * 5 + ["."]
    short = chemnet_token_ids("Cl", 4)
    assert [CHEMNET_VOCABULARY[int(i)] for i in short[:2]] == ["Cl", "."]
    assert (short[2:] == CHEMNET_PADDING_ID).all()


def test_encoder_gives_fcd_torch_s_chemnet_features(encoder):
    expected = FCD(device="cpu", n_jobs=1, canonize=False).get_predictions(SMILES)  # [6, 512]
    token_ids = np.stack([chemnet_token_ids(smiles, LENGTH) for smiles in SMILES])
    features = chemnet_features(encoder, token_ids)
    np.testing.assert_allclose(features, expected, atol=1e-6)
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # molecules differ


def test_max_readout_is_the_largest_of_fcd_torch_s_lstm_outputs_over_the_steps(max_encoder):
    chemnet = FCD(device="cpu", n_jobs=1, canonize=False).model
    one_hot = np.stack([get_one_hot(smiles, LENGTH) for smiles in SMILES]) / 35  # [6, L, 35]
    with torch.no_grad():
        # fcd_torch's layers up to the second LSTM's outputs, before it picks the last one.
        outputs = chemnet[:13](torch.from_numpy(one_hot).float().transpose(1, 2))  # [6, 88, 512]
    expected = outputs.max(dim=1).values.numpy()
    token_ids = np.stack([chemnet_token_ids(smiles, LENGTH) for smiles in SMILES])
    np.testing.assert_allclose(chemnet_features(max_encoder, token_ids), expected, atol=1e-6)
    # Not the last output: the maximum is reached at other steps.
    assert np.abs(expected - outputs[:, -1].numpy()).max() > 0.1


def test_featurizer_puts_token_ids_between_the_fingerprints(molecules):
    graphs, _, featurizer = molecules
    named = len(featurizer.config.descriptors)
    assert featurizer.forest_descriptor_count == named + FINGERPRINT  # the forest's prefix
    assert featurizer.descriptor_size == named + FINGERPRINT + LENGTH + KERNEL
    smiles = "CN1CCC[C@H]1c1cccnc1.Cl"  # a salt: the largest fragment's canonical SMILES
    graph = featurizer(smiles)
    start = featurizer.forest_descriptor_count
    expected = chemnet_token_ids(
        Chem.MolToSmiles(Chem.MolFromSmiles("CN1CCC[C@H]1c1cccnc1")), LENGTH
    )
    np.testing.assert_array_equal(graph.descriptors[start : start + LENGTH], expected)
    assert featurizer.smiles_token_columns == slice(start, start + LENGTH)
    plain = Featurizer(
        compose_config(
            [
                f"preprocess.fingerprint.size={FINGERPRINT}",
                f"preprocess.kernel_fingerprint.size={KERNEL}",
            ]
        ).preprocess
    )(smiles)
    # Everything else is where it was without the tokens: the kernel's counts stay last.
    np.testing.assert_array_equal(graph.descriptors[:start], plain.descriptors[:start])
    np.testing.assert_array_equal(graph.descriptors[-KERNEL:], plain.descriptors[-KERNEL:])


def _padded(graphs: list[MoleculeGraph], featurizer: Featurizer) -> dict[str, torch.Tensor]:
    batch = pad_graphs(graphs, 128, featurizer.descriptor_size, featurizer.atom_feature_size)
    return {name: torch.from_numpy(array) for name, array in batch.as_inputs().items()}


def _token_ids(graphs: list[MoleculeGraph], featurizer: Featurizer) -> np.ndarray:
    columns = featurizer.smiles_token_columns
    return np.stack([graph.descriptors[columns] for graph in graphs])  # [M, L]


def test_svm_equals_scikit_learn_on_chemnet_features_per_labelled_target(molecules, max_encoder):
    graphs, labels, featurizer = molecules
    token_ids = _token_ids(graphs, featurizer)
    targets = np.stack([labels, 1 - labels], axis=1)[:90]  # [90, 2]
    targets[::3, 1] = np.nan  # the second target misses a third of its labels
    member = fit_chemnet_svm(
        token_ids[:90], targets, featurizer.forest_descriptor_count, svm_c=2.0, readout="max"
    )
    inputs = _padded(graphs[90:], featurizer)
    with torch.no_grad():
        predicted = member.molecule_forward(
            inputs["atom_features"], inputs["atom_mask"], inputs["descriptors"]
        ).numpy()  # [30, 2]
    features = chemnet_features(max_encoder, token_ids)
    mean, scale = features[:90].mean(axis=0), features[:90].std(axis=0)
    standardized = (features - mean) / np.where(scale == 0, 1.0, scale)
    gamma = 1.0 / (512 * standardized[:90].var())
    for k in range(2):
        labelled = ~np.isnan(targets[:, k])
        reference = SVC(C=2.0, gamma=gamma, class_weight="balanced")
        reference.fit(standardized[:90][labelled], targets[labelled, k])
        margins = reference.decision_function(standardized[90:])
        np.testing.assert_allclose(predicted[:, k], 1 / (1 + np.exp(-margins)), atol=2e-4)
        assert np.std(margins) > 0.1  # it tells molecules apart
    # Each target's margin is its own: the second is not the first's mirror image, since it
    # learned from fewer molecules.
    assert np.abs(predicted[:, 0] + predicted[:, 1] - 1).max() > 1e-3


def _standardized(features: np.ndarray, fitted: int) -> tuple[np.ndarray, float]:
    """Features standardized over the first `fitted` rows, and scikit-learn's "scale" width."""
    mean, scale = features[:fitted].mean(axis=0), features[:fitted].std(axis=0)
    standardized = (features - mean) / np.where(scale == 0, 1.0, scale)
    return standardized, 1.0 / (512 * standardized[:fitted].var())


def test_platt_scaling_is_a_logistic_regression_on_margins_from_whole_group_folds(
    molecules, max_encoder
):
    graphs, labels, featurizer = molecules
    token_ids = _token_ids(graphs, featurizer)
    groups = np.arange(90) % 30  # 30 "scaffolds" of 3 molecules each
    targets = np.stack([labels, 1 - labels], axis=1)[:90]  # [90, 2]
    targets[::4, 1] = np.nan  # the second target misses a quarter of its labels
    member = fit_chemnet_svm(token_ids[:90], targets, 0, 2.0, "max", Calibration(3, groups))
    plain = fit_chemnet_svm(token_ids[:90], targets, 0, 2.0, "max")
    standardized, gamma = _standardized(chemnet_features(max_encoder, token_ids), 90)
    with torch.no_grad():
        held_ids = torch.from_numpy(token_ids[90:])
        calibrated = member(held_ids).numpy()  # [30, 2]
        raw = plain(held_ids).numpy()
    raw_margins = np.log(raw / (1 - raw))  # [30, 2]
    for k in range(2):
        labelled = np.flatnonzero(~np.isnan(targets[:, k]))
        target, target_groups = targets[labelled, k], groups[labelled]
        margins = np.zeros(len(labelled))
        for fit, held in GroupKFold(n_splits=3).split(labelled, target, target_groups):
            assert not set(target_groups[fit]) & set(target_groups[held])  # groups stay whole
            reference = SVC(C=2.0, gamma=gamma, class_weight="balanced").fit(
                standardized[labelled[fit]], target[fit]
            )
            margins[held] = reference.decision_function(standardized[labelled[held]])
        logistic = LogisticRegression(C=np.inf).fit(margins[:, None], target)
        slope, offset = logistic.coef_[0, 0], logistic.intercept_[0]
        assert member.margin_slope[k].item() == pytest.approx(slope, rel=1e-5)
        assert member.margin_offset[k].item() == pytest.approx(offset, rel=1e-5, abs=1e-6)
        assert abs(slope - 1) > 0.05  # the scaling does something on these molecules
        # The same SVM underneath, so the same ranking; the probability is the scaled margin's.
        np.testing.assert_allclose(
            calibrated[:, k], 1 / (1 + np.exp(-(slope * raw_margins[:, k] + offset))), atol=1e-5
        )
    # Each target has its own scaling: the second's differs, since it saw fewer molecules.
    assert abs(member.margin_slope[0].item() - member.margin_slope[1].item()) > 1e-3


def test_platt_scaling_with_more_folds_than_scaffolds_is_a_clear_error(molecules):
    graphs, labels, featurizer = molecules
    with pytest.raises(ConfigError, match="calibration_folds=5: only 4 scaffolds to split"):
        fit_chemnet_svm(
            _token_ids(graphs[:40], featurizer),
            labels[:40, None],
            0,
            1.0,
            "max",
            Calibration(5, np.arange(40) % 4),
        )


def test_a_checkpoint_from_before_platt_scaling_gives_the_plain_sigmoid(molecules):
    graphs, labels, featurizer = molecules
    token_ids = _token_ids(graphs, featurizer)
    plain = fit_chemnet_svm(token_ids[:90], labels[:90, None], 0, 1.0, "max")
    calibrated = fit_chemnet_svm(
        token_ids[:90], labels[:90, None], 0, 1.0, "max", Calibration(3, np.arange(90))
    )
    state = calibrated.state()
    del state["margin_slope"], state["margin_offset"]  # as saved before the scaling existed
    restored = ChemNetSVM.from_state(state)
    with torch.no_grad():
        held_ids = torch.from_numpy(token_ids[90:])
        np.testing.assert_array_equal(restored(held_ids).numpy(), plain(held_ids).numpy())
        assert np.abs(calibrated(held_ids).numpy() - plain(held_ids).numpy()).max() > 1e-3


def test_a_target_of_one_class_is_a_clear_error(molecules):
    graphs, _, featurizer = molecules
    with pytest.raises(ConfigError, match="target 0: its training labels are all one class"):
        fit_chemnet_svm(
            _token_ids(graphs[:20], featurizer), np.ones((20, 1)), 0, svm_c=1.0, readout="max"
        )


def test_checkpoint_state_and_onnx_runtime_give_the_served_average(molecules, tmp_path):
    graphs, labels, featurizer = molecules
    member = fit_chemnet_svm(
        _token_ids(graphs[:90], featurizer),
        labels[:90, None],
        featurizer.forest_descriptor_count,
        svm_c=1.0,
        readout="max",
        calibration=Calibration(3, np.arange(90) % 30),
    )
    path = tmp_path / "checkpoint.pt"
    torch.save({"chemnet": member.state()}, path)
    restored = ChemNetSVM.from_state(torch.load(path, weights_only=True)["chemnet"])
    inputs = _padded(graphs[90:], featurizer)
    arguments = (inputs["atom_features"], inputs["atom_mask"], inputs["descriptors"])
    with torch.no_grad():
        alone = member.molecule_forward(*arguments).numpy()
        np.testing.assert_array_equal(restored.molecule_forward(*arguments).numpy(), alone)

    torch.manual_seed(0)
    network = new_network(featurizer, compose_config([]).model).eval()
    model = PredictionModel(
        network,
        "classification",
        torch.zeros(1),
        torch.ones(1),
        [Member("chemnet", restored, 0.5)],
    ).eval()
    with torch.no_grad():
        network_alone = torch.sigmoid(network(*(inputs[name] for name in INPUT_NAMES))).numpy()
        served = model(*(inputs[name] for name in INPUT_NAMES)).numpy()
    np.testing.assert_allclose(served, 0.5 * network_alone + 0.5 * alone, atol=1e-6)
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, feeds, onnx_path, opset=17, dynamic_atoms=False)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_values,) = session.run(None, {name: feeds[name] for name in INPUT_NAMES})
    np.testing.assert_allclose(onnx_values, served, atol=1e-5)
    # Another batch size than the traced one (the LSTM's initial state follows the batch).
    (three,) = session.run(None, {name: feeds[name][:3] for name in INPUT_NAMES})
    np.testing.assert_allclose(three, served[:3], atol=1e-5)


def test_a_checkpoint_from_before_the_readout_setting_reads_the_last_output(molecules, encoder):
    graphs, labels, featurizer = molecules
    token_ids = _token_ids(graphs, featurizer)
    member = fit_chemnet_svm(token_ids[:90], labels[:90, None], 0, svm_c=1.0, readout="last")
    state = member.state()
    del state["readout"]  # as saved before the setting existed
    restored = ChemNetSVM.from_state(state)
    with torch.no_grad():
        features = restored.encoder(torch.from_numpy(token_ids[90:])).numpy()
    np.testing.assert_array_equal(features, chemnet_features(encoder, token_ids[90:]))


def test_preset_turns_on_the_tokens_and_the_member_and_shrinks_the_others():
    config = compose_config(["model=dense_gnn_chemnet"])
    assert config.preprocess.smiles_tokens == LENGTH
    assert (config.model.chemnet_weight, config.model.forest_weight) == (0.7, 0.21)
    assert (config.model.chemnet_c, config.model.chemnet_readout) == (2.0, "max")
    assert config.model.chemnet_calibration_folds == 5
    assert config.model.forest_trees > 0 and config.model.fingerprint_hidden_dim > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.chemnet_weight=0.3"], "reads preprocess.smiles_tokens, which is 0"),
        (
            ["model=dense_gnn_chemnet", "data=b3db_regression"],
            "the ChemNet member is a classifier",
        ),
        (["model=dense_gnn_chemnet", "model.chemnet_weight=0.8"], r"> 1: they are shares"),
        (["model.chemnet_readout=mean"], "expected one of max, last"),
        (["preprocess.smiles_tokens=1"], "room for the end mark alone"),
        (["model=dense_gnn_chemnet", "model.chemnet_c=0"], "must be positive"),
        (["model.chemnet_calibration_folds=1"], "one fold leaves nothing to fit on"),
        (["model.chemnet_calibration_folds=-2"], "chemnet_calibration_folds=-2"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)
