"""SMILES -> atom features, bond-weighted adjacency and molecule descriptors (RDKit + numpy only).

This is the one featurizer of the project: training, `mol_props infer` and Triton's featurizer step
all call it, so a molecule is never featurized two ways. It must never import torch.

A molecule becomes a compact `MoleculeGraph` (only its own atoms); `pad_graphs` turns a list of
them into the fixed-shape tensors the model takes:

    atom_features [B, N, F] float32   one-hot groups (each with an "unknown" slot) + scalars
    adjacency     [B, N, N] float32   bond order on both (i, j) and (j, i); aromatic = 1.5
    atom_mask     [B, N]    float32   1 for a real atom, 0 for padding
    descriptors   [B, D]    float32   fast RDKit molecule descriptors (and optional Morgan counts,
                                      SMILES token ids)

Bonds reach the model as a bond-order-weighted adjacency rather than one adjacency channel per bond
type: it keeps the model's input one [N, N] matrix (one MatMul per layer in ONNX/TensorRT) while
still telling a double bond from a single one; aromatic bonds sit in between at 1.5.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import Crippen, Descriptors, rdFingerprintGenerator, rdMolDescriptors, rdqueries
from rdkit.Chem.rdchem import Atom
from rdkit.Chem.Scaffolds import MurckoScaffold

from mol_props.config import FingerprintConfig, PreprocessConfig
from mol_props.errors import ConfigError, MolPropsError

# Part of the feature cache key and of an exported model's metadata: raise it whenever some
# molecule's features change. 2: ties between salt fragments no longer depend on their order.
FEATURIZER_VERSION = "2"

# Fast molecule-level descriptors (microseconds each, except where noted), by config name.
DESCRIPTOR_FUNCTIONS: dict[str, Callable[[Chem.Mol], float]] = {
    "MolWt": Descriptors.MolWt,
    "TPSA": rdMolDescriptors.CalcTPSA,
    "NumHDonors": rdMolDescriptors.CalcNumLipinskiHBD,
    "NumHAcceptors": rdMolDescriptors.CalcNumLipinskiHBA,
    "NumHeteroatoms": rdMolDescriptors.CalcNumHeteroatoms,
    "NumRings": rdMolDescriptors.CalcNumRings,
    "NumAromaticRings": rdMolDescriptors.CalcNumAromaticRings,
    "FractionCSP3": rdMolDescriptors.CalcFractionCSP3,
    "LabuteASA": rdMolDescriptors.CalcLabuteASA,
    "HeavyAtomCount": rdMolDescriptors.CalcNumHeavyAtoms,
    "FormalCharge": Chem.GetFormalCharge,
    "NumAtomStereoCenters": rdMolDescriptors.CalcNumAtomStereoCenters,
    "NumAmideBonds": rdMolDescriptors.CalcNumAmideBonds,
    # Crippen typing matches ~100 SMARTS patterns: ~0.5 ms per molecule.
    "MolLogP": Crippen.MolLogP,
    "MolMR": Crippen.MolMR,
    # SMARTS based: ~0.2 ms per molecule.
    "NumRotatableBonds": rdMolDescriptors.CalcNumRotatableBonds,
}

# ChemNet's SMILES vocabulary (mol_props.chemnet reads the token ids), in its order: a token's
# id is its position. Two-letter tokens are those whose second letter is r, i or l (Br, Cl, Si);
# anything else outside the list is "X"; "." ends the SMILES. Copied from the fcd_torch package,
# whose pretrained ChemNet was trained on exactly this tokenization.
CHEMNET_VOCABULARY = (
    "C N O H F Cl P B Br S I Si # ( ) + - 1 2 3 4 5 6 7 8 = [ ] @ c n o s X .".split()
)
_CHEMNET_IDS = {token: i for i, token in enumerate(CHEMNET_VOCABULARY)}
_CHEMNET_SECOND_LETTERS = frozenset("ril")
# The id of a step after the end: no token (ChemNet's one-hot row of zeros).
CHEMNET_PADDING_ID = len(CHEMNET_VOCABULARY)


def chemnet_token_ids(smiles: str, length: int) -> np.ndarray:
    """[length] float32 token ids of `smiles` as ChemNet reads it: the tokens, then ".", then
    padding; a SMILES of `length` tokens or more is cut after length - 1 and ends with "."."""
    ids = np.full(length, CHEMNET_PADDING_ID, dtype=np.float32)
    text = smiles + "."  # also stops the look-ahead below at the last character
    source = 0
    position = 0
    while True:
        width = 2 if text[source + 1] in _CHEMNET_SECOND_LETTERS else 1
        ids[position] = _CHEMNET_IDS.get(text[source : source + width], _CHEMNET_IDS["X"])
        source += width
        position += 1
        # Like ChemNet's own reader, a "." inside the SMILES (keep_all fragments) ends it too.
        if text[source] == "." or position == length - 1:
            ids[position] = _CHEMNET_IDS["."]
            return ids


HYBRIDIZATIONS = {
    str(value): int(value) for value in Chem.rdchem.HybridizationType.values.values()
}
CHIRAL_TAGS = {str(value): int(value) for value in Chem.rdchem.ChiralType.values.values()}
FRAGMENT_POLICIES = ("largest", "error", "keep_all")
_SP2 = int(Chem.rdchem.HybridizationType.SP2)
_SP3 = int(Chem.rdchem.HybridizationType.SP3)
_OTHER_HYBRIDIZATION = -1  # placeholder until an atom that is neither SP2 nor SP3 is read
# An isotope can only be written at the start of a bracket atom: "[13C]", "[2H]".
_ISOTOPE = re.compile(r"\[\d")
# RDKit's SMILES parser logs "SMILES Parse Error: unclosed ring for input: 'C1CC'", or
# "... syntax error while parsing: C((C" then "... check for mistakes around position 3:".
_RDKIT_PARSE_PROBLEM = re.compile(
    r"SMILES Parse Error: (?!Failed parsing)(.+?) (?:while parsing|for input):"
)
_RDKIT_PARSE_POSITION = re.compile(r"around position (\d+)")


class FeaturizationError(MolPropsError, ValueError):
    """A molecule that cannot be featurized, with a reason a person can act on."""

    def __init__(self, smiles: str, reason: str) -> None:
        super().__init__(f"{smiles!r}: {reason}")
        self.smiles = smiles
        self.reason = reason

    def __reduce__(self):
        # Pickled back from featurization worker processes with both arguments.
        return (FeaturizationError, (self.smiles, self.reason))


@dataclass
class MoleculeGraph:
    """One molecule, unpadded: n atoms, F atom features, D descriptors."""

    atom_features: np.ndarray  # [n, F] float32
    adjacency: np.ndarray  # [n, n] float32, symmetric, zero diagonal
    descriptors: np.ndarray  # [D] float32
    # Filled only when asked for (training data): duplicate detection and the scaffold split.
    canonical_smiles: str = ""
    scaffold: str = ""

    @property
    def num_atoms(self) -> int:
        return self.atom_features.shape[0]


@dataclass
class PaddedBatch:
    """Fixed-shape model inputs, named as the ONNX model and Triton configs name them."""

    atom_features: np.ndarray  # [B, N, F] float32
    adjacency: np.ndarray  # [B, N, N] float32
    atom_mask: np.ndarray  # [B, N] float32
    descriptors: np.ndarray  # [B, D] float32

    def as_inputs(self) -> dict[str, np.ndarray]:
        return {
            "atom_features": self.atom_features,
            "adjacency": self.adjacency,
            "atom_mask": self.atom_mask,
            "descriptors": self.descriptors,
        }


def _morgan_generator(setting: FingerprintConfig):
    """RDKit's Morgan count generator for `setting`, or None when its size is 0 (off)."""
    if setting.size == 0:
        return None
    return rdFingerprintGenerator.GetMorganGenerator(radius=setting.radius, fpSize=setting.size)


