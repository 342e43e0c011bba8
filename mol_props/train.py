"""Training: an explicit Lightning Fabric loop (train -> train_epoch -> validate), MLflow logging.

    mol_props train [OVERRIDES...]
      data (DVC pull, else download_data) -> featurize (cached) -> split
      -> epochs: train_epoch, validate, early stopping, best + last checkpoints (fabric.save)
      -> train.refit: a fresh model on train + val for the best epoch count (refit_last.ckpt)
      -> model.forest_trees, model.kernel_weight, model.chemnet_weight: the forest, kernel and
         ChemNet members, fitted on train + val (mol_props.forest, .kernel, .chemnet)
      -> final model on test -> models/best.ckpt, plots/<run>/, MLflow -> export (ONNX)

Reproducibility: every epoch re-seeds torch and the shuffling generator with (seed + epoch), so a
run resumed from `last.ckpt` (train.resume=true) sees exactly the batches and dropout masks of an
uninterrupted run and ends with the same weights.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, Dataset

from mol_props import plots
from mol_props.chemnet import Calibration, ChemNetSVM, fit_chemnet_svm
from mol_props.config import Config, TrainConfig, to_flat_dict
from mol_props.data import PreparedData, prepare_data
from mol_props.errors import ConfigError, MolPropsError
from mol_props.featurize import Featurizer, MoleculeGraph, pad_graphs
from mol_props.forest import ForestSettings, TreeEnsemble, fit_forest, forest_features
from mol_props.kernel import TanimotoKernelRidge, check_kernel_size, fit_kernel
from mol_props.metrics import MONITORED, evaluate
from mol_props.model import FittedMember, Member, MoleculeGNN, average_members
from mol_props.tracking import RunLogger, git_state

LOGGER = logging.getLogger(__name__)


class TrainingError(MolPropsError, RuntimeError):
    """A run that cannot produce a model as configured; the message says what to change."""


class MoleculeDataset(Dataset):
    def __init__(self, graphs: list[MoleculeGraph], targets: np.ndarray) -> None:
        self.graphs = graphs
        self.targets = targets  # [M, T]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> tuple[MoleculeGraph, np.ndarray]:
        return self.graphs[index], self.targets[index]


class SizeGroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of similar-sized molecules.

    Each batch is padded to its own largest molecule, so grouping by size cuts the padding (and
    the [N, N] adjacency products) roughly in half on B3DB. Molecules are shuffled, cut into pools
    of `pool_batches` batches, sorted by size within a pool, batched, and the batches shuffled;
    with several processes each takes every world_size-th batch, the first batches repeated so
    that every process gets as many (as torch's DistributedSampler pads): one process stepping
    once more than another would wait forever for the others' gradients.
    """

    def __init__(
        self,
        sizes: np.ndarray,
        batch_size: int,
        generator: torch.Generator,
        pool_batches: int = 32,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sizes = sizes
        self.batch_size = batch_size
        self.generator = generator
        self.pool = batch_size * pool_batches
        self.rank, self.world_size = rank, world_size

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.sizes), generator=self.generator).numpy()
        batches = []
        for start in range(0, len(order), self.pool):
            pool = order[start : start + self.pool]
            pool = pool[np.argsort(self.sizes[pool], kind="stable")]
            batches += [
                pool[i : i + self.batch_size].tolist()
                for i in range(0, len(pool), self.batch_size)
            ]
        shuffled = torch.randperm(len(batches), generator=self.generator).tolist()
        batches = [batches[i] for i in shuffled]
        batches += batches[: -len(batches) % self.world_size]
        return batches[self.rank :: self.world_size]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        total = sum(
            math.ceil(min(self.pool, len(self.sizes) - start) / self.batch_size)
            for start in range(0, len(self.sizes), self.pool)
        )
        return math.ceil(total / self.world_size)


