"""The dense GNN: padded molecules in, one value per target out (torch + torch_geometric only).

    atom_features [B, N, F] --embed--> h [B, N, H]
        -> num_layers x (DenseGINConv | DenseGraphConv, LayerNorm, ReLU, dropout, residual)
        -> masked mean pool                                     [B, H]
    [standardized descriptors [B, D'], log1p(atom counts) [B, F-1]] --MLP--> [B, Hd]
    concat -> MLP head -> logits / standardized values          [B, T]   (the GNN member)

D' is the descriptor vector without the Morgan counts at its end (either fingerprint's).

Atom counts (`model.atom_counts`) are each atom column but the mass summed over the real atoms:
how many aromatic carbons, sp3 nitrogens, charged atoms... Mean pooling describes the typical atom
and loses these amounts; computed inside the model, they cost the featurizer nothing.

Morgan counts at the end of the descriptor vector (`preprocess.fingerprint.size`) are not the
GNN's: the forest reads them, and with `model.fingerprint_hidden_dim` > 0 a second member, an MLP
on the standardized descriptors and log1p(counts), gives its own [B, T]; the model's output is
then the weighted mean of the two. Each member is trained on its own loss (as two separately
trained models would be), because their errors differ: on the benchmark's validation split the
pair beat either alone, while the counts fed into the GNN's descriptor MLP made it overfit within
a few epochs.

The forest member (`model.forest_trees`, mol_props/forest.py) and the kernel member
(`model.kernel_weight`, mol_props/kernel.py) are not trained by gradient: they are fitted after
the network and join it in PredictionModel, the exported model, which averages the members'
probabilities (or standardized values), weighted. The kernel member reads the kernel
fingerprint's counts (`preprocess.kernel_fingerprint`), the very last descriptor columns, which
neither the network nor the forest reads. The ChemNet member (`model.chemnet_weight`,
mol_props/chemnet.py) reads the SMILES token ids just before them, which no other member reads.

Every op is a MatMul, an elementwise op or a ReduceSum (the forest adds Gather, LessOrEqual and
Where), so the graph exports to plain ONNX and TensorRT. Padded atoms contribute nothing: every
layer's output is multiplied by the mask, the adjacency has no edges to them, LayerNorm works per
atom, and pooling divides by the real atom count (the forest's atom counts too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch_geometric.nn.dense import DenseGINConv, DenseGraphConv

from mol_props.chemnet import ChemNetSVM
from mol_props.config import ModelConfig
from mol_props.errors import ConfigError
from mol_props.forest import TreeEnsemble, atom_counts
from mol_props.kernel import TanimotoKernelRidge


class AtomwiseMLP(nn.Module):
    """Layers applied to every atom, run on the atoms as one [B*N, C] matrix.

    The same arithmetic as on [B, N, C], but ONNX Runtime fuses a 2-D MatMul with its bias Add
    (and a following ReLU) into one Gemm kernel, which it does not do for 3-D MatMuls: in the
    served 128-atom model those separate Add/ReLU passes took a quarter of the time.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, atoms: Tensor) -> Tensor:
        flat = atoms.reshape(-1, atoms.shape[-1])  # [B*N, C]
        return self.layers(flat).reshape(*atoms.shape[:-1], -1)  # [B, N, C']


