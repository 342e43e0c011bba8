"""The ChemNet member: an RBF support vector machine on a pretrained SMILES network's features.

Why: the GNN and the forest learn only from B3DB's ~7,000 molecules, and both do worst on
molecules whose scaffold is unlike any in training, which the scaffold-split test is full of.
ChemNet (Preuer et al., 2018: the network behind the Frechet ChemNet Distance) learned to predict
~6,000 bioassays from SMILES; its second LSTM describes a molecule in terms that carry over to new
scaffolds. In 5-fold scaffold cross-validation on the benchmark's train + val molecules (seeds
0 / 1), an SVM (C 2) on the largest value each of its 512 outputs takes over the steps
(`readout="max"`) scored ROC-AUC 0.857 / 0.860 on the 355 molecules with a scaffold of their own,
against 0.828 / 0.802 for the GNN, 0.827 / 0.830 for the forest, and 0.843 / 0.836 for an SVM
(C 1) on the LSTM's last output (`readout="last"`, what the Frechet ChemNet Distance uses).
docs/experiments.md, "The ChemNet member".

    token ids [B, L] --one-hot / 35--> [B, 35, L]
        -> 2 x (same-padded Conv1d, kernel 4, stride 2; SELU)      [B, 32, L/4]
        -> LSTM 32 -> 128 over the steps from last to first         [B, L/4, 128]
        -> LSTM 128 -> 512 over those outputs from last to first,
           i.e. the SMILES' steps first, then the padding's        [B, L/4, 512]
        -> max over the steps (or the last output)                 [B, 512]
        -> standardized -> RBF kernel to the support vectors       [B, S]
        -> @ coefficients + intercepts: the margin                 [B, T]
        -> x slope + offset (Platt scaling) -> sigmoid             [B, T]

ChemNet's weights ship in the fcd_torch package (MIT licence); training reads them once and the
checkpoint keeps them. The reversals are ChemNet's own (Keras LSTMs that read backwards); the
one-hot scaling by 1/35 is how it was trained. Everything is Conv1d, LSTM, MatMul, ReduceMax and
elementwise ops, so the member runs inside the exported ONNX graph. This module imports torch
(training and export); serving runs the exported graph.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from mol_props.config import CHOICES
from mol_props.errors import ConfigError
from mol_props.featurize import CHEMNET_VOCABULARY

if TYPE_CHECKING:  # annotations only: scikit-learn is imported when a member is fitted
    from sklearn.svm import SVC

LOGGER = logging.getLogger(__name__)

CHEMNET_FILE = "ChemNet_v0.13_pretrained.pt"
FEATURE_SIZE = 512  # ChemNet's last LSTM
_KERNEL, _STRIDE = 4, 2  # both convolutions
# ChemNet's layers as fcd_torch stores them: (type, weight shapes).
_LAYERS = (
    ("Conv1d", {"weight": (32, 35, 4)}),
    ("Conv1d", {"weight": (32, 32, 4)}),
    ("LSTM", {"weight_ih_l0": (512, 32), "weight_hh_l0": (512, 128)}),
    ("LSTM", {"weight_ih_l0": (2048, 128), "weight_hh_l0": (2048, 512)}),
)
_ENCODER_PARTS = ("first_convolution", "second_convolution", "first_lstm", "second_lstm")
# How the second LSTM's outputs [B, S, 512] become a molecule's features: "last" is the output
# after the last step, as the Frechet ChemNet Distance reads it; "max" the largest value of each
# output over all steps (the padding's included), which the SVM ranks new scaffolds better with.
READOUTS = CHOICES[("model", "chemnet_readout")]


@dataclass(frozen=True)
class Calibration:
    """How the member's margins become probabilities (platt_scaling): `folds` scaffold folds
    over the fitted molecules, whose scaffolds [M] are `groups`."""

    folds: int
    groups: np.ndarray


def chemnet_weights_path() -> Path:
    """ChemNet's weights in the installed fcd_torch package (found without importing it)."""
    spec = importlib.util.find_spec("fcd_torch")
    path = Path(spec.origin).parent / CHEMNET_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"model.chemnet_weight: ChemNet's weights ({CHEMNET_FILE}) come with the fcd_torch "
            "package, which is not installed here; run `uv sync`"
        )
    return path


def same_padding(length: int) -> tuple[int, int]:
    """Keras "same" padding (left, right) of a kernel-4, stride-2 convolution over `length`
    steps: the output has ceil(length / 2) steps."""
    remainder = length % _STRIDE
    total = max(_KERNEL - (_STRIDE if remainder == 0 else remainder), 0)
    return total // 2, total - total // 2