def collate(items: list[tuple[MoleculeGraph, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad a batch to its own largest molecule (cheaper than max_atoms on CPU; same result)."""
    graphs = [graph for graph, _ in items]
    batch = pad_graphs(
        graphs,
        num_atoms=max(graph.num_atoms for graph in graphs),
        descriptor_size=graphs[0].descriptors.shape[0],
        atom_feature_size=graphs[0].atom_features.shape[1],
    )
    tensors = {name: torch.from_numpy(array) for name, array in batch.as_inputs().items()}
    tensors["targets"] = torch.from_numpy(np.stack([target for _, target in items]))  # [B, T]
    return tensors


@dataclass
class Scaling:
    """Target standardization (regression) kept with the model; identity for classification."""

    mean: np.ndarray  # [T]
    std: np.ndarray  # [T]

    @classmethod
    def fit(cls, targets: np.ndarray, task: str) -> Scaling:
        if task == "classification":
            return cls(np.zeros(targets.shape[1]), np.ones(targets.shape[1]))
        return cls(np.nanmean(targets, axis=0), np.maximum(np.nanstd(targets, axis=0), 1e-6))


def masked_loss(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """BCE-with-logits or MSE over the targets that are present (NaN = missing)."""
    present = ~torch.isnan(targets)  # [B, T]
    filled = torch.where(present, targets, torch.zeros_like(targets))
    if task == "classification":
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            outputs, filled, reduction="none"
        )
    else:
        losses = (outputs - filled) ** 2
    return (losses * present).sum() / present.sum().clamp(min=1)


def make_fabric(config: TrainConfig) -> Fabric:
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    try:
        return Fabric(
            accelerator=config.accelerator,
            devices=config.devices,
            precision=config.precision,
            strategy=config.strategy,
        )
    except (RuntimeError, ValueError, ImportError) as error:
        # Lightning's own messages name the problem (no CUDA here, a precision it does not
        # know, a missing package); these settings are what the user can change.
        raise ConfigError(
            f"train.accelerator={config.accelerator}, train.devices={config.devices}, "
            f"train.precision={config.precision}, train.strategy={config.strategy}: {error}"
        ) from None


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total_steps = max(config.max_epochs * steps_per_epoch, 1)
    if config.scheduler == "onecycle" and total_steps >= 4:
        # OneCycleLR needs at least 2 warm-up steps and 2 after; tiny runs (tests) get them.
        warmup = min(max(config.warmup_fraction, 2.0 / total_steps), 1.0 - 2.0 / total_steps)
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.learning_rate, total_steps=total_steps, pct_start=warmup
        )
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.scheduler in ("constant", "onecycle"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ConfigError(
        f"unknown train.scheduler={config.scheduler!r}: onecycle | cosine | constant"
    )


def schedule_settings(config: TrainConfig, steps_per_epoch: int) -> dict[str, object]:
    """The settings that fix the learning-rate schedule (with the steps per epoch they imply)."""
    return {
        "train.max_epochs": config.max_epochs,
        "train.scheduler": config.scheduler,
        "train.learning_rate": config.learning_rate,
        "train.warmup_fraction": config.warmup_fraction,
        "steps per epoch (train.batch_size, the data)": steps_per_epoch,
    }


def check_schedule(saved: dict[str, object], wanted: dict[str, object], last_path: Path) -> None:
    """A resumed run continues the saved schedule; with other settings it would either step past
    its end (OneCycleLR raises "Tried to step 7 times") or no longer match an uninterrupted run."""
    changed = {name: value for name, value in saved.items() if wanted.get(name) != value}
    if changed:
        saved_with = ", ".join(f"{name}={value}" for name, value in changed.items())
        raise TrainingError(
            f"train.resume=true: {last_path} was saved with {saved_with}; the learning-rate "
            "schedule spans the whole run, so resume with those settings, or start a new run "
            f"from its weights with train.init_from={last_path.with_name('best.ckpt')}"
        )


def _diverged(what: str, config: TrainConfig) -> TrainingError:
    return TrainingError(
        f"{what}: the training diverged; try a lower train.learning_rate "
        f"(now {config.learning_rate}) or train.gradient_clip (now {config.gradient_clip})"
    )


def train_epoch(
    fabric: Fabric,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: DataLoader,
    config: TrainConfig,
    task: str,
) -> float:
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        members = model.member_outputs(
            batch["atom_features"], batch["adjacency"], batch["atom_mask"], batch["descriptors"]
        )  # [B, T, M]
        # Each member learns on its own loss, as separately trained models of an ensemble would.
        losses = [
            masked_loss(members[..., k], batch["targets"], task) for k in range(members.shape[-1])
        ]
        loss = torch.stack(losses).mean()
        if not torch.isfinite(loss):
            raise _diverged(f"the training loss became {loss.item()}", config)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        if config.gradient_clip > 0:  # 0 = no clipping (max_norm=0 would zero every gradient)
            norm = fabric.clip_gradients(
                model, optimizer, max_norm=config.gradient_clip, error_if_nonfinite=False
            )
            if not torch.isfinite(norm):
                raise _diverged(f"the gradient norm became {norm.item()}", config)
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(batch["targets"])
        count += len(batch["targets"])
    # Each process saw its share of the batches: the epoch's loss is over all of them.
    sums = fabric.all_reduce(torch.tensor([total, float(count)]), reduce_op="sum")  # [2]
    return float(sums[0] / sums[1].clamp(min=1))


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader: DataLoader, task: str, scaling: Scaling
) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss, predictions in user units [M, T], targets [M, T]) over a loader, in order."""
    model.eval()
    losses, outputs, targets = [], [], []
    for batch in loader:
        raw = model(
            batch["atom_features"], batch["adjacency"], batch["atom_mask"], batch["descriptors"]
        )  # [B, T]
        losses.append(masked_loss(raw, batch["targets"], task).item() * len(raw))
        outputs.append(raw.float().cpu().numpy())
        targets.append(batch["targets"].cpu().numpy())
    raw_all = np.concatenate(outputs)
    if task == "classification":
        # torch's sigmoid: 1 / (1 + exp(-x)) in numpy overflows (and warns) for logits below -88.
        values = torch.sigmoid(torch.from_numpy(raw_all)).numpy()
        target_values = np.concatenate(targets)
    else:
        values = raw_all * scaling.std + scaling.mean
        target_values = np.concatenate(targets) * scaling.std + scaling.mean
    return sum(losses) / max(len(raw_all), 1), values, target_values


@torch.no_grad()
def member_predict(
    member: FittedMember,
    loader: DataLoader,
    task: str,
    scaling: Scaling,
) -> np.ndarray:
    """A fitted member's (forest, kernel, ChemNet) predictions in user units [M, T] over a
    loader, in order (on the CPU, where it was fitted)."""
    values = torch.cat(
        [
            member.molecule_forward(
                batch["atom_features"].cpu(), batch["atom_mask"].cpu(), batch["descriptors"].cpu()
            )
            for batch in loader
        ]
    ).numpy()  # [M, T]
    if task == "classification":
        return values
    return values * scaling.std + scaling.mean


def with_members(
    network_values: np.ndarray, other_values: list[np.ndarray], weights: list[float]
) -> np.ndarray:
    """The exported model's average of the members, in user units [M, T] (the same numbers:
    for regression it averages standardized values, and unscaling is linear)."""
    return average_members(
        torch.from_numpy(network_values), [torch.from_numpy(v) for v in other_values], weights
    ).numpy()


def validate(
    model: torch.nn.Module,
    loader: DataLoader,
    task: str,
    scaling: Scaling,
    target_names: list[str],
) -> dict[str, float]:
    loss, values, targets = predict(model, loader, task, scaling)
    return {"loss": loss, **evaluate(targets, values, task, target_names)}


def monitored_metric(task: str, val_targets: np.ndarray) -> tuple[str, bool]:
    """The validation metric that picks the best epoch and stops early, and whether higher is
    better: ROC-AUC or RMSE (metrics.MONITORED), but the loss when no target's validation labels
    hold both classes, where ROC-AUC is undefined (NaN) and no epoch could ever be the best."""
    metric, higher_is_better = MONITORED[task]
    if task == "classification":
        labelled = [column[~np.isnan(column)] for column in val_targets.T]  # per target
        if not any(len(np.unique(labels)) > 1 for labels in labelled):
            return "loss", False
    return metric, higher_is_better


def check_splits(data: PreparedData) -> None:
    """Training needs train molecules, and validation ones for early stopping and the best
    checkpoint; a test split may be empty."""
    for name in ("train", "val"):
        if len(data.splits[name]) == 0:
            sizes = ", ".join(f"{split} {len(rows)}" for split, rows in data.splits.items())
            raise ConfigError(
                f"the {name} split is empty ({sizes}): training needs {name} molecules; "
                "give it a share in data.split.fractions or rows in data.split.column"
            )


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def _train_loader(
    dataset: MoleculeDataset, batch_size: int, generator: torch.Generator, fabric: Fabric
) -> DataLoader:
    sizes = np.array([graph.num_atoms for graph in dataset.graphs])
    sampler = SizeGroupedBatchSampler(
        sizes, batch_size, generator, rank=fabric.global_rank, world_size=fabric.world_size
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def _eval_loader(dataset: MoleculeDataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def _run_directory(config: Config) -> tuple[str, Path]:
    run_name = config.logging.run_name or (
        f"{config.data.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    )
    return run_name, Path(config.logging.plots_dir) / run_name


def _attach_log_file(directory: Path) -> logging.Handler:
    handler = logging.FileHandler(directory / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("mol_props").addHandler(handler)
    return handler


@dataclass
class TrainResult:
    checkpoint: Path
    test_metrics: dict[str, float]
    val_metrics: dict[str, float]
    run_directory: Path
    epochs_run: int  # epochs of the run that chose the epoch count on val
    best_epoch: int  # its best epoch by the validation metric
    refit_epochs: int  # epochs of the refit on train + val (train.refit), else 0
    # With the forest member: test metrics of each member alone ("network", "forest").
    member_test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # False in the other processes of a multi-process (DDP) run: only the first exports.
    is_global_zero: bool = True


def print_lightning_messages_once() -> None:
    """Lightning's package logger writes to its own console handler and also passes each record
    on to the root handler the command sets up, so "Seed set to 0" showed twice. Its own handler
    alone keeps every message, once, with its level in front."""
    logging.getLogger("lightning").propagate = False


def run(config: Config) -> TrainResult:
    """The `mol_props train` command."""
    started = time.perf_counter()
    print_lightning_messages_once()
    settings = config.train
    fabric = make_fabric(settings)
    # With strategy=ddp this starts the other processes, each running this same command.
    fabric.launch()
    if not fabric.is_global_zero:
        # The other processes do the same work: one voice on the console, warnings excepted.
        logging.getLogger("mol_props").setLevel(logging.WARNING)
    # One run directory for all processes (the name holds the time each process started).
    run_name, run_directory = fabric.broadcast(_run_directory(config), src=0)
    run_directory.mkdir(parents=True, exist_ok=True)
    log_handler = _attach_log_file(run_directory) if fabric.is_global_zero else None
    try:
        # The first process fetches, featurizes and caches; the others then read the cache.
        with fabric.rank_zero_first():
            data = prepare_data(config.data, config.preprocess, progress=settings.progress)
        if fabric.is_global_zero:
            _save_split(data, run_directory)
        return _fit(config, fabric, data, run_name, run_directory, started)
    finally:
        if log_handler is not None:
            logging.getLogger("mol_props").removeHandler(log_handler)
            log_handler.close()


def mismatched_tensors(
    own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], names: Iterable[str]
) -> list[str]:
    """The `names` that one of the two state dicts lacks or holds with another shape."""
    return sorted(
        name
        for name in names
        if name not in own or name not in saved or own[name].shape != saved[name].shape
    )


def initialize_from(network: MoleculeGNN, checkpoint: Path) -> list[str]:
    """Copy the weights of an earlier run into `network` (transfer learning); returns the copied
    names. Output layers and the descriptor scaling stay this run's; every other tensor must match
    in name and shape, or the error names the ones that do not."""
    if not checkpoint.is_file():
        raise FileNotFoundError(f"train.init_from={checkpoint} does not exist")
    source = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    own = network.state_dict()
    skipped = network.output_layer_names() | {"descriptor_mean", "descriptor_std"}
    wanted = [name for name in own if name not in skipped]
    mismatched = mismatched_tensors(own, source, wanted)
    if mismatched:
        raise ConfigError(
            f"train.init_from={checkpoint}: {len(mismatched)} tensors differ from this model "
            f"(e.g. {mismatched[:3]}): it needs the same model and featurizer settings"
        )
    network.load_state_dict({**own, **{name: source[name] for name in wanted}})
    LOGGER.info("initialized %d tensors from %s (output layers are new)", len(wanted), checkpoint)
    return wanted


def _save_split(data: PreparedData, directory: Path) -> None:
    """The split used, one row per molecule, saved with the run (and logged to MLflow)."""
    names = np.empty(len(data.graphs), dtype=object)
    for name, indices in data.splits.items():
        names[indices] = name
    with (directory / "split.csv").open("w") as handle:
        handle.write("row,smiles,split\n")
        for row, smiles, name in zip(data.source_rows, data.smiles, names):
            handle.write(f'{row},"{smiles}",{name}\n')


@dataclass
class Trainee:
    """A freshly initialized model with its optimizer, learning-rate schedule and loaders, for one
    set of training rows: the train split (choosing the epoch count on val), or train + val (the
    refit). Targets are scaled by the statistics of those rows."""

    network: MoleculeGNN
    model: torch.nn.Module  # the network wrapped by Fabric
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # shuffles the train batches; re-seeded every epoch
    scaling: Scaling
    train_loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader | None
    schedule: dict[str, object]  # what the learning-rate schedule spans (checked on resume)


def _set_up(
    config: Config,
    fabric: Fabric,
    data: PreparedData,
    train_rows: np.ndarray,
) -> Trainee:
    """A fresh model, with its optimizer, schedule and loaders, to train on `train_rows`."""
    settings = config.train
    scaling = Scaling.fit(data.targets[train_rows], config.data.task)
    scaled_targets = ((data.targets - scaling.mean) / scaling.std).astype(np.float32)

    def subset(rows: np.ndarray) -> MoleculeDataset:
        return MoleculeDataset([data.graphs[i] for i in rows], scaled_targets[rows])

    generator = torch.Generator()
    train_loader = _train_loader(subset(train_rows), settings.batch_size, generator, fabric)
    val_loader = _eval_loader(subset(data.splits["val"]), settings.batch_size)
    test_rows = data.splits["test"]
    test_loader = _eval_loader(subset(test_rows), settings.batch_size) if len(test_rows) else None
    featurizer = Featurizer(config.preprocess)
    fabric.seed_everything(settings.seed)
    network = MoleculeGNN(
        featurizer.atom_feature_size,
        featurizer.descriptor_size,
        len(data.target_names),
        config.model,
        fingerprint_size=config.preprocess.fingerprint.size,
        kernel_fingerprint_size=config.preprocess.kernel_fingerprint.size,
        smiles_token_count=config.preprocess.smiles_tokens,
    )
    descriptors = np.stack([data.graphs[i].descriptors for i in train_rows])  # [M_train, D]
    network.set_descriptor_scaling(
        torch.from_numpy(descriptors.mean(axis=0)), torch.from_numpy(descriptors.std(axis=0))
    )
    if settings.init_from:
        initialize_from(network, Path(settings.init_from))
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    scheduler = make_scheduler(optimizer, settings, len(train_loader))
    model, optimizer = fabric.setup(network, optimizer)
    model.mark_forward_method("member_outputs")  # the training step calls it
    # The train batch sampler splits batches across processes itself; evaluation runs whole
    # on every process (validation sets are small).
    train_loader, val_loader = fabric.setup_dataloaders(
        train_loader, val_loader, use_distributed_sampler=False
    )
    if test_loader is not None:
        test_loader = fabric.setup_dataloaders(test_loader, use_distributed_sampler=False)
    return Trainee(
        network=network,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        scaling=scaling,
        train_loader=train_loader,
        val_loader=val_loader,
        test_loader=test_loader,
        schedule=schedule_settings(settings, len(train_loader)),
    )


def _new_state(trainee: Trainee) -> dict[str, object]:
    """What last.ckpt holds: enough to continue the stage exactly where it stopped."""
    return {
        "model": trainee.model,
        "optimizer": trainee.optimizer,
        "scheduler": trainee.scheduler,
        "epoch": 0,
        "best_value": float("nan"),
        "bad_epochs": 0,
        "history": [],
        "mlflow_run_id": "",
        # What the learning-rate schedule spans: a resumed run must continue the same one.
        "schedule": trainee.schedule,
    }


def _resume(fabric: Fabric, trainee: Trainee, state: dict[str, object], last_path: Path) -> None:
    """Load `last_path` into `state` after checking that it holds a model of these settings."""
    saved = torch.load(last_path, map_location="cpu", weights_only=True)["model"]
    own = trainee.network.state_dict()
    mismatched = mismatched_tensors(own, saved, own.keys() | saved.keys())
    if mismatched:
        raise TrainingError(
            f"train.resume=true: {last_path} holds a model with other settings "
            f"({len(mismatched)} tensors differ, e.g. {mismatched[:3]}); resume with the "
            "settings it was saved with, or start a new run without train.resume"
        )
    state["schedule"] = None
    # strict=False: a last.ckpt from before schedules were saved is read, leaving None.
    fabric.load(last_path, state, strict=False)
    if state["schedule"] is None:
        LOGGER.warning(
            "%s does not record its learning-rate schedule (an older mol_props): resume "
            "it with the train settings it was saved with",
            last_path,
        )
    else:
        check_schedule(state["schedule"], trainee.schedule, last_path)
    state["schedule"] = trainee.schedule
    LOGGER.info("resumed from %s at epoch %d", last_path, state["epoch"])


@dataclass
class Stage:
    """How one stage's epochs run: the selection validates every epoch, keeps the best weights in
    `best_path` and stops early; the refit (no `best_path`) trains on train + val, nothing left to
    validate on, for a fixed count."""

    epochs: int  # the last epoch to run
    last_path: Path
    best_path: Path | None = None

    @property
    def is_refit(self) -> bool:
        return self.best_path is None

    def finished(self, state: dict[str, object], patience: int) -> bool:
        """Whether the stage in `state` has run to its end (last epoch, or an early stop)."""
        stopped_early = not self.is_refit and state["bad_epochs"] >= patience
        return stopped_early or state["epoch"] >= self.epochs


def _run_epochs(
    fabric: Fabric,
    trainee: Trainee,
    state: dict[str, object],
    stage: Stage,
    config: Config,
    target_names: list[str],
    monitored: tuple[str, bool],
    tracker: RunLogger | None,
) -> None:
    settings, task = config.train, config.data.task
    metric, higher_is_better = monitored
    from tqdm.auto import tqdm

    finished = stage.finished(state, settings.patience)
    epochs = tqdm(
        range(state["epoch"], state["epoch"] if finished else stage.epochs),
        initial=state["epoch"],
        total=stage.epochs,
        desc="refit" if stage.is_refit else "train",
        unit="epoch",
        disable=not (settings.progress and fabric.is_global_zero),
    )
    # MLflow keys: the refit's epochs beside the selection's, not over them.
    prefix = "refit_" if stage.is_refit else ""
    try:
        for epoch in epochs:
            # Same seeds for the same epoch whether or not the run was resumed.
            torch.manual_seed(settings.seed + epoch)
            trainee.generator.manual_seed(settings.seed + epoch)
            epoch_started = time.perf_counter()
            train_loss = train_epoch(
                fabric,
                trainee.model,
                trainee.optimizer,
                trainee.scheduler,
                trainee.train_loader,
                settings,
                task,
            )
            row: dict[str, float] = {"epoch": epoch + 1, "train_loss": train_loss}
            if not stage.is_refit:
                val_metrics = validate(
                    trainee.model, trainee.val_loader, task, trainee.scaling, target_names
                )
                row.update({f"val_{name}": value for name, value in val_metrics.items()})
            row["lr"] = trainee.scheduler.get_last_lr()[0]
            row["epoch_seconds"] = time.perf_counter() - epoch_started
            state["history"].append(row)
            if tracker is not None:
                tracker.log_metrics(
                    {f"{prefix}{name}": value for name, value in row.items() if name != "epoch"},
                    step=epoch + 1,
                )
            state["epoch"] = epoch + 1
            if stage.is_refit:
                epochs.set_postfix(loss=f"{train_loss:.4f}")
                fabric.save(stage.last_path, state)
                continue
            epochs.set_postfix(
                loss=f"{train_loss:.4f}", **{f"val_{metric}": f"{val_metrics[metric]:.4f}"}
            )
            best = None if math.isnan(state["best_value"]) else state["best_value"]
            if is_better(val_metrics[metric], best, higher_is_better):
                state["best_value"] = val_metrics[metric]
                state["bad_epochs"] = 0
                fabric.save(stage.best_path, {"model": trainee.model, "epoch": epoch + 1})
            else:
                state["bad_epochs"] += 1
            fabric.save(stage.last_path, state)
            if state["bad_epochs"] >= settings.patience:
                LOGGER.info(
                    "early stop: no better val %s for %d epochs", metric, settings.patience
                )
                break
    finally:
        epochs.close()


def _fit(
    config: Config,
    fabric: Fabric,
    data: PreparedData,
    run_name: str,
    run_directory: Path,
    started: float,
) -> TrainResult:
    settings = config.train
    task = config.data.task
    check_splits(data)
    if config.model.kernel_weight > 0:  # it fits on train + val after the network: ask first
        check_kernel_size(len(data.splits["train"]) + len(data.splits["val"]))
    monitored = monitored_metric(task, data.targets[data.splits["val"]])
    metric = monitored[0]
    if metric != MONITORED[task][0]:
        LOGGER.warning(
            "val split: every label of each target is the same class, so ROC-AUC is undefined; "
            "early stopping and the best checkpoint use the validation loss"
        )
    checkpoint_dir = Path(settings.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    select = Stage(
        settings.max_epochs, checkpoint_dir / "last.ckpt", best_path=checkpoint_dir / "best.ckpt"
    )
    refit_last = checkpoint_dir / "refit_last.ckpt"
    trainee = _set_up(config, fabric, data, data.splits["train"])
    state = _new_state(trainee)
    if settings.resume:
        if not select.last_path.is_file():
            raise FileNotFoundError(f"train.resume=true but {select.last_path} does not exist")
        _resume(fabric, trainee, state, select.last_path)
    selected_before = settings.resume and select.finished(state, settings.patience)
    if fabric.is_global_zero and not selected_before:
        # A refit checkpoint belongs to the selection that finished before it: another one's
        # (an earlier run, or this run's before the selection finished) must not be resumed.
        refit_last.unlink(missing_ok=True)
    fabric.barrier()

    tracker = (
        _start_tracking(config, data, run_name, run_directory) if fabric.is_global_zero else None
    )
    if tracker is not None:
        state["mlflow_run_id"] = tracker.run.info.run_id

    status = "FINISHED"
    try:
        _run_epochs(fabric, trainee, state, select, config, data.target_names, monitored, tracker)
        if math.isnan(state["best_value"]):
            # No epoch saved best.ckpt (a file there would be another run's).
            raise TrainingError(
                f"no epoch gave a finite validation {metric} in {state['epoch']} epochs (the "
                "training diverged?); try a lower train.learning_rate"
            )
        # Evaluate the best epoch's weights, not the last ones; best.ckpt records its epoch.
        best_epoch = int(fabric.load(select.best_path, {"model": trainee.model})["epoch"])
        _, val_values, val_targets = predict(
            trainee.model, trainee.val_loader, task, trainee.scaling
        )
        val_metrics = evaluate(val_targets, val_values, task, data.target_names)
        history = state["history"]
        selected, refit_history = trainee, None
        if settings.refit:
            trainee, refit_history = _refit(
                config, fabric, data, best_epoch, refit_last, monitored, tracker
            )
        members = _fit_members(config, data, trainee.scaling)
    except BaseException as error:
        # MLflow's run statuses: stopped by the user, or failed.
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        if tracker is not None:
            tracker.finish(status)
        raise

    figure_paths = [
        plots.learning_curves(
            history, metric, run_directory / "learning_curves.png", refit_history
        )
    ]
    test_metrics: dict[str, float] = {}
    member_test_metrics: dict[str, dict[str, float]] = {}
    if trainee.test_loader is not None:
        test_values, test_targets, member_test_metrics = _test_predictions(
            trainee, members, task, data.target_names
        )
        test_metrics = evaluate(test_targets, test_values, task, data.target_names)
        figure_paths += evaluation_figures(
            test_targets, test_values, task, data.target_names, run_directory
        )
        if tracker is not None:
            for member, metrics in member_test_metrics.items():
                tracker.log_metrics({f"{member}_test_{k}": v for k, v in metrics.items()})
            if settings.refit:
                # For comparison only: the model the epoch count came from, before the refit.
                _, values, targets = predict(
                    selected.model, selected.test_loader, task, selected.scaling
                )
                selected_metrics = evaluate(targets, values, task, data.target_names)
                tracker.log_metrics({f"select_test_{k}": v for k, v in selected_metrics.items()})
    checkpoint = _save_model(
        config,
        fabric,
        trainee.network,
        members,
        data,
        trainee.scaling,
        val_metrics,
        test_metrics,
        trained_on="train+val" if settings.refit else "train",
    )
    if tracker is not None:
        tracker.log_metrics({f"best_val_{name}": value for name, value in val_metrics.items()})
        tracker.log_metrics({f"test_{name}": value for name, value in test_metrics.items()})
        tracker.log_metrics(
            {
                "train_seconds": time.perf_counter() - started,
                "epochs_run": float(state["epoch"]),
                "best_epoch": float(best_epoch),
            }
        )
        for path in figure_paths:
            tracker.log_artifact(path, "plots")
        tracker.log_artifact(checkpoint, "model")
        tracker.log_artifact(run_directory / "train.log")
        tracker.finish(status)
    return TrainResult(
        checkpoint=checkpoint,
        test_metrics=test_metrics,
        val_metrics=val_metrics,
        run_directory=run_directory,
        epochs_run=state["epoch"],
        best_epoch=best_epoch,
        refit_epochs=best_epoch if settings.refit else 0,
        member_test_metrics=member_test_metrics,
        is_global_zero=fabric.is_global_zero,
    )


def _start_tracking(
    config: Config, data: PreparedData, run_name: str, run_directory: Path
) -> RunLogger:
    """The run's MLflow run: the resolved config as params, the commit, data and task as tags,
    and the split it trains on."""
    tracker = RunLogger(config.logging, run_name)
    commit, dirty = git_state()
    tracker.log_params(to_flat_dict(config))
    tracker.set_tags(
        {
            "mlflow.source.git.commit": commit,
            "git_dirty": str(dirty).lower(),
            "data_md5": data.data_md5,
            "data_name": config.data.name,
            "task": config.data.task,
            "resumed": str(config.train.resume).lower(),
        }
    )
    tracker.log_artifact(run_directory / "split.csv")
    return tracker


def _fit_members(config: Config, data: PreparedData, scaling: Scaling) -> list[Member]:
    """The members the config asks for, fitted on train + val. The forest stops at no epoch, so
    it has no use for val but to learn from it: it fits on train + val with or without the
    refit, and the run's val metrics are the network's. The kernel and ChemNet members
    likewise."""
    rows = np.concatenate([data.splits["train"], data.splits["val"]])
    members = []
    if config.model.forest_trees:
        forest = _fit_forest(config, data, rows, scaling)
        members.append(Member("forest", forest, config.model.forest_weight))
    if config.model.kernel_weight > 0:
        kernel = _fit_kernel(config, data, rows, scaling)
        members.append(Member("kernel", kernel, config.model.kernel_weight))
    if config.model.chemnet_weight > 0:
        chemnet = _fit_chemnet(config, data, rows, scaling)
        members.append(Member("chemnet", chemnet, config.model.chemnet_weight))
    return members


def _test_predictions(
    trainee: Trainee, members: list[Member], task: str, target_names: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, float]]]:
    """The served model's test predictions [M, T] (the network averaged with the members, as
    the exported model averages them), the test targets [M, T], and, with members, each one's
    test metrics alone ("network", "forest", "kernel") for comparison."""
    _, values, targets = predict(trainee.model, trainee.test_loader, task, trainee.scaling)
    if not members:
        return values, targets, {}
    member_values = [
        member_predict(member.module, trainee.test_loader, task, trainee.scaling)
        for member in members
    ]
    names = ["network"] + [member.name for member in members]
    alone = {
        name: evaluate(targets, each, task, target_names)
        for name, each in zip(names, [values, *member_values])
    }
    averaged = with_members(values, member_values, [member.weight for member in members])
    return averaged, targets, alone


def _refit(
    config: Config,
    fabric: Fabric,
    data: PreparedData,
    epochs: int,
    last_path: Path,
    monitored: tuple[str, bool],
    tracker: RunLogger | None,
) -> tuple[Trainee, list[dict[str, float]]]:
    """A fresh model (same seed) trained on train + val for the epoch count that early stopping
    chose. It follows the selection's learning-rate schedule (spanning train.max_epochs) and stops
    where the best epoch did, so its weights are the best epoch's counterpart, with more data.
    (A schedule compressed into those epochs did worse on the benchmark's proxy:
    docs/experiments.md.)"""
    rows = np.concatenate([data.splits["train"], data.splits["val"]])
    LOGGER.info(
        "refit: a fresh model on train + val (%d molecules) for %d epochs, the best epoch "
        "count on val",
        len(rows),
        epochs,
    )
    trainee = _set_up(config, fabric, data, rows)
    state = _new_state(trainee)
    if last_path.is_file():  # kept only when resuming this run (see _fit)
        _resume(fabric, trainee, state, last_path)
    stage = Stage(epochs, last_path)
    _run_epochs(fabric, trainee, state, stage, config, data.target_names, monitored, tracker)
    return trainee, state["history"]


def _fit_forest(
    config: Config, data: PreparedData, rows: np.ndarray, scaling: Scaling
) -> TreeEnsemble:
    """The forest member on `rows`, from the features the model computes from its own inputs;
    regression targets standardized as the network's are."""
    # D': every descriptor column but the kernel member's counts at the end.
    descriptor_count = Featurizer(config.preprocess).forest_descriptor_count
    features = forest_features([data.graphs[i] for i in rows], descriptor_count)  # [M, D' + F - 1]
    settings = ForestSettings.of_model(config.model, seed=config.train.seed)
    targets = _member_targets(config, data, rows, scaling)
    return fit_forest(features, targets, config.data.task, settings, descriptor_count)


def _fit_kernel(
    config: Config, data: PreparedData, rows: np.ndarray, scaling: Scaling
) -> TanimotoKernelRidge:
    """The kernel member on `rows`, from the kernel fingerprint's counts (the last descriptor
    columns); regression targets standardized as the network's are."""
    size = config.preprocess.kernel_fingerprint.size
    counts = np.stack([data.graphs[i].descriptors[-size:] for i in rows])  # [M, K]
    targets = _member_targets(config, data, rows, scaling)
    return fit_kernel(counts, targets, config.data.task, config.model.kernel_ridge)


def _fit_chemnet(
    config: Config, data: PreparedData, rows: np.ndarray, scaling: Scaling
) -> ChemNetSVM:
    """The ChemNet member on `rows`, from the SMILES token ids (the descriptor columns after
    the forest's), its margins Platt-scaled over folds of the rows' scaffolds."""
    columns = Featurizer(config.preprocess).smiles_token_columns
    token_ids = np.stack([data.graphs[i].descriptors[columns] for i in rows])  # [M, L]
    targets = _member_targets(config, data, rows, scaling)  # labels: it is a classifier
    folds = config.model.chemnet_calibration_folds
    calibration = None
    if folds:
        calibration = Calibration(folds, np.array([data.graphs[i].scaffold for i in rows]))
    return fit_chemnet_svm(
        token_ids,
        targets,
        columns.start,
        config.model.chemnet_c,
        config.model.chemnet_readout,
        calibration,
    )


def _member_targets(
    config: Config, data: PreparedData, rows: np.ndarray, scaling: Scaling
) -> np.ndarray:
    """[M, T] what the forest, the kernel and ChemNet fit: labels, or values standardized as the
    network's are (the members are averaged in those units)."""
    targets = data.targets[rows]
    if config.data.task == "classification":
        return targets
    return (targets - scaling.mean) / scaling.std


def evaluation_figures(
    targets: np.ndarray, values: np.ndarray, task: str, target_names: list[str], directory: Path
) -> list[Path]:
    """Test-set figures per target: in `directory` itself for one target, else in a folder
    named after each target (`plots/<run>/logBB/parity.png`). A target with no label among
    these molecules (an auxiliary target labelled only in train) gets none."""
    paths = []
    folders = plots.target_folders(target_names)
    for k, name in enumerate(target_names):
        present = ~np.isnan(targets[:, k])
        if not present.any():
            continue
        target_dir = directory if len(target_names) == 1 else directory / folders[k]
        target_dir.mkdir(exist_ok=True)
        draw = (
            plots.classification_figures if task == "classification" else plots.regression_figures
        )
        paths += draw(targets[present, k], values[present, k], name, target_dir)
    return paths


def _save_model(
    config: Config,
    fabric: Fabric,
    network: MoleculeGNN,
    members: list[Member],
    data: PreparedData,
    scaling: Scaling,
    val_metrics: dict[str, float],
    test_metrics: dict[str, float],
    trained_on: str,
) -> Path:
    """models/best.ckpt: weights plus everything export needs, as plain types; each fitted
    member's state under its name. `val_metrics` are the selected epoch's network's (a refit
    network and the other members have seen val); `trained_on` says which splits the network saw
    (the other members always fit on train + val)."""
    featurizer = Featurizer(config.preprocess)
    path = Path(config.export.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": network.state_dict(),
        "model_config": asdict(config.model),
        "preprocess": asdict(config.preprocess),
        "task": config.data.task,
        "targets": data.target_names,
        "atom_feature_size": featurizer.atom_feature_size,
        "descriptor_size": featurizer.descriptor_size,
        "target_mean": scaling.mean.tolist(),
        "target_std": scaling.std.tolist(),
        "val_metrics": val_metrics,
        "test_metrics": test_metrics,
        "trained_on": trained_on,
        "data_md5": data.data_md5,
    }
    for member in members:
        payload[member.name] = member.module.state()
    if fabric.is_global_zero:
        temporary = path.with_suffix(".tmp")
        torch.save(payload, temporary)
        shutil.move(temporary, path)
    fabric.barrier()  # no process returns (and exports) before the model is written
    return path