def _convolution(kind: str, hidden_dim: int) -> nn.Module:
    if kind == "gin":
        mlp = AtomwiseMLP(
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        return DenseGINConv(mlp, train_eps=True)
    if kind == "graph":
        # Sum aggregation: plain MatMul in ONNX ("max" would export to ScatterND).
        return DenseGraphConv(hidden_dim, hidden_dim, aggr="add")
    raise ConfigError(f"unknown model.conv={kind!r}: gin | graph")


class FingerprintMLP(nn.Module):
    """The fingerprint member: [standardized descriptors, log1p(Morgan counts)] -> [B, T]."""

    def __init__(self, input_size: int, num_targets: int, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.fingerprint_hidden_dim
        self.layers = nn.Sequential(
            nn.Dropout(config.fingerprint_dropout),  # on the input: counts are sparse and many
            nn.Linear(input_size, hidden),
            nn.ReLU(),
            nn.Dropout(config.fingerprint_dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(config.fingerprint_dropout),
            nn.Linear(hidden, num_targets),
        )

    def forward(self, scaled_descriptors: Tensor, counts: Tensor) -> Tensor:
        # log1p: a count of 20 should not weigh twenty times a count of 1.
        return self.layers(torch.cat([scaled_descriptors, torch.log1p(counts)], dim=-1))


class MoleculeGNN(nn.Module):
    """Dense GNN + descriptor MLP (+ fingerprint member); raw outputs [B, T] (logits or
    standardized values). Of the D descriptor columns, the last `kernel_fingerprint_size` are the
    kernel member's Morgan counts and the `smiles_token_count` before them the ChemNet member's
    token ids, which the network ignores; the `fingerprint_size` before those are the
    fingerprint's."""

    def __init__(
        self,
        atom_feature_size: int,
        descriptor_size: int,
        num_targets: int,
        config: ModelConfig,
        fingerprint_size: int,
        kernel_fingerprint_size: int = 0,
        smiles_token_count: int = 0,
    ) -> None:
        super().__init__()
        hidden = config.hidden_dim
        self.atom_embedding = AtomwiseMLP(nn.Linear(atom_feature_size, hidden), nn.ReLU())
        self.convolutions = nn.ModuleList(
            [_convolution(config.conv, hidden) for _ in range(config.num_layers)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(config.num_layers)])
        self.dropout = nn.Dropout(config.dropout)
        self.use_fingerprint = config.fingerprint_hidden_dim > 0 and fingerprint_size > 0
        # The counts go to the fingerprint member (if any) and the forest, never to the GNN: in its
        # descriptor MLP they made it overfit within a few epochs.
        self.counts_end = descriptor_size - kernel_fingerprint_size - smiles_token_count
        self.plain_size = self.counts_end - fingerprint_size
        self.use_atom_counts = config.atom_counts and config.descriptor_hidden_dim > 0
        # Atom counts skip the mass column (the last), the only one that is not 0/1.
        self.count_size = atom_feature_size - 1 if self.use_atom_counts else 0
        # The descriptor MLP reads the plain descriptors and the atom counts, whichever there are.
        self.use_descriptors = (
            config.descriptor_hidden_dim > 0 and self.plain_size + self.count_size > 0
        )
        # Descriptor scaling is part of the model (and so of the ONNX graph): set from train data.
        self.register_buffer("descriptor_mean", torch.zeros(descriptor_size))
        self.register_buffer("descriptor_std", torch.ones(descriptor_size))
        # Mean pooling describes the typical atom; sum pooling adds how many of each there are.
        self.sum_pooling = config.pooling == "mean_sum"
        self.sum_pooling_scale = float(config.sum_pooling_scale)
        if config.pooling not in ("mean", "mean_sum"):
            raise ConfigError(f"unknown model.pooling={config.pooling!r}: mean | mean_sum")
        head_input = hidden * (2 if self.sum_pooling else 1)
        if self.use_descriptors:
            self.descriptor_mlp = nn.Sequential(
                nn.Linear(self.plain_size + self.count_size, config.descriptor_hidden_dim),
                nn.ReLU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.descriptor_hidden_dim, config.descriptor_hidden_dim),
                nn.ReLU(),
            )
            head_input += config.descriptor_hidden_dim
        layers: list[nn.Module] = []
        width = head_input
        for _ in range(config.head_layers - 1):
            layers += [
                nn.Linear(width, config.head_hidden_dim),
                nn.ReLU(),
                nn.Dropout(config.dropout),
            ]
            width = config.head_hidden_dim
        layers.append(nn.Linear(width, num_targets))
        self.head = nn.Sequential(*layers)
        self.fingerprint_mlp = (
            FingerprintMLP(self.counts_end, num_targets, config) if self.use_fingerprint else None
        )
        weights = [1.0 - config.fingerprint_weight, config.fingerprint_weight]
        # From the config, not learned: not saved in the state dict, so `train.init_from` and
        # checkpoints never carry another run's weighting.
        self.register_buffer(
            "member_weights",
            torch.tensor(weights if self.use_fingerprint else [1.0]),
            persistent=False,
        )

    def output_layer_names(self) -> set[str]:
        """Parameters of each member's last layer: task-specific, not carried over by transfer."""
        names = {f"head.{len(self.head) - 1}.weight", f"head.{len(self.head) - 1}.bias"}
        if self.fingerprint_mlp is not None:
            last = len(self.fingerprint_mlp.layers) - 1
            names |= {
                f"fingerprint_mlp.layers.{last}.weight",
                f"fingerprint_mlp.layers.{last}.bias",
            }
        return names

    def set_descriptor_scaling(self, mean: Tensor, std: Tensor) -> None:
        self.descriptor_mean.copy_(mean)
        self.descriptor_std.copy_(std.clamp(min=1e-6))

    def forward(
        self, atom_features: Tensor, adjacency: Tensor, atom_mask: Tensor, descriptors: Tensor
    ) -> Tensor:
        members = self.member_outputs(atom_features, adjacency, atom_mask, descriptors)
        return members @ self.member_weights  # [B, T, M] @ [M] -> [B, T]

    def member_outputs(
        self, atom_features: Tensor, adjacency: Tensor, atom_mask: Tensor, descriptors: Tensor
    ) -> Tensor:
        """Each member's raw outputs [B, T, M]: the GNN, then the fingerprint MLP if any."""
        scaled = (descriptors - self.descriptor_mean) / self.descriptor_std  # [B, D]
        plain = scaled[:, : self.plain_size]  # [B, D'] without either fingerprint's counts
        members = [self._gnn(atom_features, adjacency, atom_mask, plain)]
        if self.fingerprint_mlp is not None:
            counts = descriptors[:, self.plain_size : self.counts_end]  # [B, fingerprint size]
            members.append(self.fingerprint_mlp(plain, counts))
        return torch.stack(members, dim=-1)  # [B, T, M]

    def _gnn(
        self, atom_features: Tensor, adjacency: Tensor, atom_mask: Tensor, plain: Tensor
    ) -> Tensor:
        mask = atom_mask.unsqueeze(-1)  # [B, N, 1]
        hidden = self.atom_embedding(atom_features) * mask  # [B, N, H], padding rows zero
        for convolution, norm in zip(self.convolutions, self.norms):
            # No mask for the convolution: its padding rows (bias only; the adjacency has no edges
            # to padding) are zeroed below after LayerNorm, which would make them nonzero anyway.
            update = convolution(hidden, adjacency)  # [B, N, H]
            hidden = hidden + self.dropout(torch.relu(norm(update))) * mask  # residual
        atom_count = atom_mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1]
        summed = hidden.sum(dim=1)  # [B, H]
        pooled = summed / atom_count  # [B, H] masked mean
        if self.sum_pooling:
            # Scaled so a typical molecule (~25 heavy atoms) gives values near the mean's.
            pooled = torch.cat([pooled, summed / self.sum_pooling_scale], dim=-1)  # [B, 2H]
        if self.use_atom_counts:
            counts = atom_counts(atom_features, atom_mask)  # [B, F - 1]
            plain = torch.cat([plain, torch.log1p(counts)], dim=-1)  # [B, D' + F - 1]
        if self.use_descriptors:
            pooled = torch.cat([pooled, self.descriptor_mlp(plain)], dim=-1)  # [B, H + Hd]
        return self.head(pooled)  # [B, T]


def average_members(
    network_values: Tensor, other_values: list[Tensor], weights: list[float]
) -> Tensor:
    """The members' [B, T] averaged: probabilities (classification) or standardized values
    (regression). `weights` are the other members' shares; the network has what they leave."""
    average = (1.0 - sum(weights)) * network_values
    for values, weight in zip(other_values, weights):
        average = average + weight * values
    return average  # [B, T]


FittedMember = TreeEnsemble | TanimotoKernelRidge | ChemNetSVM
# A member's key in the checkpoint -> the class that reads its state, in the order the served
# model averages them.
MEMBER_CLASSES: dict[str, type[FittedMember]] = {
    "forest": TreeEnsemble,
    "kernel": TanimotoKernelRidge,
    "chemnet": ChemNetSVM,
}


@dataclass
class Member:
    """A fitted member averaged with the network in the served model (Train step 6)."""

    name: str  # a key of MEMBER_CLASSES: its key in the checkpoint and in the summary line
    module: FittedMember
    weight: float  # its share of the average


class PredictionModel(nn.Module):
    """What gets exported: the GNN (and the forest, kernel and ChemNet members, if any) plus the
    step to what a user wants, so nothing is post-processed outside the model: a probability
    (classification) or the value in original units (regression)."""

    def __init__(
        self,
        network: MoleculeGNN,
        task: str,
        target_mean: Tensor,
        target_std: Tensor,
        members: Sequence[Member] = (),
    ):
        super().__init__()
        self.network = network
        self.task = task
        self.register_buffer("target_mean", target_mean.clone())
        self.register_buffer("target_std", target_std.clone())
        self.members = nn.ModuleDict({member.name: member.module for member in members})
        self.member_weights = [member.weight for member in members]

    def forward(
        self, atom_features: Tensor, adjacency: Tensor, atom_mask: Tensor, descriptors: Tensor
    ) -> Tensor:
        raw = self.network(atom_features, adjacency, atom_mask, descriptors)  # [B, T]
        # Probabilities, or values in standardized units (the other members' too).
        values = torch.sigmoid(raw) if self.task == "classification" else raw  # [B, T]
        if self.members:
            others = [
                member.molecule_forward(atom_features, atom_mask, descriptors)  # [B, T]
                for member in self.members.values()
            ]
            values = average_members(values, others, self.member_weights)  # [B, T]
        if self.task == "classification":
            return values
        return values * self.target_std + self.target_mean
