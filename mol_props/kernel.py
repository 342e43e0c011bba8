"""The kernel member: kernel ridge regression on the Tanimoto similarity of Morgan counts.

Why: on small tables, a molecule's nearest measured neighbours say much about it. In 5-fold
scaffold cross-validation on the B3DB regression benchmark's 952 train + val molecules (pooled
RMSE, seeds 0 / 1), the forest alone scored 0.5165 / 0.5367, this kernel on 1024 radius-2 counts
alone 0.565 / 0.575, and 0.7 x forest + 0.3 x kernel 0.5098 / 0.5279: the two err differently.

The similarity of counts a and b is the Tanimoto coefficient for real vectors,
a.b / (|a|^2 + |b|^2 - a.b): 1 for equal counts, 0 for no shared environment. Fitting solves
(K + ridge I) c = y - mean(y) over the training molecules; a prediction is
similarities-to-the-training-molecules @ c + mean(y). Everything is a MatMul and elementwise
ops, so it runs inside the exported ONNX graph (TensorRT and Triton included), as the forest does.

This module imports torch (training and export); serving runs the exported graph.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import Tensor, nn

from mol_props.errors import ConfigError

LOGGER = logging.getLogger(__name__)

# The fit holds a few [M, M] float64 matrices (~3 GB each at 20,000 molecules), and the served
# model every training molecule's counts: beyond this, the member is the wrong tool.
MAX_KERNEL_MOLECULES = 20_000


def tanimoto(counts: np.ndarray, support: np.ndarray) -> np.ndarray:
    """[M, S] similarities of each row of `counts` [M, K] to each row of `support` [S, K]."""
    dot = counts @ support.T  # [M, S]
    squares = (counts * counts).sum(axis=1)[:, None] + (support * support).sum(axis=1)[None, :]
    return dot / np.maximum(squares - dot, 1e-9)  # no shared or any count: 0, not 0 / 0


class TanimotoKernelRidge(nn.Module):
    """A fitted kernel member as buffers; forward(counts [B, K]) -> [B, T]: a probability
    (classification, clipped to [0, 1]) or a value in the units it was fitted on (regression)."""

    def __init__(
        self, support: Tensor, coefficients: Tensor, offsets: Tensor, classification: bool
    ) -> None:
        super().__init__()
        self.register_buffer("support", support)  # [S, K] float32 training molecules' counts
        self.register_buffer("coefficients", coefficients)  # [S, T] float32
        self.register_buffer("offsets", offsets)  # [T] float32: each target's training mean
        self.register_buffer("support_squares", (support * support).sum(dim=1), persistent=False)
        self.classification = classification

    @property
    def count_size(self) -> int:
        return self.support.shape[1]

    def forward(self, counts: Tensor) -> Tensor:
        dot = counts @ self.support.T  # [B, K] @ [K, S] -> [B, S]
        squares = (counts * counts).sum(dim=1, keepdim=True) + self.support_squares  # [B, S]
        similarity = dot / (squares - dot).clamp(min=1e-9)  # [B, S]
        values = similarity @ self.coefficients + self.offsets  # [B, S] @ [S, T] -> [B, T]
        return values.clamp(0.0, 1.0) if self.classification else values

    def molecule_forward(
        self, atom_features: Tensor, atom_mask: Tensor, descriptors: Tensor
    ) -> Tensor:
        """forward() on the model's own inputs -> [B, T], as the forest's: it reads only the last
        K columns of the descriptors [B, D], the kernel fingerprint's counts."""
        return self(descriptors[:, descriptors.shape[1] - self.count_size :])

    def state(self) -> dict[str, object]:
        """Plain types and tensors for a checkpoint (torch.load(weights_only=True) reads them)."""
        return {
            "support": self.support,
            "coefficients": self.coefficients,
            "offsets": self.offsets,
            "classification": self.classification,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> TanimotoKernelRidge:
        return cls(**state)


def check_kernel_size(molecules: int) -> None:
    """Refuses a training set the kernel member cannot hold (`mol_props train` asks before
    training the network, not after)."""
    if molecules > MAX_KERNEL_MOLECULES:
        raise ConfigError(
            f"model.kernel_weight: the kernel member keeps every training molecule, and "
            f"{molecules:,} would need ~{3 * 8 * molecules**2 / 1e9:.0f} GB to fit "
            f"(at most {MAX_KERNEL_MOLECULES:,}); set model.kernel_weight=0 for this table"
        )


def fit_kernel(
    counts: np.ndarray, targets: np.ndarray, task: str, ridge: float
) -> TanimotoKernelRidge:
    """Kernel ridge regression per target on the rows where it is labelled (0/1 labels for
    classification). `counts` [M, K]; `targets` [M, T] (NaN = missing; for regression, in the
    units the model's other members predict). A molecule keeps coefficient 0 for a target it has
    no label for, so one support set serves every target."""
    check_kernel_size(len(counts))
    started = time.perf_counter()
    support = counts.astype(np.float64)
    similarity = tanimoto(support, support)  # [M, M]
    coefficients = np.zeros(targets.shape, dtype=np.float64)  # [M, T]
    offsets = np.zeros(targets.shape[1], dtype=np.float64)
    for k in range(targets.shape[1]):
        labelled = np.flatnonzero(~np.isnan(targets[:, k]))
        if not labelled.size:
            raise ConfigError(f"target {k}: no labelled training molecule to fit the kernel on")
        values = targets[labelled, k]
        offsets[k] = values.mean()
        system = similarity[np.ix_(labelled, labelled)] + ridge * np.eye(len(labelled))
        # The kernel is positive semi-definite and the ridge makes it definite: Cholesky would
        # do; solve() is as fast at these sizes and says so if something is off.
        coefficients[labelled, k] = np.linalg.solve(system, values - offsets[k])
    LOGGER.info(
        "kernel: %d molecules x %d counts (ridge %g) fitted in %.1f s",
        len(support),
        support.shape[1],
        ridge,
        time.perf_counter() - started,
    )
    return TanimotoKernelRidge(
        support=torch.from_numpy(counts.astype(np.float32)),
        coefficients=torch.from_numpy(coefficients.astype(np.float32)),
        offsets=torch.from_numpy(offsets.astype(np.float32)),
        classification=task == "classification",
    )