def _pad_steps(steps: Tensor, padding: tuple[int, int]) -> Tensor:
    """Zero steps before and after [B, C, L] -> [B, C, left + L + right]. Concatenated rather
    than nn.functional.pad, whose ONNX export reverses the pads with a step -1 Slice that the
    exporter cannot constant-fold (and warns about)."""
    left, right = padding
    parts = [steps]
    if left:
        parts.insert(0, torch.zeros_like(steps[:, :, :left]))
    if right:
        parts.append(torch.zeros_like(steps[:, :, :right]))
    return torch.cat(parts, dim=2)


class ChemNetEncoder(nn.Module):
    """ChemNet up to its 512 features: forward(token ids [B, L]) -> [B, 512], read out of the
    second LSTM's outputs as `readout` says (READOUTS)."""

    def __init__(self, length: int, readout: str) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ConfigError(f"model.chemnet_readout={readout!r}: one of {READOUTS}")
        self.readout = readout
        self.length = length
        vocabulary = len(CHEMNET_VOCABULARY)
        self.first_convolution = nn.Conv1d(vocabulary, 32, _KERNEL, stride=_STRIDE, bias=False)
        self.second_convolution = nn.Conv1d(32, 32, _KERNEL, stride=_STRIDE, bias=False)
        self.first_lstm = nn.LSTM(32, 128, batch_first=True)
        self.second_lstm = nn.LSTM(128, FEATURE_SIZE, batch_first=True)
        # Paddings from the fixed token count: constants in the exported graph.
        self.first_padding = same_padding(length)
        self.second_padding = same_padding((length + 1) // 2)
        self.register_buffer(
            "token_ids", torch.arange(vocabulary, dtype=torch.float32), persistent=False
        )
        # The LSTMs' steps in reverse, as indices: a Gather in ONNX (torch.flip would export as
        # a Slice with step -1, which the exporter cannot constant-fold, and says so).
        steps = (length + 3) // 4  # two stride-2 convolutions with "same" padding
        self.register_buffer("reversed_steps", torch.arange(steps - 1, -1, -1), persistent=False)

    @classmethod
    def pretrained(cls, length: int, readout: str) -> ChemNetEncoder:
        """The encoder with ChemNet's trained weights (from fcd_torch's file)."""
        layers = torch.load(chemnet_weights_path(), map_location="cpu", weights_only=True)
        found = [
            (kind, {name: tuple(value.shape) for name, value in state.items()})
            for kind, (state, _, _) in layers
        ]
        for (kind, shapes), (expected_kind, expected) in zip(found, _LAYERS, strict=True):
            if kind != expected_kind or any(shapes.get(k) != v for k, v in expected.items()):
                raise ConfigError(f"{CHEMNET_FILE}: unexpected layers {found}")
        encoder = cls(length, readout)
        for part, (_, (state, _, _)) in zip(_ENCODER_PARTS, layers):
            getattr(encoder, part).load_state_dict(state)
        return encoder.eval()

    def forward(self, token_ids: Tensor) -> Tensor:
        one_hot = (token_ids.unsqueeze(-1) == self.token_ids).to(torch.float32)  # [B, L, 35]
        steps = one_hot.transpose(1, 2) / len(CHEMNET_VOCABULARY)  # [B, 35, L]
        steps = _pad_steps(steps, self.first_padding)  # [B, 35, L + 2]
        steps = nn.functional.selu(self.first_convolution(steps))  # [B, 32, L/2]
        steps = _pad_steps(steps, self.second_padding)
        steps = nn.functional.selu(self.second_convolution(steps))  # [B, 32, S = L/4]
        steps = steps.transpose(1, 2)  # [B, S, 32]
        steps, _ = self.first_lstm(steps[:, self.reversed_steps])  # [B, S, 128], reversed
        steps, _ = self.second_lstm(steps[:, self.reversed_steps])  # [B, S, 512]
        if self.readout == "max":
            return steps.max(dim=1).values  # [B, 512]
        return steps[:, -1]  # [B, 512]


class ChemNetSVM(nn.Module):
    """A fitted ChemNet member; forward(token ids [B, L]) -> probabilities [B, T]: the sigmoid of
    each target's SVM margin, scaled by `margin_slope` and shifted by `margin_offset` (Platt
    scaling, fitted on out-of-fold margins; 1 and 0 leave the plain sigmoid of the margin, as
    members saved before the scaling had). The margin ranks; the scaling makes it a probability
    on the other members' scale for the average."""

    def __init__(
        self,
        encoder: dict[str, Tensor],
        token_start: int,
        token_count: int,
        feature_mean: Tensor,
        feature_scale: Tensor,
        support: Tensor,
        coefficients: Tensor,
        intercepts: Tensor,
        gamma: float,
        readout: str,
        margin_slope: Tensor | None = None,
        margin_offset: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.encoder = ChemNetEncoder(token_count, readout)
        self.encoder.load_state_dict(encoder)
        self.token_start = token_start  # the token ids' first column among the descriptors
        self.token_count = token_count
        self.register_buffer("feature_mean", feature_mean)  # [512]
        self.register_buffer("feature_scale", feature_scale)  # [512]
        self.register_buffer("support", support)  # [S, 512] standardized support vectors
        self.register_buffer("coefficients", coefficients)  # [S, T] dual coefficients
        self.register_buffer("intercepts", intercepts)  # [T]
        targets = intercepts.shape[0]
        slope = torch.ones(targets) if margin_slope is None else margin_slope
        offset = torch.zeros(targets) if margin_offset is None else margin_offset
        self.register_buffer("margin_slope", slope)  # [T]
        self.register_buffer("margin_offset", offset)  # [T]
        self.register_buffer("support_squares", (support * support).sum(dim=1), persistent=False)
        self.gamma = gamma

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.classify(self.encoder(token_ids))

    def classify(self, features: Tensor) -> Tensor:
        """Probabilities [B, T] from ChemNet features [B, 512] (benchmarks/chemnet_cv.py
        computes the features once for all its folds)."""
        features = (features - self.feature_mean) / self.feature_scale  # [B, 512]
        squares = (features * features).sum(dim=1, keepdim=True)  # [B, 1]
        distances = squares + self.support_squares - 2.0 * features @ self.support.T  # [B, S]
        kernel = torch.exp(-self.gamma * distances.clamp(min=0.0))  # [B, S]
        margins = kernel @ self.coefficients + self.intercepts  # [B, T]
        return torch.sigmoid(margins * self.margin_slope + self.margin_offset)  # [B, T]

    def molecule_forward(
        self, atom_features: Tensor, atom_mask: Tensor, descriptors: Tensor
    ) -> Tensor:
        """forward() on the model's own inputs -> [B, T]: it reads only the token-id columns of
        the descriptors [B, D]."""
        return self(descriptors[:, self.token_start : self.token_start + self.token_count])

    def state(self) -> dict[str, object]:
        """Plain types and tensors for a checkpoint (torch.load(weights_only=True) reads them)."""
        return {
            "encoder": self.encoder.state_dict(),
            "token_start": self.token_start,
            "token_count": self.token_count,
            "feature_mean": self.feature_mean,
            "feature_scale": self.feature_scale,
            "support": self.support,
            "coefficients": self.coefficients,
            "intercepts": self.intercepts,
            "gamma": self.gamma,
            "readout": self.encoder.readout,
            "margin_slope": self.margin_slope,
            "margin_offset": self.margin_offset,
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> ChemNetSVM:
        # Checkpoints from before model.chemnet_readout read the last step; those from before
        # the Platt scaling have no slope and offset, and keep the plain sigmoid.
        return cls(**{"readout": "last", **state})


@torch.no_grad()
def chemnet_features(encoder: ChemNetEncoder, token_ids: np.ndarray) -> np.ndarray:
    """[M, 512] float64 ChemNet features of token ids [M, L], a few hundred molecules at a time."""
    batches = [
        encoder(torch.from_numpy(token_ids[start : start + 256]))
        for start in range(0, len(token_ids), 256)
    ]
    return torch.cat(batches).double().numpy()


def fit_chemnet_svm(
    token_ids: np.ndarray,
    targets: np.ndarray,
    token_start: int,
    svm_c: float,
    readout: str,
    calibration: Calibration | None = None,
) -> ChemNetSVM:
    """The ChemNet member fitted on token ids [M, L] float32 (the descriptor columns from
    `token_start`): pretrained ChemNet's features, then fit_svm_on_features."""
    started = time.perf_counter()
    encoder = ChemNetEncoder.pretrained(token_ids.shape[1], readout)
    features = chemnet_features(encoder, token_ids.astype(np.float32))  # [M, 512]
    member = fit_svm_on_features(encoder, features, targets, token_start, svm_c, calibration)
    scaling = "no Platt scaling"
    if calibration is not None:
        pairs = zip(member.margin_slope.tolist(), member.margin_offset.tolist())
        scaling = f"Platt scaling from {calibration.folds} scaffold folds: slope, offset " + (
            ", ".join(f"{slope:.2f}, {offset:+.2f}" for slope, offset in pairs)
        )
    LOGGER.info(
        "chemnet: %d molecules, %d support vectors (C %g, %s read-out; %s) in %.1f s",
        len(token_ids),
        len(member.support),
        svm_c,
        readout,
        scaling,
        time.perf_counter() - started,
    )
    return member


def fit_svm_on_features(
    encoder: ChemNetEncoder,
    features: np.ndarray,
    targets: np.ndarray,
    token_start: int,
    svm_c: float,
    calibration: Calibration | None = None,
) -> ChemNetSVM:
    """An RBF SVM per target (classes weighted inversely to their frequency) on the standardized
    `features` [M, 512] (float64, from `encoder`) of the rows labelled for it. `targets` [M, T]
    0/1 labels, NaN = missing. One kernel width for all targets: scikit-learn's "scale" over all
    rows, 1 / (512 x the features' variance). The support is the union of every target's support
    vectors; a molecule keeps coefficient 0 for a target whose support it is not in. With
    `calibration`, each target's margin also gets a Platt scaling (platt_scaling); without it,
    the member gives the plain sigmoid of the margin."""
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale == 0] = 1.0  # a feature constant over training: (x - mean) stays 0 for it
    standardized = (features - mean) / scale
    gamma = 1.0 / (FEATURE_SIZE * standardized.var())
    coefficients = np.zeros(targets.shape, dtype=np.float64)  # [M, T]
    intercepts = np.zeros(targets.shape[1], dtype=np.float64)
    slopes = np.ones(targets.shape[1], dtype=np.float64)
    offsets = np.zeros(targets.shape[1], dtype=np.float64)
    for k in range(targets.shape[1]):
        labelled = np.flatnonzero(~np.isnan(targets[:, k]))
        labels = targets[labelled, k]
        if np.unique(labels).size < 2:
            raise ConfigError(
                f"target {k}: its training labels are all one class; the ChemNet member "
                "(model.chemnet_weight) needs both"
            )
        svm = _new_svm(svm_c, gamma).fit(standardized[labelled], labels)
        # The margin is positive for classes_[1], the label 1.
        coefficients[labelled[svm.support_], k] = svm.dual_coef_[0]
        intercepts[k] = svm.intercept_[0]
        if calibration is not None:
            slopes[k], offsets[k] = platt_scaling(
                standardized[labelled],
                labels,
                calibration.groups[labelled],
                calibration.folds,
                svm_c,
                gamma,
            )
    in_support = np.flatnonzero(np.any(coefficients != 0, axis=1))
    return ChemNetSVM(
        encoder=encoder.state_dict(),
        token_start=token_start,
        token_count=encoder.length,
        feature_mean=torch.from_numpy(mean.astype(np.float32)),
        feature_scale=torch.from_numpy(scale.astype(np.float32)),
        support=torch.from_numpy(standardized[in_support].astype(np.float32)),
        coefficients=torch.from_numpy(coefficients[in_support].astype(np.float32)),
        intercepts=torch.from_numpy(intercepts.astype(np.float32)),
        gamma=float(gamma),
        readout=encoder.readout,
        margin_slope=torch.from_numpy(slopes.astype(np.float32)),
        margin_offset=torch.from_numpy(offsets.astype(np.float32)),
    )


def _new_svm(svm_c: float, gamma: float) -> SVC:
    """The member's unfitted SVM: RBF kernel, classes weighted inversely to their frequency. The
    Platt scaling's fold SVMs are this one too, so their margins are on the served one's scale."""
    from sklearn.svm import SVC

    return SVC(C=svm_c, kernel="rbf", gamma=gamma, class_weight="balanced")


def platt_scaling(
    standardized: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    folds: int,
    svm_c: float,
    gamma: float,
) -> tuple[float, float]:
    """(slope, offset) such that sigmoid(slope x margin + offset) is a probability: a logistic
    regression of the labels [M] on out-of-fold margins, each from the same SVM fitted on the
    other folds. The folds keep each group (a molecule's scaffold) whole, so every margin comes
    from an SVM that saw none of its molecule's scaffold, as a served molecule from a new
    scaffold is scored (scikit-learn's CalibratedClassifierCV would split molecules at random)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    if (scaffold_count := np.unique(groups).size) < folds:
        raise ConfigError(
            f"model.chemnet_calibration_folds={folds}: only {scaffold_count} scaffolds to "
            "split; use fewer folds, or 0 for no calibration"
        )
    margins = np.zeros(len(labels))  # [M] out of fold
    for fit, held in GroupKFold(n_splits=folds).split(standardized, labels, groups):
        if np.unique(labels[fit]).size < 2:
            raise ConfigError(
                f"model.chemnet_calibration_folds={folds}: a fold leaves one class only to fit "
                "on; use fewer folds, or 0 for no calibration"
            )
        svm = _new_svm(svm_c, gamma)
        margins[held] = svm.fit(standardized[fit], labels[fit]).decision_function(
            standardized[held]
        )
    logistic = LogisticRegression(C=np.inf).fit(margins[:, None], labels)
    return float(logistic.coef_[0, 0]), float(logistic.intercept_[0])
