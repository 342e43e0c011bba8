"""The dense GNN: padded atoms contribute nothing, atom order does not matter, shapes hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mol_props.config import compose_config
from mol_props.featurize import Featurizer, pad_graphs
from mol_props.model import MoleculeGNN, PredictionModel

MOLECULES = ["CCO", "c1ccccc1O", "CC(=O)[O-]", "C[C@H](N)C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"]


# Each model variant: the GNN alone with either convolution (atom counts on, the default), without
# atom counts, and with the fingerprint member.
VARIANTS = {
    "gin": ["model.conv=gin", "model.fingerprint_hidden_dim=0"],
    "gin-no-atom-counts": [
        "model.conv=gin",
        "model.fingerprint_hidden_dim=0",
        "model.atom_counts=false",
    ],
    "graph": ["model.conv=graph", "model.fingerprint_hidden_dim=0"],
    "gin+fingerprint": [
        "model.conv=gin",
        "preprocess.fingerprint.size=64",
        "model.fingerprint_hidden_dim=32",
        "model.fingerprint_dropout=0.0",
    ],
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def network(request: pytest.FixtureRequest) -> tuple[MoleculeGNN, Featurizer]:
    config = compose_config(VARIANTS[request.param] + ["model.dropout=0.0"])
    featurizer = Featurizer(config.preprocess)
    torch.manual_seed(0)
    model = MoleculeGNN(
        featurizer.atom_feature_size,
        featurizer.descriptor_size,
        2,
        config.model,
        fingerprint_size=config.preprocess.fingerprint.size,
    )
    # Non-trivial descriptor scaling, as after training.
    model.set_descriptor_scaling(
        torch.linspace(0, 50, featurizer.descriptor_size),
        torch.linspace(1, 20, featurizer.descriptor_size),
    )
    return model.eval(), featurizer


def _run(model: MoleculeGNN, inputs: dict[str, np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            *(
                torch.from_numpy(inputs[name])
                for name in ("atom_features", "adjacency", "atom_mask", "descriptors")
            )
        )


def test_output_has_one_value_per_target(network):
    model, featurizer = network
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    inputs = pad_graphs(graphs, 32, featurizer.descriptor_size, len(featurizer)).as_inputs()
    output = _run(model, inputs)
    assert output.shape == (len(MOLECULES), 2)
    assert torch.isfinite(output).all()


def test_padding_size_does_not_change_predictions(network):
    model, featurizer = network
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    small = _run(
        model, pad_graphs(graphs, 14, featurizer.descriptor_size, len(featurizer)).as_inputs()
    )
    large = _run(
        model, pad_graphs(graphs, 128, featurizer.descriptor_size, len(featurizer)).as_inputs()
    )
    torch.testing.assert_close(small, large, rtol=0, atol=1e-5)


def test_garbage_in_padded_atoms_is_ignored(network):
    model, featurizer = network
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    inputs = pad_graphs(graphs, 40, featurizer.descriptor_size, len(featurizer)).as_inputs()
    clean = _run(model, inputs)
    noisy = {name: array.copy() for name, array in inputs.items()}
    padding = noisy["atom_mask"] == 0  # [B, N]
    noisy["atom_features"][padding] = np.random.default_rng(0).normal(
        size=noisy["atom_features"][padding].shape
    )
    torch.testing.assert_close(clean, _run(model, noisy), rtol=0, atol=1e-5)


def test_atom_order_does_not_change_predictions(network):
    model, featurizer = network
    graph = featurizer("CN1C=NC2=C1C(=O)N(C(=O)N2C)C")  # caffeine, 14 heavy atoms
    inputs = pad_graphs([graph], 20, featurizer.descriptor_size, len(featurizer)).as_inputs()
    order = np.random.default_rng(1).permutation(graph.num_atoms)
    permuted = {name: array.copy() for name, array in inputs.items()}
    permuted["atom_features"][0, : graph.num_atoms] = graph.atom_features[order]
    permuted["adjacency"][0, : graph.num_atoms, : graph.num_atoms] = graph.adjacency[order][
        :, order
    ]
    assert not np.array_equal(permuted["atom_features"], inputs["atom_features"])
    torch.testing.assert_close(_run(model, inputs), _run(model, permuted), rtol=0, atol=1e-5)


def test_different_molecules_get_different_predictions(network):
    model, featurizer = network
    graphs = [featurizer("CCO"), featurizer("c1ccccc1O")]
    output = _run(
        model, pad_graphs(graphs, 16, featurizer.descriptor_size, len(featurizer)).as_inputs()
    )
    assert not torch.allclose(output[0], output[1])


def test_prediction_model_returns_probability_or_original_units(network):
    model, featurizer = network
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    inputs = pad_graphs(graphs, 32, featurizer.descriptor_size, len(featurizer)).as_inputs()
    raw = _run(model, inputs)
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    classifier = PredictionModel(model, "classification", mean, std).eval()
    regressor = PredictionModel(model, "regression", mean, std).eval()
    torch.testing.assert_close(_run(classifier, inputs), torch.sigmoid(raw))
    torch.testing.assert_close(_run(regressor, inputs), raw * std + mean)


def test_fingerprint_member_is_averaged_with_the_gnn():
    config = compose_config(
        ["preprocess.fingerprint.size=64", "model.fingerprint_hidden_dim=32"]
        + ["model.fingerprint_weight=0.25"]
    )
    featurizer = Featurizer(config.preprocess)
    torch.manual_seed(0)
    model = MoleculeGNN(
        featurizer.atom_feature_size, featurizer.descriptor_size, 2, config.model, 64
    ).eval()
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    inputs = pad_graphs(graphs, 32, featurizer.descriptor_size, len(featurizer)).as_inputs()
    tensors = [torch.from_numpy(inputs[name]) for name in inputs]
    with torch.no_grad():
        members = model.member_outputs(*tensors)  # [B, T, 2]
        combined = model(*tensors)
    assert members.shape == (len(MOLECULES), 2, 2)
    assert not torch.allclose(members[..., 0], members[..., 1])
    torch.testing.assert_close(combined, 0.75 * members[..., 0] + 0.25 * members[..., 1])
    # The counts reach only the fingerprint member: changing them leaves the GNN member alone.
    tensors[3] = tensors[3].clone()
    tensors[3][:, -64:] += 3.0
    with torch.no_grad():
        changed = model.member_outputs(*tensors)
    torch.testing.assert_close(changed[..., 0], members[..., 0])
    assert not torch.allclose(changed[..., 1], members[..., 1])


def test_without_a_fingerprint_member_the_gnn_ignores_the_morgan_counts():
    """The default: the featurizer computes counts for the forest; the GNN must not read them."""
    config = compose_config(["preprocess.fingerprint.size=64", "model.fingerprint_hidden_dim=0"])
    featurizer = Featurizer(config.preprocess)
    torch.manual_seed(0)
    model = MoleculeGNN(
        featurizer.atom_feature_size, featurizer.descriptor_size, 2, config.model, 64
    ).eval()
    assert model.fingerprint_mlp is None and model.plain_size == len(config.preprocess.descriptors)
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    inputs = pad_graphs(graphs, 32, featurizer.descriptor_size, len(featurizer)).as_inputs()
    tensors = [torch.from_numpy(inputs[name]) for name in inputs]
    changed = [tensor.clone() for tensor in tensors]
    changed[3][:, -64:] += 3.0  # other Morgan counts
    changed[3][:, 0] += 100.0  # and, as a control, another molecular weight
    with torch.no_grad():
        original = model(*tensors)
        counts_only = model(*tensors[:3], torch.cat([tensors[3][:, :-64], changed[3][:, -64:]], 1))
        weight_too = model(*changed)
    torch.testing.assert_close(counts_only, original)
    assert not torch.allclose(weight_too, original)


@pytest.mark.parametrize("fingerprint_member", [False, True])
def test_the_network_ignores_the_kernel_members_counts(fingerprint_member: bool):
    config = compose_config(
        ["preprocess.fingerprint.size=64", "preprocess.kernel_fingerprint.size=32"]
        + [f"model.fingerprint_hidden_dim={32 if fingerprint_member else 0}"]
    )
    featurizer = Featurizer(config.preprocess)
    torch.manual_seed(0)
    model = MoleculeGNN(
        featurizer.atom_feature_size, featurizer.descriptor_size, 1, config.model, 64, 32
    ).eval()
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    inputs = pad_graphs(graphs, 32, featurizer.descriptor_size, len(featurizer)).as_inputs()
    tensors = [torch.from_numpy(inputs[name]) for name in inputs]
    kernel_changed = tensors[3].clone()
    kernel_changed[:, -32:] += 3.0
    fingerprint_changed = tensors[3].clone()
    fingerprint_changed[:, -96:-32] += 3.0  # the fingerprint's counts, before the kernel's
    with torch.no_grad():
        original = model(*tensors)
        torch.testing.assert_close(model(*tensors[:3], kernel_changed), original)
        # The fingerprint member (if any) still reads its own counts.
        moved = not torch.allclose(model(*tensors[:3], fingerprint_changed), original)
    assert moved == fingerprint_member


class _InputRecorder(torch.nn.Module):
    """Stands in for the descriptor MLP's first layer: keeps what it is given."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.inputs: list[torch.Tensor] = []

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        self.inputs.append(values)
        return self.layer(values)


