"""mol_props.featurize: known values on small real molecules, the documented layout, the reasons a
molecule is refused, fragments, padding, and parallel == serial.

Expected atom rows come from `reference_atom_row`, a plain per-atom re-statement of the documented
layout (one-hot groups in config order, each with an unknown slot, then aromatic, ring, mass/100),
so the featurizer's fast paths are checked against something written independently of them.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import pickle

import numpy as np
import pytest
from rdkit import Chem, rdBase

from mol_props.config import PreprocessConfig, compose_config
from mol_props.featurize import (
    FeaturizationError,
    Featurizer,
    MoleculeGraph,
    _PackedChunk,
    _syntax_problem,
    featurize_parallel,
    pad_graphs,
)
from tests.conftest import b3db_rows

# Order of the one-hot groups in an atom row, as the featurizer's docstring documents it.
GROUPS = (
    "elements",
    "degrees",
    "formal_charges",
    "hybridizations",
    "total_hydrogens",
    "chiral_tags",
)
# Molecules that take the featurizer's less common paths: stereo, isotopes, charges, a dative bond,
# elements without a slot of their own, salts.
EDGE_CASES = [
    "C[C@H](N)O",
    "C[C@@H](N)O",
    "[C@H](F)(Cl)Br",
    "[13CH3]O",
    "[2H]C([2H])([2H])O",
    "[13C@H](F)(Cl)Br",
    "[NH4+]",
    "CC(=O)[O-]",
    "O=[N+]([O-])c1ccccc1",
    "C->[Fe]",
    "[Fe+3]",
    "[Xe]",
    "[U]",
    "*C",
    "F/C=C/F",
    "C1CC[C@H]2CCCC[C@@H]2C1",
    "CC(C)(C)[S@@](=O)N",
    # Hybridizations other than SP2/SP3, which the invariant-keyed path reads from the atom.
    "CC#N",
    "F[P-](F)(F)(F)(F)F",
    "[Na+]",
    "C=C=C",
]


@pytest.fixture(scope="module")
def preprocess() -> PreprocessConfig:
    return compose_config().preprocess


@pytest.fixture(scope="module")
def featurizer(preprocess: PreprocessConfig) -> Featurizer:
    return Featurizer(preprocess)


def with_settings(config: PreprocessConfig, **changes) -> PreprocessConfig:
    return dataclasses.replace(config, **changes)


def group_values(config: PreprocessConfig, group: str) -> list:
    return list(getattr(config.atom, group))


def column(config: PreprocessConfig, group: str, value) -> int:
    """Column of `value` in `group` (the unknown slot when the config does not list it)."""
    offset = 0
    for name in GROUPS:
        values = group_values(config, name)
        if name == group:
            return offset + (values.index(value) if value in values else len(values))
        offset += len(values) + 1
    raise KeyError(group)


def group_slice(config: PreprocessConfig, group: str) -> slice:
    start = column(config, group, group_values(config, group)[0])
    return slice(start, start + len(group_values(config, group)) + 1)


def expected_width(config: PreprocessConfig) -> int:
    return sum(len(group_values(config, name)) + 1 for name in GROUPS) + 3


def reference_atom_row(atom: Chem.Atom, config: PreprocessConfig) -> np.ndarray:
    properties = {
        "elements": atom.GetAtomicNum(),
        "degrees": atom.GetDegree(),
        "formal_charges": atom.GetFormalCharge(),
        "hybridizations": str(atom.GetHybridization()),
        "total_hydrogens": atom.GetTotalNumHs(),
        "chiral_tags": str(atom.GetChiralTag()),
    }
    row = np.zeros(expected_width(config), dtype=np.float32)
    for group, value in properties.items():
        row[column(config, group, value)] = 1.0
    row[-3:] = (float(atom.GetIsAromatic()), float(atom.IsInRing()), atom.GetMass() / 100.0)
    return row


def reference_adjacency(molecule: Chem.Mol) -> np.ndarray:
    expected = np.zeros((molecule.GetNumAtoms(),) * 2, dtype=np.float32)
    for bond in molecule.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        expected[i, j] = expected[j, i] = bond.GetBondTypeAsDouble()
    return expected


def descriptor(graph: MoleculeGraph, config: PreprocessConfig, name: str) -> float:
    return float(graph.descriptors[config.descriptors.index(name)])


def featurize_or_error(featurizer: Featurizer, smiles: str) -> FeaturizationError:
    with pytest.raises(FeaturizationError) as caught:
        featurizer(smiles)
    return caught.value


# ----------------------------------------------------------------------------- known molecules


def test_ethanol(featurizer: Featurizer, preprocess: PreprocessConfig):
    graph = featurizer("CCO", with_keys=True)
    features = graph.atom_features
    assert features.shape == (3, expected_width(preprocess)) and features.dtype == np.float32
    for i, (element, degree, hydrogens) in enumerate([(6, 1, 3), (6, 2, 2), (8, 1, 1)]):
        hot = set(np.flatnonzero(features[i, :-3]))
        assert hot == {
            column(preprocess, "elements", element),
            column(preprocess, "degrees", degree),
            column(preprocess, "formal_charges", 0),
            column(preprocess, "hybridizations", "SP3"),
            column(preprocess, "total_hydrogens", hydrogens),
            column(preprocess, "chiral_tags", "CHI_UNSPECIFIED"),
        }
    np.testing.assert_allclose(
        features[:, -3:], [[0, 0, 0.12011], [0, 0, 0.12011], [0, 0, 0.15999]]
    )
    np.testing.assert_array_equal(graph.adjacency, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    assert descriptor(graph, preprocess, "MolWt") == pytest.approx(46.069, abs=1e-3)
    assert descriptor(graph, preprocess, "TPSA") == pytest.approx(20.23, abs=1e-2)
    assert descriptor(graph, preprocess, "NumHDonors") == 1
    assert descriptor(graph, preprocess, "HeavyAtomCount") == 3
    assert descriptor(graph, preprocess, "NumRings") == 0
    assert graph.canonical_smiles == "CCO" and graph.scaffold == ""


def test_benzene(featurizer: Featurizer, preprocess: PreprocessConfig):
    graph = featurizer("C1=CC=CC=C1", with_keys=True)  # Kekulé input: RDKit aromatises it
    features = graph.atom_features
    assert features.shape[0] == 6
    for name, value in [("elements", 6), ("degrees", 2), ("hybridizations", "SP2")]:
        assert (features[:, column(preprocess, name, value)] == 1).all()
    assert (features[:, column(preprocess, "total_hydrogens", 1)] == 1).all()
    np.testing.assert_array_equal(features[:, -3], 1.0)  # aromatic
    np.testing.assert_array_equal(features[:, -2], 1.0)  # in a ring
    # A ring of aromatic bonds: each atom has two neighbours at 1.5, nothing else.
    np.testing.assert_array_equal(graph.adjacency.sum(axis=1), 3.0)
    assert set(np.unique(graph.adjacency)) == {0.0, 1.5}
    assert descriptor(graph, preprocess, "NumAromaticRings") == 1
    assert descriptor(graph, preprocess, "FractionCSP3") == 0
    assert graph.canonical_smiles == "c1ccccc1" and graph.scaffold == "c1ccccc1"


def test_charged_molecules(featurizer: Featurizer, preprocess: PreprocessConfig):
    ammonium = featurizer("[NH4+]")
    assert ammonium.atom_features.shape[0] == 1
    row = ammonium.atom_features[0]
    assert row[column(preprocess, "formal_charges", 1)] == 1
    assert row[column(preprocess, "total_hydrogens", 4)] == 1
    assert row[column(preprocess, "degrees", 0)] == 1
    assert descriptor(ammonium, preprocess, "FormalCharge") == 1

    acetate = featurizer("CC(=O)[O-]")
    charges = acetate.atom_features[:, group_slice(preprocess, "formal_charges")]
    np.testing.assert_array_equal(
        charges.argmax(axis=1),
        [preprocess.atom.formal_charges.index(charge) for charge in (0, 0, 0, -1)],
    )
    assert acetate.adjacency[1, 2] == 2.0 and acetate.adjacency[1, 3] == 1.0
    assert descriptor(acetate, preprocess, "FormalCharge") == -1


def test_enantiomers_differ_only_in_chirality(
    featurizer: Featurizer, preprocess: PreprocessConfig
):
    clockwise, counter = featurizer("C[C@@H](N)O"), featurizer("C[C@H](N)O")
    unspecified = featurizer("CC(N)O")
    chirality = group_slice(preprocess, "chiral_tags")
    assert clockwise.atom_features[1, column(preprocess, "chiral_tags", "CHI_TETRAHEDRAL_CW")] == 1
    assert counter.atom_features[1, column(preprocess, "chiral_tags", "CHI_TETRAHEDRAL_CCW")] == 1
    assert not np.array_equal(clockwise.atom_features, counter.atom_features)
    others = np.ones(clockwise.atom_features.shape[1], dtype=bool)
    others[chirality] = False
    for graph in (counter, unspecified):
        np.testing.assert_array_equal(
            clockwise.atom_features[:, others], graph.atom_features[:, others]
        )
    unspecified_column = column(preprocess, "chiral_tags", "CHI_UNSPECIFIED")
    np.testing.assert_array_equal(unspecified.atom_features[:, unspecified_column], 1.0)


def test_isotope_changes_only_the_mass(featurizer: Featurizer):
    labelled, plain = featurizer("[13CH3]O"), featurizer("CO")
    assert labelled.atom_features[0, -1] == pytest.approx(0.1300335, abs=1e-6)
    assert plain.atom_features[0, -1] == pytest.approx(0.12011, abs=1e-6)
    np.testing.assert_array_equal(labelled.atom_features[:, :-1], plain.atom_features[:, :-1])


def test_unknown_values_go_to_the_unknown_slot(
    featurizer: Featurizer, preprocess: PreprocessConfig
):
    assert 54 not in preprocess.atom.elements and 92 not in preprocess.atom.elements
    unknown_element = column(preprocess, "elements", None)
    for smiles in ("[Xe]", "[U]", "CC[U]"):
        features = featurizer(smiles).atom_features
        elements = features[:, group_slice(preprocess, "elements")]
        np.testing.assert_array_equal(elements.sum(axis=1), 1.0)  # exactly one slot per atom
        assert features[-1, unknown_element] == 1
    # Fe has a slot, charge +3 does not.
    iron = featurizer("[Fe+3]").atom_features[0]
    assert iron[column(preprocess, "elements", 26)] == 1
    assert iron[column(preprocess, "formal_charges", None)] == 1
    assert featurizer.unknown_element_column == unknown_element


@pytest.mark.parametrize(
    ("smiles", "elements"),
    [
        ("CCO", ()),
        ("[Fe+3]", ()),
        ("CC[U]", ("U",)),
        ("C[Gd]C[Xe]", ("Gd", "Xe")),
        ("*C", ("*",)),  # a dummy atom is no element the model knows either
        ("CCO.[U]", ()),  # the salt's kept fragment holds none
    ],
)
def test_unknown_elements_are_named(featurizer: Featurizer, smiles: str, elements: tuple):
    assert featurizer.unknown_elements(smiles, featurizer(smiles)) == elements


# ----------------------------------------------------------------------------- layout, adjacency


def test_width_is_len_of_featurizer(preprocess: PreprocessConfig):
    featurizer = Featurizer(preprocess)
    assert len(featurizer) == featurizer.atom_feature_size == expected_width(preprocess)
    assert featurizer("CCO").atom_features.shape[1] == len(featurizer)
    assert featurizer.descriptor_size == len(preprocess.descriptors) + preprocess.fingerprint.size

    smaller = dataclasses.replace(preprocess.atom, elements=[6, 7, 8], degrees=[1, 2])
    with_fingerprint = with_settings(
        preprocess,
        atom=smaller,
        fingerprint=dataclasses.replace(preprocess.fingerprint, size=32),
    )
    other = Featurizer(with_fingerprint)
    assert len(other) == expected_width(with_fingerprint) == len(featurizer) - 17 - 5
    graph = other("c1ccccc1O")
    assert graph.atom_features.shape == (7, len(other))
    assert (
        graph.descriptors.shape == (other.descriptor_size,) == (len(preprocess.descriptors) + 32,)
    )
    counts = graph.descriptors[len(preprocess.descriptors) :]
    assert counts.sum() > 0 and (counts >= 0).all() and (counts == np.round(counts)).all()


def test_the_kernel_fingerprint_counts_come_last_and_the_forest_reads_up_to_them(
    preprocess: PreprocessConfig,
):
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    settings = with_settings(
        preprocess,
        fingerprint=dataclasses.replace(preprocess.fingerprint, size=32),
        kernel_fingerprint=dataclasses.replace(preprocess.kernel_fingerprint, size=64),
    )
    featurizer = Featurizer(settings)
    plain = len(preprocess.descriptors)
    assert featurizer.descriptor_size == plain + 32 + 64
    assert featurizer.forest_descriptor_count == plain + 32
    smiles = "c1ccccc1OCC(N)=O"
    descriptors = featurizer(smiles).descriptors
    for counts, radius, size in (
        (descriptors[plain : plain + 32], 1, 32),
        (descriptors[-64:], 2, 64),
    ):
        generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=size)
        expected = generator.GetCountFingerprintAsNumPy(Chem.MolFromSmiles(smiles))
        np.testing.assert_array_equal(counts, expected)
    # Without the kernel fingerprint, the layout is what it was.
    assert Featurizer(preprocess).forest_descriptor_count == Featurizer(preprocess).descriptor_size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fragments": "larget"}, "preprocess.fragments='larget'"),
        ({"formal_charges": [-9, 0]}, "formal_charges: -9 is outside -8..8"),
        ({"elements": [6, 200]}, "elements: 200 is outside"),
        ({"hybridizations": ["SP3", "SP4"]}, "hybridizations: ['SP4']"),
        ({"descriptors": ["TPSA", "Bogus"]}, "preprocess.descriptors: ['Bogus'] are not among"),
    ],
)
def test_settings_the_featurizer_cannot_honour_are_refused(
    preprocess: PreprocessConfig, changes: dict, message: str
):
    own = {"fragments", "descriptors"}  # preprocess settings; the others are atom settings
    atom_changes = {key: value for key, value in changes.items() if key not in own}
    settings = {key: changes.get(key, getattr(preprocess, key)) for key in own}
    atom = dataclasses.replace(preprocess.atom, **atom_changes)
    with pytest.raises(ValueError) as caught:
        Featurizer(with_settings(preprocess, atom=atom, **settings))
    assert message in str(caught.value)


def test_adjacency_is_symmetric_and_matches_rdkit_bonds(featurizer: Featurizer):
    smiles = [row["SMILES"] for row in b3db_rows(60)] + ["C#N", "C=C", "C->[Fe]"]
    checked = 0
    for text in smiles:
        try:
            graph = featurizer(text)
        except FeaturizationError:
            continue
        adjacency = graph.adjacency
        assert adjacency.dtype == np.float32
        np.testing.assert_array_equal(adjacency, adjacency.T)
        np.testing.assert_array_equal(np.diag(adjacency), 0.0)
        np.testing.assert_array_equal(adjacency, reference_adjacency(featurizer.parse(text)))
        checked += 1
    assert checked >= 55
    assert set(np.unique(featurizer("C#N").adjacency)) == {0.0, 3.0}
    # RDKit's own matrix fills one cell of a dative bond; messages must flow both ways.
    np.testing.assert_array_equal(featurizer("C->[Fe]").adjacency, [[0, 1], [1, 0]])


def test_atom_rows_match_reference_on_real_and_unusual_molecules(preprocess: PreprocessConfig):
    featurizer = Featurizer(preprocess)
    # Enough real molecules that most atom kinds are met twice: the first time a kind is read from
    # its atom, later through the invariant-keyed cache.
    smiles = [row["SMILES"] for row in b3db_rows(400)] + EDGE_CASES
    checked = 0
    for text in smiles:
        try:
            graph = featurizer(text)
        except FeaturizationError:
            continue
        molecule = featurizer.parse(text)
        expected = np.stack([reference_atom_row(atom, preprocess) for atom in molecule.GetAtoms()])
        np.testing.assert_array_equal(graph.atom_features, expected, err_msg=text)
        # The public per-molecule method (no hints from the SMILES text) agrees as well.
        np.testing.assert_array_equal(featurizer.atom_features(molecule), expected, err_msg=text)
        checked += 1
    assert checked >= 400
    assert len(featurizer._table_rows) > 64  # the row table grew past its first size
    # A fresh featurizer (empty row cache) gives the same rows as the warmed-up one.
    for text in EDGE_CASES:
        np.testing.assert_array_equal(
            Featurizer(preprocess)(text).atom_features, featurizer(text).atom_features
        )


# ----------------------------------------------------------------------------- refusals


def test_too_many_atoms(preprocess: PreprocessConfig):
    featurizer = Featurizer(with_settings(preprocess, max_atoms=3))
    assert featurizer("CCO").num_atoms == 3
    error = featurize_or_error(featurizer, "CCCC")
    assert "4 heavy atoms" in error.reason and "max_atoms=3" in error.reason
    assert error.smiles == "CCCC"


@pytest.mark.parametrize(
    ("smiles", "reason"),
    [
        ("C1CC", "unparsable SMILES (unclosed ring)"),
        ("CC(", "unparsable SMILES (syntax error at position 3)"),
        ("CC)C", "unparsable SMILES (extra close parentheses at position 3)"),
        ("C12CC12", "ring closure 2 duplicates bond between atom 0 and atom 2"),
        ("  C((C", "syntax error at position 5"),  # counted in the SMILES as given
        ("not a molecule", "whitespace"),
        ("xyz", "unparsable SMILES (syntax error at position 1)"),
        ("C(C)(C)(C)(C)C", "invalid chemistry: Explicit valence"),
        ("c1cccc1", "invalid chemistry: Can't kekulize"),
        ("", "empty SMILES"),
        ("   \t\n", "empty SMILES"),
        ("CC O", "whitespace"),
        ("CC\tO", "whitespace"),
        ("CCO\u00e9", "'\u00e9' (position 4), not a SMILES character"),
        ("\u00e9CCO", "(position 1)"),
    ],
)
def test_refused_with_a_reason(featurizer: Featurizer, smiles: str, reason: str):
    error = featurize_or_error(featurizer, smiles)
    assert reason in error.reason
    assert error.smiles == smiles


def test_a_syntax_error_without_rdkit_words_still_gets_a_reason():
    assert _syntax_problem("", position_offset=0) == "syntax error"
    log = "SMILES Parse Error: Failed parsing SMILES 'C((C' for input: 'C((C'\n"
    assert _syntax_problem(log, position_offset=0) == "syntax error"


def test_without_rdkits_error_log_capture_the_reason_is_a_syntax_error(
    featurizer: Featurizer, monkeypatch: pytest.MonkeyPatch
):
    # RDKit releases before CaptureErrorLog, which pyproject still allows.
    monkeypatch.delattr(rdBase, "CaptureErrorLog")
    error = featurize_or_error(featurizer, "C1CC")
    assert error.reason == "unparsable SMILES (syntax error)"


def test_internal_whitespace_is_not_read_as_the_first_word(featurizer: Featurizer):
    # RDKit alone parses "CC O" as ethane (the rest is a name): the featurizer must refuse it.
    assert Chem.MolFromSmiles("CC O").GetNumAtoms() == 2
    error = featurize_or_error(featurizer, "CC O")
    assert "'CC'" in error.reason
    # Surrounding whitespace is only trimmed.
    np.testing.assert_array_equal(
        featurizer("  CCO\n").atom_features, featurizer("CCO").atom_features
    )


def test_a_non_ascii_character_is_not_skipped(featurizer: Featurizer):
    # RDKit alone reads "CCO\u00e9" as ethanol and "CC\u00d6" as ethane, without a warning.
    assert Chem.MolToSmiles(Chem.MolFromSmiles("CCO\u00e9")) == "CCO"
    assert Chem.MolToSmiles(Chem.MolFromSmiles("CC\u00d6")) == "CC"
    assert "not a SMILES character" in featurize_or_error(featurizer, "CC\u00d6").reason


def test_non_string_input(featurizer: Featurizer):
    with pytest.raises(FeaturizationError, match="expected a SMILES string"):
        featurizer(None)


def test_featurize_many_returns_errors_in_place(featurizer: Featurizer):
    results = featurizer.featurize_many(["CCO", "C1CC", "", "c1ccccc1"])
    assert [type(result) for result in results] == [
        MoleculeGraph,
        FeaturizationError,
        FeaturizationError,
        MoleculeGraph,
    ]
    assert results[3].num_atoms == 6
    # No traceback: its frames would keep the batch's molecules alive in a reference cycle.
    assert results[1].__traceback__ is None and results[2].__traceback__ is None


def test_featurize_many_in_stage_batches_equals_one_molecule_at_a_time(
    preprocess: PreprocessConfig,
):
    # Molecules go through featurize_many's stages in batches: refusals at batch edges must keep
    # every result in its input position, and each graph must be the one a lone call gives.
    batch = Featurizer._STAGE_BATCH
    smiles = [row["SMILES"] for row in b3db_rows(2 * batch + 20)]
    for position in (0, batch - 1, batch, 2 * batch + 5):
        smiles.insert(position, "C1CC")
    smiles.append("")
    results = Featurizer(preprocess).featurize_many(smiles, with_keys=True)
    assert len(results) == len(smiles)
    alone = Featurizer(preprocess)
    for text, result in zip(smiles, results):
        try:
            expected = alone(text, with_keys=True)
        except FeaturizationError as error:
            assert isinstance(result, FeaturizationError) and str(result) == str(error)
            continue
        assert isinstance(result, MoleculeGraph), text
        np.testing.assert_array_equal(result.atom_features, expected.atom_features)
        np.testing.assert_array_equal(result.adjacency, expected.adjacency)
        np.testing.assert_array_equal(result.descriptors, expected.descriptors)
        assert (result.canonical_smiles, result.scaffold) == (
            expected.canonical_smiles,
            expected.scaffold,
        )


@pytest.mark.parametrize("enabled", [True, False])
def test_featurize_many_leaves_garbage_collection_as_it_was(featurizer: Featurizer, enabled: bool):
    was_enabled = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        featurizer.featurize_many(["CCO", "C1CC"])
        assert gc.isenabled() is enabled
        with pytest.raises(FeaturizationError):
            featurizer("C1CC")  # raised from inside the paused section
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was_enabled else gc.disable)()


# ----------------------------------------------------------------------------- fragments

SALT = "CC(=O)[O-].[Na+]"


def test_fragments_largest_keeps_the_largest_organic_fragment(preprocess: PreprocessConfig):
    featurizer = Featurizer(with_settings(preprocess, fragments="largest"))
    acetate = featurizer(SALT, with_keys=True)
    assert acetate.num_atoms == 4 and acetate.canonical_smiles == "CC(=O)[O-]"
    # Sulfuric acid is larger, but methylamine is the organic fragment.
    chosen = featurizer("OS(=O)(=O)O.CN", with_keys=True)
    assert chosen.canonical_smiles == "CN"


@pytest.mark.parametrize(
    "fragments",
    [
        ["CCN", "CCO"],  # same heavy atoms: the heavier one, ethanol
        ["c1ccccc1", "C1CCCCC1"],  # same heavy atoms: cyclohexane (more hydrogens)
        ["[Na+]", "[Cl-]"],  # nothing organic: the heavier ion
        ["CC(=O)[O-]", "C[NH3+]", "OCC(O)CO"],
    ],
)
def test_fragments_largest_does_not_depend_on_their_order(
    preprocess: PreprocessConfig, fragments: list[str]
):
    featurizer = Featurizer(with_settings(preprocess, fragments="largest"))
    kept = {
        featurizer(".".join(order), with_keys=True).canonical_smiles
        for order in itertools.permutations(fragments)
    }
    assert len(kept) == 1, kept


def test_fragments_error(preprocess: PreprocessConfig):
    featurizer = Featurizer(with_settings(preprocess, fragments="error"))
    error = featurize_or_error(featurizer, SALT)
    assert "2 fragments" in error.reason
    assert featurizer("CCO").num_atoms == 3


def test_fragments_keep_all(preprocess: PreprocessConfig):
    featurizer = Featurizer(with_settings(preprocess, fragments="keep_all"))
    graph = featurizer(SALT)
    assert graph.num_atoms == 5
    sodium = graph.atom_features[4]
    assert sodium[column(preprocess, "elements", 11)] == 1
    assert sodium[column(preprocess, "formal_charges", 1)] == 1
    np.testing.assert_array_equal(graph.adjacency[4], 0.0)  # no bond to the acetate
    too_many = Featurizer(with_settings(preprocess, fragments="keep_all", max_atoms=4))
    assert "5 heavy atoms" in featurize_or_error(too_many, SALT).reason


# ----------------------------------------------------------------------------- padding


def test_pad_graphs(featurizer: Featurizer):
    graphs = [featurizer("CCO"), featurizer("c1ccccc1O")]
    batch = pad_graphs(graphs, 10, featurizer.descriptor_size, len(featurizer))
    assert batch.atom_features.shape == (2, 10, len(featurizer))
    assert batch.adjacency.shape == (2, 10, 10)
    assert batch.atom_mask.shape == (2, 10)
    assert batch.descriptors.shape == (2, featurizer.descriptor_size)
    for array in batch.as_inputs().values():
        assert array.dtype == np.float32
    for i, graph in enumerate(graphs):
        size = graph.num_atoms
        np.testing.assert_array_equal(batch.atom_mask[i], [1.0] * size + [0.0] * (10 - size))
        np.testing.assert_array_equal(batch.atom_features[i, :size], graph.atom_features)
        np.testing.assert_array_equal(batch.adjacency[i, :size, :size], graph.adjacency)
        np.testing.assert_array_equal(batch.descriptors[i], graph.descriptors)
        # Padding is exactly zero: feature rows, adjacency rows and columns.
        assert not batch.atom_features[i, size:].any()
        assert not batch.adjacency[i, size:].any() and not batch.adjacency[i, :, size:].any()
    assert set(batch.as_inputs()) == {"atom_features", "adjacency", "atom_mask", "descriptors"}


# ----------------------------------------------------------------------------- parallel


def test_errors_survive_pickling():
    error = FeaturizationError("C1CC", "unparsable SMILES (syntax error)")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, FeaturizationError)
    assert (copy.smiles, copy.reason, str(copy)) == (error.smiles, error.reason, str(error))


def test_parallel_equals_serial(preprocess: PreprocessConfig):
    smiles = [row["SMILES"] for row in b3db_rows(14)] + ["C1CC", "", "CC O", SALT, "[Xe]"]
    serial = featurize_parallel(smiles, preprocess, num_workers=1, progress=False, with_keys=True)
    # Small chunks, so that both worker processes get several.
    parallel = featurize_parallel(
        smiles, preprocess, num_workers=2, chunk_size=3, progress=False, with_keys=True
    )
    assert_same_results(parallel, serial)
    errors = sum(isinstance(result, FeaturizationError) for result in parallel)
    assert errors == 3


def assert_same_results(first: list, second: list) -> None:
    assert len(first) == len(second)
    for one, other in zip(first, second):
        assert type(one) is type(other)
        if isinstance(one, FeaturizationError):
            assert (one.smiles, one.reason) == (other.smiles, other.reason)
            continue
        for field in ("atom_features", "adjacency", "descriptors"):
            mine, theirs = getattr(one, field), getattr(other, field)
            assert mine.dtype == theirs.dtype == np.float32
            np.testing.assert_array_equal(mine, theirs)
        assert (one.canonical_smiles, one.scaffold) == (other.canonical_smiles, other.scaffold)


def test_worker_results_come_back_bit_for_bit(featurizer: Featurizer):
    """Workers send flags as bits and bond orders as bytes; the parent must rebuild the same
    float32 arrays (aromatic 1.5 bonds, a dative bond, isotope masses, errors in between)."""
    results = featurizer.featurize_many(EDGE_CASES + ["C1CC", "c1ccccc1"], with_keys=True)
    packed = _PackedChunk.pack(results)
    assert not isinstance(packed.atom_features, np.ndarray)  # sent as (bits, last column)
    assert packed.adjacency.dtype == np.uint8
    small, as_bytes, rest = packed.descriptors  # Morgan counts as bytes, TPSA... as float32
    assert small[-featurizer.config.fingerprint.size :].all() and as_bytes.dtype == np.uint8
    assert rest.shape[1] > 0
    assert_same_results(pickle.loads(pickle.dumps(packed)).unpack(), results)


def test_packing_sends_values_it_cannot_compress_as_they_are():
    graph = MoleculeGraph(
        atom_features=np.array([[1.0, 0.5, 0.12], [0.0, 1.0, 0.14]], dtype=np.float32),
        adjacency=np.array([[0.0, 0.25], [0.25, 0.0]], dtype=np.float32),
        descriptors=np.array([3.0, 2.5, 256.0, -1.0, np.nan, np.inf], dtype=np.float32),
    )
    packed = _PackedChunk.pack([graph])
    assert packed.atom_features.dtype == packed.adjacency.dtype == np.float32
    assert packed.descriptors[0].tolist() == [True] + [False] * 5  # only 3.0 is a byte
    assert_same_results(packed.unpack(), [graph])


def test_a_chunk_without_any_graph_packs():
    errors = [FeaturizationError("C1CC", "unparsable SMILES"), FeaturizationError("", "empty")]
    assert_same_results(_PackedChunk.pack(errors).unpack(), errors)