def _slot_table(values: Sequence[int], size: int, field: str, shift: int = 0) -> np.ndarray:
    """Lookup table value -> one-hot slot; values not listed map to the last ("unknown") slot."""
    table = np.full(size, len(values), dtype=np.int64)
    for slot, value in enumerate(values):
        # A negative index would silently give another value's slot (-9 would take +8's).
        if not 0 <= value + shift < size:
            raise ConfigError(
                f"preprocess.atom.{field}: {value} is outside {-shift}..{size - shift - 1}"
            )
        table[value + shift] = slot
    return table


def _enum_values(names: Sequence[str], known: dict[str, int], field: str) -> list[int]:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"preprocess.atom.{field}: {unknown} are not among {list(known)}")
    return [known[name] for name in names]


class Featurizer:
    """Callable SMILES -> MoleculeGraph; `atom_feature_size` and `descriptor_size` give widths."""

    # Property ranges the lookup tables cover; anything outside lands in the unknown slot.
    _MAX_ATOMIC_NUMBER = 119
    _MAX_DEGREE = 16
    _CHARGE_SHIFT = 8  # formal charges -8..+8
    _MAX_HYDROGENS = 16
    # Distinct atom keys kept with their feature rows: B3DB has a few hundred; the bound only
    # keeps memory flat for adversarial input.
    _MAX_CACHED_ROWS = 100_000
    # Molecules featurized stage by stage together (see `_featurize_batch`); 8 took most of the
    # gain, more up to 256 changed little.
    _STAGE_BATCH = 64

    def __init__(self, config: PreprocessConfig) -> None:
        if config.fragments not in FRAGMENT_POLICIES:
            # Checked here: any other word would otherwise quietly act as "largest".
            raise ConfigError(
                f"preprocess.fragments={config.fragments!r}: expected one of {FRAGMENT_POLICIES}"
            )
        self.config = config
        atom = config.atom
        self._element_slots = _slot_table(atom.elements, self._MAX_ATOMIC_NUMBER, "elements")
        self._degree_slots = _slot_table(atom.degrees, self._MAX_DEGREE + 1, "degrees")
        self._charge_slots = _slot_table(
            atom.formal_charges,
            2 * self._CHARGE_SHIFT + 1,
            "formal_charges",
            shift=self._CHARGE_SHIFT,
        )
        self._hybridization_slots = _slot_table(
            _enum_values(atom.hybridizations, HYBRIDIZATIONS, "hybridizations"),
            len(HYBRIDIZATIONS),
            "hybridizations",
        )
        self._hydrogen_slots = _slot_table(
            atom.total_hydrogens, self._MAX_HYDROGENS + 1, "total_hydrogens"
        )
        self._chirality_slots = _slot_table(
            _enum_values(atom.chiral_tags, CHIRAL_TAGS, "chiral_tags"),
            len(CHIRAL_TAGS),
            "chiral_tags",
        )
        # One-hot groups in feature order: (lookup table, width including the unknown slot).
        self._groups = [
            self._element_slots,
            self._degree_slots,
            self._charge_slots,
            self._hybridization_slots,
            self._hydrogen_slots,
            self._chirality_slots,
        ]
        self._group_offsets = np.cumsum([0] + [int(table.max()) + 1 for table in self._groups])
        # After the one-hot groups: aromatic, in ring, atomic mass / 100.
        self.atom_feature_size = int(self._group_offsets[-1]) + 3
        # The element group's last slot: atoms of every element outside atom.elements.
        self.unknown_element_column = len(atom.elements)
        unknown = [name for name in config.descriptors if name not in DESCRIPTOR_FUNCTIONS]
        if unknown:
            raise ConfigError(
                f"preprocess.descriptors: {unknown} are not among {list(DESCRIPTOR_FUNCTIONS)}"
            )
        self._descriptor_functions = [DESCRIPTOR_FUNCTIONS[name] for name in config.descriptors]
        self._fingerprint = _morgan_generator(config.fingerprint)
        self._kernel_fingerprint = _morgan_generator(config.kernel_fingerprint)
        # Column order: named descriptors, the fingerprint's counts, ChemNet token ids, the kernel
        # member's counts. The kernel's come last, so the forest reads a prefix: every column
        # before the token ids.
        self.forest_descriptor_count = len(self._descriptor_functions) + config.fingerprint.size
        # ChemNet's token ids (the ChemNet member's input) among the descriptor columns.
        self.smiles_token_columns = slice(
            self.forest_descriptor_count, self.forest_descriptor_count + config.smiles_tokens
        )
        self.descriptor_size = (
            self.forest_descriptor_count + config.smiles_tokens + config.kernel_fingerprint.size
        )
        self._periodic_table = Chem.GetPeriodicTable()
        self._rows: dict[tuple, np.ndarray] = {}
        # Rows of atom kinds met so far, by invariant key (see `_atom_features_by_invariants`):
        # one [K, F] table indexed in one step costs less than stacking K row arrays.
        self._table_rows: dict[tuple, int] = {}
        self._row_table = np.zeros((64, self.atom_feature_size), dtype=np.float32)
        # GetSubstructMatches of a one-atom pattern: every matching atom, however many (as one
        # parameter object: keyword arguments cost the call a sixth more).
        self._every_match = Chem.SubstructMatchParameters()
        self._every_match.uniquify = False
        self._every_match.maxMatches = 1_000_000
        self._sp2_query = Chem.MolFromSmarts("[^2]")
        self._sp3_query = Chem.MolFromSmarts("[^3]")
        # A one-atom query molecule: its matches come back as atom indices, where
        # GetAtomsMatchingQuery wraps each atom for Python (twice the time on B3DB).
        chiral_query = Chem.RWMol()
        chiral_query.AddAtom(rdqueries.HasChiralTagQueryAtom())
        self._chiral_query = chiral_query.GetMol()

    def __len__(self) -> int:
        return self.atom_feature_size

    def __call__(self, smiles: str, with_keys: bool = False) -> MoleculeGraph:
        """Featurize one SMILES; `with_keys` adds canonical SMILES and Bemis-Murcko scaffold."""
        (result,) = self.featurize_many([smiles], with_keys)
        if isinstance(result, FeaturizationError):
            raise result
        return result

    def unknown_elements(self, smiles: str, graph: MoleculeGraph) -> tuple[str, ...]:
        """Symbols of the molecule's elements outside preprocess.atom.elements, whose atoms all
        share the "unknown" slot (a prediction for them is an extrapolation); () for most."""
        if not graph.atom_features[:, self.unknown_element_column].any():
            return ()
        known = set(self.config.atom.elements)
        atoms = self.parse(smiles).GetAtoms()  # rare: read again only to name the elements
        return tuple(
            sorted({atom.GetSymbol() for atom in atoms if atom.GetAtomicNum() not in known})
        )

    def parse(self, smiles: str) -> Chem.Mol:
        """SMILES -> RDKit molecule (one fragment), or FeaturizationError naming the reason."""
        if not isinstance(smiles, str):
            raise FeaturizationError(str(smiles), f"expected a SMILES string, got {type(smiles)}")
        text = smiles.strip()
        if not text:
            raise FeaturizationError(smiles, "empty SMILES")
        words = text.split()
        if len(words) > 1:
            # RDKit reads "CC O" as ethane named "O": everything after a space is a name.
            raise FeaturizationError(
                smiles, f"SMILES contains whitespace; RDKit would silently read only {words[0]!r}"
            )
        if not text.isascii():
            # RDKit skips such characters: "CCOé" would be read as ethanol.
            position, character = next((i, c) for i, c in enumerate(smiles) if not c.isascii())
            raise FeaturizationError(
                smiles,
                f"SMILES contains {character!r} (position {position + 1}), not a SMILES "
                "character; RDKit would silently skip it",
            )
        molecule = Chem.MolFromSmiles(text)
        if molecule is None:
            # Positions count from the SMILES as given, leading whitespace included.
            leading_whitespace = len(smiles) - len(smiles.lstrip())
            raise FeaturizationError(smiles, _parse_failure_reason(text, leading_whitespace))
        if "." in text:
            molecule = self._choose_fragment(smiles, molecule)
        num_atoms = molecule.GetNumAtoms()
        if num_atoms == 0:
            raise FeaturizationError(smiles, "molecule has no atoms")
        if num_atoms > self.config.max_atoms:
            raise FeaturizationError(
                smiles,
                f"{num_atoms} heavy atoms, more than max_atoms={self.config.max_atoms}",
            )
        return molecule

    def _choose_fragment(self, smiles: str, molecule: Chem.Mol) -> Chem.Mol:
        fragments = Chem.GetMolFrags(molecule, asMols=True)
        if len(fragments) == 1 or self.config.fragments == "keep_all":
            return molecule
        if self.config.fragments == "error":
            raise FeaturizationError(
                smiles,
                f"{len(fragments)} fragments (a salt or mixture); "
                "set preprocess.fragments=largest to keep the largest organic one",
            )

        # Largest organic fragment: carbon-containing first, then by heavy atoms. Ties go to the
        # heavier fragment, then by canonical SMILES, so that the order in which a mixture is
        # written never changes which fragment is kept ("CCN.CCO" and "CCO.CCN" are one mixture).
        def rank(fragment: Chem.Mol) -> tuple[bool, int, float, str]:
            has_carbon = any(atom.GetAtomicNum() == 6 for atom in fragment.GetAtoms())
            weight = Descriptors.MolWt(fragment)
            return has_carbon, fragment.GetNumAtoms(), weight, Chem.MolToSmiles(fragment)

        return max(fragments, key=rank)

    @staticmethod
    def _adjacency(molecule: Chem.Mol) -> np.ndarray:
        """[n, n] float32 symmetric bond-order adjacency."""
        adjacency = Chem.GetAdjacencyMatrix(molecule, useBO=True).astype(np.float32)
        if np.count_nonzero(adjacency) == 2 * molecule.GetNumBonds():
            return adjacency  # every bond filled both of its cells
        # RDKit fills only the (donor, acceptor) cell of a dative bond ("N->[Fe]") and neither
        # cell of a zero-order bond: mirror the matrix so messages flow both ways.
        return np.maximum(adjacency, adjacency.T)

    def atom_features(self, molecule: Chem.Mol) -> np.ndarray:
        """[n, F] float32: one-hot groups with unknown slots, then aromatic, ring, mass/100.

        Reads every property of every atom: the reference path, taken for molecules with
        isotopes (the mass feature) and by tests that check `_atom_features_by_invariants`.
        """
        atoms = list(molecule.GetAtoms())
        # Each property is read once per atom by one `map` over the unbound method (a fifth
        # cheaper than building a tuple per atom) into a hashable key; `_row` builds each
        # distinct key's row once.
        keys = zip(
            map(Atom.GetAtomicNum, atoms),
            map(Atom.GetDegree, atoms),
            map(Atom.GetFormalCharge, atoms),
            map(Atom.GetHybridization, atoms),
            map(Atom.GetTotalNumHs, atoms),
            map(Atom.GetChiralTag, atoms),
            map(Atom.GetIsAromatic, atoms),
            map(Atom.IsInRing, atoms),
            map(Atom.GetMass, atoms),
        )
        # np.array of equal-length rows: a third of np.stack's cost for a few dozen rows.
        return np.array([self._row(key) for key in keys])

    def _atom_features_by_invariants(
        self, molecule: Chem.Mol, adjacency: np.ndarray, stereo: bool
    ) -> np.ndarray:
        """The rows of `atom_features` (isotopes aside), keyed by whole-molecule RDKit calls.

        Wrapping one RDKit atom for Python costs ~2 us, more than reading a property from it, so
        here each atom's key comes from a few calls over the whole molecule instead (on B3DB this
        takes ~10% off the CPU time of a whole featurization, measured interleaved with the
        atom-by-atom path):
        - ECFP connectivity invariants: one integer per atom from its atomic number, degree, total
          H count, formal charge and ring membership;
        - hybridization from two SMARTS matches ([^2], [^3]); the few atoms with another one
          (SP in nitriles and alkynes, S in ions) are read one by one;
        - aromatic: the atom has an aromatic (1.5) bond in the adjacency;
        - chiral tags (only when the SMILES has "@") from the atoms that carry one.
        A molecule with a key not seen before is read atom by atom with `atom_features`, so the
        rows are the reference rows; tests compare both paths on real molecules. The invariant is a
        32-bit hash, as in every ECFP fingerprint: two atom kinds sharing one would need a hash
        collision among the few hundred kinds one process meets.
        """
        num_atoms = adjacency.shape[0]
        invariants = rdMolDescriptors.GetConnectivityInvariants(molecule, True)
        hybridizations = [_OTHER_HYBRIDIZATION] * num_atoms
        for (index,) in molecule.GetSubstructMatches(self._sp3_query, self._every_match):
            hybridizations[index] = _SP3
        for (index,) in molecule.GetSubstructMatches(self._sp2_query, self._every_match):
            hybridizations[index] = _SP2
        if _OTHER_HYBRIDIZATION in hybridizations:
            # SP (nitriles, alkynes), S (ions) and the rest: few atoms, read one by one.
            for index, hybridization in enumerate(hybridizations):
                if hybridization == _OTHER_HYBRIDIZATION:
                    hybridizations[index] = int(molecule.GetAtomWithIdx(index).GetHybridization())
        chiral_tags = [0] * num_atoms
        if stereo:
            for (index,) in molecule.GetSubstructMatches(self._chiral_query, self._every_match):
                chiral_tags[index] = int(molecule.GetAtomWithIdx(index).GetChiralTag())
        aromatic = (adjacency == 1.5).any(axis=1).tolist()  # [n] bool
        keys = list(zip(invariants, hybridizations, chiral_tags, aromatic))
        try:
            table_rows = [self._table_rows[key] for key in keys]
        except KeyError:
            # A key not seen yet: the reference path reads every atom; its rows are kept by key.
            rows = self.atom_features(molecule)  # [n, F]
            self._keep_rows(keys, rows)
            return rows
        return self._row_table[table_rows]  # [n, F], a copy

    def _keep_rows(self, keys: list[tuple], rows: np.ndarray) -> None:
        """Add the rows of keys not in the table yet (up to a bound), growing it as needed."""
        for key, row in zip(keys, rows):
            if key in self._table_rows or len(self._table_rows) >= self._MAX_CACHED_ROWS:
                continue
            size = len(self._table_rows)
            if size == len(self._row_table):
                self._row_table = np.concatenate([self._row_table, np.zeros_like(self._row_table)])
            self._row_table[size] = row
            self._table_rows[key] = size

    def _row(self, key: tuple) -> np.ndarray:
        """The feature row of one atom key (see `atom_features`); cached up to a bound."""
        row = self._rows.get(key)
        if row is not None:
            return row
        (
            atomic_number,
            degree,
            charge,
            hybridization,
            hydrogens,
            chirality,
            aromatic,
            in_ring,
            mass,
        ) = key
        slots = (
            min(max(atomic_number, 0), self._MAX_ATOMIC_NUMBER - 1),
            min(max(degree, 0), self._MAX_DEGREE),
            min(max(charge + self._CHARGE_SHIFT, 0), 2 * self._CHARGE_SHIFT),
            int(hybridization),
            min(max(hydrogens, 0), self._MAX_HYDROGENS),
            int(chirality),
        )
        row = np.zeros(self.atom_feature_size, dtype=np.float32)
        for offset, table, value in zip(self._group_offsets, self._groups, slots):
            row[offset + table[value]] = 1.0
        if mass is None:
            mass = self._periodic_table.GetAtomicWeight(atomic_number)
        row[-3:] = (float(aromatic), float(in_ring), mass / 100.0)
        row.flags.writeable = False  # shared by every atom with this key
        if len(self._rows) < self._MAX_CACHED_ROWS:
            self._rows[key] = row
        return row

    def molecule_descriptors(self, molecule: Chem.Mol) -> np.ndarray:
        """[D] float32: the configured descriptors, then the Morgan counts of the fingerprint,
        ChemNet's token ids of the canonical SMILES and the kernel fingerprint's counts, where
        enabled."""
        values = np.array(
            [function(molecule) for function in self._descriptor_functions], dtype=np.float32
        )
        parts = [values]  # in column order
        if self._fingerprint is not None:
            parts.append(self._fingerprint.GetCountFingerprintAsNumPy(molecule).astype(np.float32))
        if self.config.smiles_tokens:
            smiles = Chem.MolToSmiles(molecule)
            parts.append(chemnet_token_ids(smiles, self.config.smiles_tokens))
        if self._kernel_fingerprint is not None:
            counts = self._kernel_fingerprint.GetCountFingerprintAsNumPy(molecule)
            parts.append(counts.astype(np.float32))
        return np.concatenate(parts) if len(parts) > 1 else values

    def featurize_many(
        self, smiles: Iterable[str], with_keys: bool = False
    ) -> list[MoleculeGraph | FeaturizationError]:
        """One result per input, in order: a graph, or the error saying why not."""
        texts = list(smiles)
        results: list[MoleculeGraph | FeaturizationError] = []
        # RDKit would also print its own parse errors to stderr; our errors carry the reason.
        with rdBase.BlockLogs(), _garbage_collection_paused():
            for start in range(0, len(texts), self._STAGE_BATCH):
                results.extend(
                    self._featurize_batch(texts[start : start + self._STAGE_BATCH], with_keys)
                )
        return results

    def _featurize_batch(
        self, texts: Sequence[str], with_keys: bool
    ) -> list[MoleculeGraph | FeaturizationError]:
        """A few molecules one stage at a time (parse all, then all adjacencies, ...), not one
        molecule at a time: each stage's code stays in the CPU's caches over the batch. On B3DB,
        interleaved with the one-by-one loop, that took 2-17% off the time per molecule (17%
        first, less in later repeats as the machine slowed)."""
        results: list[MoleculeGraph | FeaturizationError | None] = [None] * len(texts)
        parsed: list[tuple[int, str, Chem.Mol]] = []  # (position, SMILES, molecule)
        for position, text in enumerate(texts):
            try:
                parsed.append((position, text, self.parse(text)))
            except FeaturizationError as error:
                # Kept without its traceback, whose frame (this one) would hold the batch's
                # molecules in a reference cycle until the paused collector ran again.
                results[position] = error.with_traceback(None)
        adjacencies = [self._adjacency(molecule) for _, _, molecule in parsed]
        atom_features = [
            self._atom_rows(text, molecule, adjacency)
            for (_, text, molecule), adjacency in zip(parsed, adjacencies)
        ]
        descriptors = [self.molecule_descriptors(molecule) for _, _, molecule in parsed]
        for (position, _, molecule), atoms, adjacency, values in zip(
            parsed, atom_features, adjacencies, descriptors
        ):
            graph = MoleculeGraph(atom_features=atoms, adjacency=adjacency, descriptors=values)
            if with_keys:
                graph.canonical_smiles = Chem.MolToSmiles(molecule)
                graph.scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=molecule)
            results[position] = graph
        return results  # type: ignore[return-value]  # every position is filled above

    def _atom_rows(self, text: str, molecule: Chem.Mol, adjacency: np.ndarray) -> np.ndarray:
        """[n, F] atom features, by the cheapest path that gives the reference rows."""
        if _ISOTOPE.search(text):
            # Isotopes change the mass feature, which the connectivity invariants do not carry.
            return self.atom_features(molecule)
        # Only a bracket atom written with "@" gets a chiral tag: without one, no atom is asked
        # for its tag.
        return self._atom_features_by_invariants(molecule, adjacency, stereo="@" in text)