@pytest.mark.parametrize("atom_counts", [True, False])
def test_atom_counts_are_log1p_of_each_slot_over_real_atoms(atom_counts: bool):
    config = compose_config([f"model.atom_counts={str(atom_counts).lower()}"])
    featurizer = Featurizer(config.preprocess)
    fingerprint_size = config.preprocess.fingerprint.size
    model = MoleculeGNN(
        featurizer.atom_feature_size, featurizer.descriptor_size, 1, config.model, fingerprint_size
    ).eval()
    plain_size = featurizer.descriptor_size - fingerprint_size  # the GNN skips the Morgan counts
    recorder = _InputRecorder(model.descriptor_mlp[0])
    model.descriptor_mlp[0] = recorder
    graphs = [featurizer(smiles) for smiles in MOLECULES]
    inputs = pad_graphs(graphs, 32, featurizer.descriptor_size, len(featurizer)).as_inputs()
    inputs["atom_features"][inputs["atom_mask"] == 0] = 7.0  # garbage in the padding rows
    _run(model, inputs)
    (seen,) = recorder.inputs  # [B, D' + F - 1] or [B, D'], D' = descriptors without counts
    scaled = (torch.from_numpy(inputs["descriptors"]) - model.descriptor_mean) / (
        model.descriptor_std
    )
    torch.testing.assert_close(seen[:, :plain_size], scaled[:, :plain_size])
    if not atom_counts:
        assert seen.shape[1] == plain_size
        return
    # Ethanol: 2 carbons, 1 oxygen; every atom column but the mass (the last) counted.
    expected = np.stack([graph.atom_features[:, :-1].sum(axis=0) for graph in graphs])
    assert expected[0, featurizer.config.atom.elements.index(6)] == 2
    torch.testing.assert_close(seen[:, plain_size:], torch.log1p(torch.from_numpy(expected)))
