"""The forest member: a random forest on molecule-level features, run as tensor operations.

Why a forest: in 5-fold scaffold cross-validation on the benchmark's train + val molecules
(`benchmarks/blend_cv.py`), a random forest on the descriptors and atom counts scored as well as
the GNN, and their averaged probabilities better than either: the two err on different molecules.
With radius-1 Morgan counts beside those features (`preprocess.fingerprint`), which the GNN does
not read, the forest alone and the average gained again.

Why tensor operations: the forest has to run inside the exported ONNX graph, so that ONNX
Runtime, TensorRT and Triton serve one model with the same inputs; TensorRT runs no ONNX-ML tree
operators. The fitted scikit-learn trees are flattened into one node table, and all trees are
walked at once, one level per step, a fixed number of steps (the deepest tree's depth):

    node [B, R] = root of each tree
    repeat depth times:
        feature, right = links[node]                               [B, R] each
        value = features[b, feature]                               [B, R]
        node = node + 1 if value <= thresholds[node] else right
    leaf value of node [B, R] -> mean over each target's trees     [B, T]

scikit-learn builds trees depth first, so a split's left child is the node after it (checked when
the forest is converted); a leaf's threshold is -inf and its right child itself, so a walk that
has reached its leaf stays there. A node's feature index and right child sit side by side in one
integer table, so that a level reads one row per tree for both (separate arrays cost another
scattered read). Indices stay integers: a TensorRT engine built with FP16 may store float
constants as halves, which hold whole numbers only up to 2048.

This module imports torch (training and export); serving runs the exported graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from mol_props.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the featurizer's module imports RDKit
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    from mol_props.config import ModelConfig
    from mol_props.featurize import MoleculeGraph

LOGGER = logging.getLogger(__name__)

MAX_NODES = 2**31 - 1  # TensorRT may run int64 indices as int32


@dataclass(frozen=True)
class ForestSettings:
    trees: int  # per target; 0 = no forest
    depth: int  # 0 = grow until the leaves are pure
    seed: int
    # Share of the features each split chooses from; 0 = scikit-learn's default (sqrt of their
    # number for classification, all for regression).
    max_features: float = 0.0
    # Classification only: "balanced_subsample" weights each tree's classes inversely to their
    # frequency in its bootstrap sample, "balanced" in the whole training set, "none" not at all.
    class_weight: str = "none"

    @classmethod
    def of_model(
        cls, model: ModelConfig, seed: int, trees: int | None = None, depth: int | None = None
    ) -> ForestSettings:
        """The forest member's settings in `model` (its size replaced where given: benchmarks
        compare sizes)."""
        return cls(
            trees=model.forest_trees if trees is None else trees,
            depth=model.forest_depth if depth is None else depth,
            seed=seed,
            max_features=model.forest_max_features,
            class_weight=model.forest_class_weight,
        )


def atom_counts(atom_features: Tensor, atom_mask: Tensor) -> Tensor:
    """Each atom column but the mass (the last, the only one not 0/1) summed over the real atoms
    [B, F - 1]: how many aromatic carbons, sp3 nitrogens, charged atoms... (the GNN reads them
    too, as log1p)."""
    return (atom_features[..., :-1] * atom_mask.unsqueeze(-1)).sum(dim=1)  # [B, F - 1]


def molecule_features(
    atom_features: Tensor, atom_mask: Tensor, descriptors: Tensor, descriptor_count: int
) -> Tensor:
    """What the forest reads [B, D' + F - 1]: the first `descriptor_count` descriptor columns
    (all of them, Morgan counts included, when `mol_props train` fits it; checkpoints from before
    the counts read only the named descriptors) and the atom counts."""
    counts = atom_counts(atom_features, atom_mask)  # [B, F - 1]
    return torch.cat([descriptors[:, :descriptor_count], counts], dim=-1)


def molecule_features_numpy(
    atom_features: list[np.ndarray], descriptors: list[np.ndarray], descriptor_count: int
) -> np.ndarray:
    """`molecule_features` for unpadded molecules, [M, D' + F - 1] float32 (for fitting)."""
    counts = np.stack([atoms[:, :-1].sum(axis=0) for atoms in atom_features])  # [M, F - 1]
    plain = np.stack([values[:descriptor_count] for values in descriptors])  # [M, D']
    return np.hstack([plain, counts]).astype(np.float32)


def forest_features(
    graphs: Sequence[MoleculeGraph], descriptor_count: int | None = None
) -> np.ndarray:
    """What `mol_props train` fits the forest member on: the first `descriptor_count` descriptor
    columns (`Featurizer.forest_descriptor_count`: all but the kernel member's counts, the
    fingerprint's included; None: all) and the atom counts, [M, D' + F - 1] float32."""
    return molecule_features_numpy(
        [graph.atom_features for graph in graphs],
        [graph.descriptors for graph in graphs],
        graphs[0].descriptors.shape[0] if descriptor_count is None else descriptor_count,
    )


class TreeEnsemble(nn.Module):
    """A fitted forest as buffers; forward(features [B, K]) -> [B, T]: probabilities of the
    positive class (classification) or the mean prediction (regression, in the units it was
    fitted on)."""

    def __init__(
        self,
        links: Tensor,
        thresholds: Tensor,
        leaf_values: Tensor,
        roots: Tensor,
        depth: int,
        num_targets: int,
        descriptor_count: int,
    ) -> None:
        super().__init__()
        self.register_buffer("links", links)  # [Nn, 2] int32: feature, right child
        self.register_buffer("thresholds", thresholds)  # [Nn] float32 (-inf for leaves)
        self.register_buffer("leaf_values", leaf_values)  # [Nn] float32 (0 for splits)
        self.register_buffer("roots", roots)  # [R] int64, R = num_targets x trees per target
        self.depth = depth
        self.num_targets = num_targets
        self.descriptor_count = descriptor_count
        # Mean over each target's trees as a MatMul [R, T]: a Reshape to [B, T, trees] would
        # leave the output's target axis unknown to ONNX shape inference, and Triton needs it.
        trees = roots.numel() // num_targets
        average = torch.zeros(roots.numel(), num_targets)
        for k in range(num_targets):
            average[k * trees : (k + 1) * trees, k] = 1.0 / trees
        self.register_buffer("tree_average", average, persistent=False)

    @property
    def trees(self) -> int:
        """Trees per target."""
        return self.roots.numel() // self.num_targets

    def forward(self, features: Tensor) -> Tensor:
        node = self.roots.unsqueeze(0).expand(features.shape[0], -1)  # [B, R]
        for _ in range(self.depth):
            link = self.links[node].long()  # [B, R, 2] (int32 table: half the memory to read)
            value = torch.gather(features, 1, link[..., 0])  # [B, R] each tree's split feature
            node = torch.where(value <= self.thresholds[node], node + 1, link[..., 1])  # [B, R]
        leaves = self.leaf_values[node]  # [B, R]
        return leaves @ self.tree_average  # [B, R] @ [R, T] -> [B, T]

    def molecule_forward(
        self, atom_features: Tensor, atom_mask: Tensor, descriptors: Tensor
    ) -> Tensor:
        """forward() on the model's own inputs [B, N, F], [B, N], [B, D] -> [B, T]."""
        features = molecule_features(atom_features, atom_mask, descriptors, self.descriptor_count)
        return self(features)

    def state(self) -> dict[str, object]:
        """Plain types and tensors for a checkpoint (torch.load(weights_only=True) reads them)."""
        return {
            "links": self.links,
            "thresholds": self.thresholds,
            "leaf_values": self.leaf_values,
            "roots": self.roots,
            "depth": self.depth,
            "num_targets": self.num_targets,
            "descriptor_count": self.descriptor_count,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> TreeEnsemble:
        return cls(**state)


def new_forest(
    task: str, settings: ForestSettings
) -> RandomForestClassifier | RandomForestRegressor:
    """The scikit-learn forest `fit_forest` fits for one target (benchmarks cross-validate the
    same one)."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    shared = {
        "n_estimators": settings.trees,
        "max_depth": settings.depth or None,
        "n_jobs": -1,
        "random_state": settings.seed,
    }
    if task == "classification":
        class_weight = None if settings.class_weight == "none" else settings.class_weight
        return RandomForestClassifier(
            max_features=settings.max_features or "sqrt", class_weight=class_weight, **shared
        )
    return RandomForestRegressor(max_features=settings.max_features or 1.0, **shared)


def fit_forest(
    features: np.ndarray,
    targets: np.ndarray,
    task: str,
    settings: ForestSettings,
    descriptor_count: int,
) -> TreeEnsemble:
    """A random forest per target on the rows where that target is labelled. `features`
    [M, D' + F - 1] from `molecule_features_numpy` (D' = `descriptor_count`); `targets` [M, T]
    (NaN = missing; for regression, in the units the model's other member predicts)."""
    if settings.trees < 1:
        raise ConfigError(f"model.forest_trees={settings.trees}: fit_forest needs at least 1")
    started = time.perf_counter()
    estimators, leaf_columns = [], []
    for k in range(targets.shape[1]):
        labelled = ~np.isnan(targets[:, k])
        if not labelled.any():
            raise ConfigError(f"target {k}: no labelled training molecule to fit the forest on")
        forest = new_forest(task, settings)
        forest.fit(features[labelled], targets[labelled, k])
        estimators += forest.estimators_
        # Which class column of a leaf's class fractions is the positive class (none when every
        # training label of this target is negative).
        positive: int | None = -1
        if task == "classification":
            classes = list(forest.classes_)
            positive = classes.index(1.0) if 1.0 in classes else None
        leaf_columns += [positive] * len(forest.estimators_)
    ensemble = flatten_trees(estimators, leaf_columns, targets.shape[1], descriptor_count, task)
    LOGGER.info(
        "forest: %d trees per target (depth %s, %d nodes) fitted on %d molecules in %.1f s",
        settings.trees,
        ensemble.depth,
        ensemble.thresholds.shape[0],
        len(features),
        time.perf_counter() - started,
    )
    return ensemble


def flatten_trees(
    estimators: list,
    leaf_columns: list[int | None],
    num_targets: int,
    descriptor_count: int,
    task: str,
) -> TreeEnsemble:
    """scikit-learn decision trees -> one TreeEnsemble (the node table of the module docstring).
    `leaf_columns`: per tree, the class column holding the positive class (None: the positive
    class never occurred, probability 0), or -1 for a regression tree."""
    links, thresholds, leaf_values, roots = [], [], [], []
    offset, depth = 0, 0
    for tree, column in zip(estimators, leaf_columns):
        structure = tree.tree_
        size = structure.node_count
        is_leaf = structure.children_left < 0  # [n]
        splits = np.flatnonzero(~is_leaf)
        if not (structure.children_left[splits] == splits + 1).all():
            raise ValueError("a tree whose left children do not follow their parents")
        ids = np.arange(size) + offset
        link = np.empty((size, 2), dtype=np.int32)
        link[:, 0] = np.where(is_leaf, 0, structure.feature)
        link[:, 1] = np.where(is_leaf, ids, structure.children_right + offset)
        links.append(link)
        thresholds.append(np.where(is_leaf, -np.inf, float32_at_most(structure.threshold)))
        leaf_values.append(np.where(is_leaf, _leaf_value(structure.value, column, task), 0.0))
        roots.append(offset)
        offset += size
        depth = max(depth, int(structure.max_depth))
    if offset >= MAX_NODES:
        raise ConfigError(
            f"a forest of {offset:,} nodes: at most {MAX_NODES:,}; use fewer trees or a "
            "smaller model.forest_depth"
        )
    return TreeEnsemble(
        links=torch.from_numpy(np.concatenate(links)),
        thresholds=torch.from_numpy(np.concatenate(thresholds).astype(np.float32)),
        leaf_values=torch.from_numpy(np.concatenate(leaf_values).astype(np.float32)),
        roots=torch.tensor(roots, dtype=torch.int64),
        depth=depth,
        num_targets=num_targets,
        descriptor_count=descriptor_count,
    )


def float32_at_most(thresholds: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 threshold. scikit-learn compares float32 features
    with float64 thresholds; against this one a float32 comparison sends every float32 value
    the same way (plain rounding could round up past a value that belongs on the right)."""
    rounded = thresholds.astype(np.float32)
    too_high = rounded.astype(np.float64) > thresholds
    rounded[too_high] = np.nextafter(rounded[too_high], np.float32(-np.inf))
    return rounded.astype(np.float64)


def _leaf_value(value: np.ndarray, column: int | None, task: str) -> np.ndarray:
    """[n] what each node of a tree predicts. `value` [n, outputs=1, classes or 1]."""
    if task != "classification":
        return value[:, 0, 0]
    if column is None:
        return np.zeros(len(value))
    fractions = value[:, 0, :] / value[:, 0, :].sum(axis=1, keepdims=True)  # counts or fractions
    return fractions[:, column]