@contextlib.contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Python's cycle collector off for a while, then back as it was.

    Featurization allocates many small containers (atom keys, lists), so the collector ran every
    few molecules and walked every live object each time: ~8-10% of featurization time on B3DB,
    in one process and with worker processes. Featurization forms no reference cycles (a refused
    molecule's error is kept without its traceback), so reference counting frees everything and
    the pause holds back no memory."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_failure_reason(text: str, position_offset: int = 0) -> str:
    """Why RDKit rejected a SMILES: the syntax problem it reported (a position in it moved by
    `position_offset`), or the chemistry problem it found."""
    # RDKit says what is wrong with a SMILES only in its error log, which featurization blocks;
    # CaptureErrorLog (not in every RDKit that pyproject allows) takes it even while blocked.
    capture_error_log = getattr(rdBase, "CaptureErrorLog", contextlib.nullcontext)
    with capture_error_log() as capture:
        unsanitized = Chem.MolFromSmiles(text, sanitize=False)
    if unsanitized is None:
        log = getattr(capture, "messages", "")
        return f"unparsable SMILES ({_syntax_problem(log, position_offset)})"
    problems = Chem.DetectChemistryProblems(unsanitized)
    if problems:
        return f"invalid chemistry: {problems[0].Message()}"
    return "unparsable SMILES"


def _syntax_problem(log: str, position_offset: int) -> str:
    """RDKit's words for a SMILES syntax error, from its error log: "unclosed ring", "extra close
    parentheses at position 3", "syntax error at position 5"; "syntax error" if it said none."""
    problem = _RDKIT_PARSE_PROBLEM.search(log)
    if problem is None:
        return "syntax error"
    position = _RDKIT_PARSE_POSITION.search(log)
    if position is None:
        return problem.group(1)
    return f"{problem.group(1)} at position {int(position.group(1)) + position_offset}"


def pad_graphs(
    graphs: Sequence[MoleculeGraph], num_atoms: int, descriptor_size: int, atom_feature_size: int
) -> PaddedBatch:
    """Stack graphs into fixed-shape arrays padded to `num_atoms` (padding is all zeros)."""
    batch_size = len(graphs)
    atom_features = np.zeros((batch_size, num_atoms, atom_feature_size), dtype=np.float32)
    adjacency = np.zeros((batch_size, num_atoms, num_atoms), dtype=np.float32)
    atom_mask = np.zeros((batch_size, num_atoms), dtype=np.float32)
    descriptors = np.zeros((batch_size, descriptor_size), dtype=np.float32)
    for i, graph in enumerate(graphs):
        size = graph.num_atoms
        atom_features[i, :size] = graph.atom_features
        adjacency[i, :size, :size] = graph.adjacency
        atom_mask[i, :size] = 1.0
        descriptors[i] = graph.descriptors
    return PaddedBatch(atom_features, adjacency, atom_mask, descriptors)


def _pack_atom_features(atom_features: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """[A, F] float32 -> (flag bits [A, ceil((F-1)/8)] uint8, last column [A] float32).

    Every column but the last (mass / 100) is a one-hot slot or a flag, 0 or 1: as bits they
    take 1/32 of the bytes. Checked, not assumed: rows with any other value go as they are."""
    flags = atom_features[:, :-1]
    if not np.all((flags == 0) | (flags == 1)):
        return atom_features
    return np.packbits(flags.astype(bool), axis=1), atom_features[:, -1].copy()


def _unpack_atom_features(
    packed: np.ndarray | tuple[np.ndarray, np.ndarray], width: int
) -> np.ndarray:
    if isinstance(packed, np.ndarray):
        return packed
    bits, last_column = packed
    atom_features = np.empty((len(last_column), width), dtype=np.float32)  # [A, F]
    atom_features[:, :-1] = np.unpackbits(bits, axis=1, count=width - 1)
    atom_features[:, -1] = last_column
    return atom_features


def _pack_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """Flat float32 bond orders -> uint8 twice the order (0, 1.5, 2, 3 become 0, 3, 4, 6):
    a quarter of the bytes, exact for any multiple of 0.5 up to 127.5; else sent as it is."""
    doubled = adjacency * 2
    as_bytes = doubled.astype(np.uint8)
    return as_bytes if np.array_equal(as_bytes, doubled) else adjacency


def _unpack_adjacency(packed: np.ndarray) -> np.ndarray:
    if packed.dtype == np.float32:
        return packed
    return packed.astype(np.float32) * np.float32(0.5)


def _pack_descriptors(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[G, D] float32 -> (which columns are whole numbers 0-255 [D] bool, those columns [G, K]
    uint8, the rest [G, D - K] float32). Morgan counts and most named counts are small whole
    numbers: as bytes they take a quarter of the pipe. Checked per chunk and column, exact."""
    # Compared before the cast: casting NaN or values outside 0-255 to uint8 is undefined.
    whole = (descriptors >= 0) & (descriptors <= 255) & (descriptors == np.floor(descriptors))
    small = np.all(whole, axis=0)  # [D]
    return small, descriptors[:, small].astype(np.uint8), descriptors[:, ~small]


def _unpack_descriptors(packed: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    small, as_bytes, rest = packed
    descriptors = np.empty((len(as_bytes), len(small)), dtype=np.float32)  # [G, D]
    descriptors[:, small] = as_bytes
    descriptors[:, ~small] = rest
    return descriptors


@dataclass
class _PackedChunk:
    """A worker's results for one chunk as a few flat, compact arrays.

    Pickling three small arrays per molecule back to the parent cost more CPU than some
    featurization steps; so did moving ~10 KB of float32 per molecule through the pool's pipe
    (with 2 workers on B3DB, returning nothing instead took ~15% off the wall time). Flags as
    bits, bond orders and whole-number descriptors (Morgan counts) as bytes cut that to ~1 KB;
    the parent rebuilds the same float32 arrays, bit for bit."""

    errors: list[FeaturizationError | None]  # per molecule: its error, or None for a graph
    sizes: list[int]  # [G] atoms of each graph
    atom_feature_size: int
    atom_features: np.ndarray | tuple[np.ndarray, np.ndarray]  # [sum of sizes, F], packed
    adjacency: np.ndarray  # [sum of sizes squared], each graph's [n, n] flattened, packed
    descriptors: tuple[np.ndarray, np.ndarray, np.ndarray]  # [G, D], packed
    canonical_smiles: list[str]
    scaffolds: list[str]

    @classmethod
    def pack(cls, results: Sequence[MoleculeGraph | FeaturizationError]) -> _PackedChunk:
        graphs = [result for result in results if isinstance(result, MoleculeGraph)]
        if graphs:
            atom_features = np.concatenate([graph.atom_features for graph in graphs])
            adjacency = np.concatenate([graph.adjacency.ravel() for graph in graphs])
            descriptors = np.stack([graph.descriptors for graph in graphs])
        else:
            atom_features = np.zeros((0, 1), dtype=np.float32)
            adjacency = np.zeros(0, dtype=np.float32)
            descriptors = np.zeros((0, 0), dtype=np.float32)
        return cls(
            errors=[
                result if isinstance(result, FeaturizationError) else None for result in results
            ],
            sizes=[graph.num_atoms for graph in graphs],
            atom_feature_size=atom_features.shape[1],
            atom_features=_pack_atom_features(atom_features),
            adjacency=_pack_adjacency(adjacency),
            descriptors=_pack_descriptors(descriptors),
            canonical_smiles=[graph.canonical_smiles for graph in graphs],
            scaffolds=[graph.scaffold for graph in graphs],
        )

    def unpack(self) -> list[MoleculeGraph | FeaturizationError]:
        """The results in input order; each graph's arrays are views into the chunk's arrays."""
        all_atom_features = _unpack_atom_features(self.atom_features, self.atom_feature_size)
        all_adjacency = _unpack_adjacency(self.adjacency)
        all_descriptors = _unpack_descriptors(self.descriptors)
        results: list[MoleculeGraph | FeaturizationError] = []
        graph = atom_start = adjacency_start = 0
        for error in self.errors:
            if error is not None:
                results.append(error)
                continue
            size = self.sizes[graph]
            atom_end, adjacency_end = atom_start + size, adjacency_start + size * size
            results.append(
                MoleculeGraph(
                    atom_features=all_atom_features[atom_start:atom_end],
                    adjacency=all_adjacency[adjacency_start:adjacency_end].reshape(size, size),
                    descriptors=all_descriptors[graph],
                    canonical_smiles=self.canonical_smiles[graph],
                    scaffold=self.scaffolds[graph],
                )
            )
            graph, atom_start, adjacency_start = graph + 1, atom_end, adjacency_end
        return results


_WORKER_FEATURIZER: Featurizer | None = None


def _init_worker(config: PreprocessConfig) -> None:
    global _WORKER_FEATURIZER
    gc.enable()  # forked while featurize_parallel paused the collector; each chunk pauses it
    _WORKER_FEATURIZER = Featurizer(config)


def _featurize_chunk(chunk_and_keys: tuple[list[str], bool]) -> _PackedChunk:
    assert _WORKER_FEATURIZER is not None, "worker started without _init_worker"
    chunk, with_keys = chunk_and_keys
    return _PackedChunk.pack(_WORKER_FEATURIZER.featurize_many(chunk, with_keys))


def featurize_parallel(
    smiles: Sequence[str],
    config: PreprocessConfig,
    num_workers: int,
    chunk_size: int = 256,
    progress: bool = True,
    description: str = "featurize",
    with_keys: bool = False,
) -> list[MoleculeGraph | FeaturizationError]:
    """Featurize many molecules on `num_workers` processes (0 = all cores), with a progress bar."""
    from tqdm.auto import tqdm

    workers = num_workers or multiprocessing.cpu_count()
    chunks = [
        list(smiles[start : start + chunk_size]) for start in range(0, len(smiles), chunk_size)
    ]
    bar = tqdm(total=len(smiles), desc=description, unit="mol", disable=not progress)
    results: list[MoleculeGraph | FeaturizationError] = []
    # The collector paused here as well: this process builds a graph object per molecule, and
    # each collection would walk all of them (and whatever else the caller holds).
    with _garbage_collection_paused():
        if workers <= 1 or len(chunks) <= 1:
            featurizer = Featurizer(config)
            for chunk in chunks:
                results.extend(featurizer.featurize_many(chunk, with_keys))
                bar.update(len(chunk))
        else:
            context = multiprocessing.get_context("fork")
            with context.Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
                work = [(chunk, with_keys) for chunk in chunks]
                for packed in pool.imap(_featurize_chunk, work):
                    results.extend(packed.unpack())
                    bar.update(len(packed.errors))
    bar.close()
    return results
