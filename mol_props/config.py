"""Typed configuration: one dataclass per Hydra group, filled from `configs/` by `compose_config`.

The YAML files under `configs/` hold every value; these dataclasses hold none of their own beyond
what the schema needs (types and structure). Merging the composed YAML into this schema makes
a typo in an override (`model.hiden_dim=3`) or a wrong type an error, not a silently ignored key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mol_props.errors import ConfigError

# omegaconf.MISSING, spelled out so that importing this schema does not import OmegaConf (a tenth
# of a cold `mol_props infer`, which reads a cached config); tests/test_infer.py checks they agree.
MISSING = "???"

CONFIG_NAME = "config"


@dataclass
class SplitConfig:
    kind: str = MISSING  # scaffold | random | column
    fractions: list[float] = MISSING  # [train, val, test]
    seed: int = MISSING
    column: str = MISSING  # for kind=column: holds train / val / test per row


@dataclass
class DvcConfig:
    enabled: bool = MISSING
    remote: str = MISSING  # name of a remote in .dvc/config
    remote_url: str | None = MISSING  # overrides that remote's url (a local dir) when set


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = MISSING  # b3db: fetched by download_data(); csv: a user's own table
    path: str = MISSING
    separator: str | None = MISSING  # None: tab for .tsv, comma otherwise
    encoding: str = MISSING  # of the table's text (utf-8; cp1252 for some spreadsheet exports)
    smiles_column: str = MISSING
    target_columns: list[str] = MISSING
    # What predictions are called in outputs; None: the target column names.
    target_names: list[str] | None = MISSING
    task: str = MISSING  # classification | regression
    # Text labels -> numbers for classification tables (B3DB writes BBB+ / BBB-).
    label_map: dict[str, float] = field(default_factory=dict)
    split: SplitConfig = field(default_factory=SplitConfig)
    dvc: DvcConfig = field(default_factory=DvcConfig)


@dataclass
class AtomFeatureConfig:
    elements: list[int] = MISSING  # atomic numbers with their own slot
    degrees: list[int] = MISSING
    formal_charges: list[int] = MISSING
    hybridizations: list[str] = MISSING  # RDKit HybridizationType names
    total_hydrogens: list[int] = MISSING
    chiral_tags: list[str] = MISSING  # RDKit ChiralType names


@dataclass
class FingerprintConfig:
    size: int = MISSING  # Morgan count bits appended to the descriptors; 0 = off
    radius: int = MISSING


@dataclass
class PreprocessConfig:
    max_atoms: int = MISSING
    fragments: str = MISSING  # largest | error | keep_all
    atom: AtomFeatureConfig = field(default_factory=AtomFeatureConfig)
    descriptors: list[str] = MISSING
    fingerprint: FingerprintConfig = field(default_factory=FingerprintConfig)
    # Morgan counts for the kernel member alone (model.kernel_weight), appended after the
    # fingerprint's. A default, not MISSING: checkpoints and model.json files from before it
    # have none.
    kernel_fingerprint: FingerprintConfig = field(
        default_factory=lambda: FingerprintConfig(size=0, radius=2)
    )
    # ChemNet token ids of the canonical SMILES (model.chemnet_weight), between the fingerprint's
    # counts and the kernel's: ChemNet reads 350. A default, not MISSING, as above. 0 = none.
    smiles_tokens: int = 0
    num_workers: int = MISSING  # 0 = all cores
    chunk_size: int = MISSING
    cache_dir: str = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    conv: str = MISSING  # gin | graph
    hidden_dim: int = MISSING
    num_layers: int = MISSING
    pooling: str = MISSING  # mean | mean_sum
    sum_pooling_scale: float = MISSING  # sum pooling is divided by this (a typical atom count)
    dropout: float = MISSING
    descriptor_hidden_dim: int = MISSING  # 0 = ignore the descriptor vector
    # Defaults (not MISSING) on the fields below: checkpoints saved before they existed store a
    # model_config without them, and export rebuilds the model from it.
    # A second member beside the GNN: an MLP on the descriptors and log1p(Morgan counts), with its
    # own loss; the outputs (logits) are averaged, weighted. 0 = no fingerprint member.
    fingerprint_hidden_dim: int = 0
    fingerprint_dropout: float = 0.5
    fingerprint_weight: float = 0.3  # its share of the averaged output
    # log1p of each atom one-hot slot counted over the molecule, into the descriptor MLP.
    atom_counts: bool = False
    # The forest member (mol_props.forest): a random forest per target on the descriptors and
    # atom counts, fitted after the network on the same rows; its probabilities (classification)
    # or values are averaged with the network's, weighted. 0 trees = no forest.
    forest_trees: int = 0
    forest_depth: int = 0  # 0 = grow until the leaves are pure
    forest_weight: float = 0.5  # its share of the averaged output
    # The share of the features each split chooses from; 0 = scikit-learn's default (the square
    # root of their number for classification, all of them for regression).
    forest_max_features: float = 0.0
    # Classification forests: weight each tree's classes inversely to their frequency in its
    # bootstrap sample (balanced_subsample), in all training rows (balanced), or not (none).
    forest_class_weight: str = "none"
    # The kernel member (mol_props.kernel): kernel ridge regression on the Tanimoto similarity of
    # preprocess.kernel_fingerprint's counts to every training molecule's; its share of the
    # averaged output (the network's is what the forest and the kernel leave). 0 = no kernel.
    kernel_weight: float = 0.0
    kernel_ridge: float = 0.03  # added to the kernel matrix's diagonal: the fit's smoothing
    # The ChemNet member (mol_props.chemnet, classification): an RBF support vector machine on
    # the 512 features a pretrained SMILES network (ChemNet) computes from
    # preprocess.smiles_tokens; its share of the averaged output. 0 = no ChemNet member.
    chemnet_weight: float = 0.0
    chemnet_c: float = 1.0  # the SVM's C: smaller = smoother
    # Which of ChemNet's outputs the SVM reads (mol_props.chemnet.READOUTS); "last" is what
    # models saved before the setting read.
    chemnet_readout: str = "last"
    # Scaffold folds for the Platt scaling of the SVM's margins into probabilities
    # (mol_props.chemnet.platt_scaling); 0 = the plain sigmoid of the margin, as models saved
    # before the setting had.
    chemnet_calibration_folds: int = 0
    head_hidden_dim: int = MISSING
    head_layers: int = MISSING


@dataclass
class TrainConfig:
    seed: int = MISSING
    max_epochs: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING
    weight_decay: float = MISSING
    scheduler: str = MISSING  # onecycle | cosine | constant
    warmup_fraction: float = MISSING
    gradient_clip: float = MISSING
    patience: int = MISSING  # epochs without validation improvement before stopping
    # After early stopping has chosen the epoch count on val, train a fresh model on train + val
    # for that many epochs and ship it (its test metrics are the run's).
    refit: bool = MISSING
    accelerator: str = MISSING  # auto | cpu | cuda
    devices: int = MISSING
    precision: str = MISSING
    strategy: str = MISSING
    num_threads: int = MISSING  # torch intra-op threads on CPU; 0 = torch's default
    resume: bool = MISSING
    # A models/best.ckpt trained before (e.g. on the larger classification table) whose weights
    # start this run; output layers and descriptor scaling are this run's own. "" = random init.
    init_from: str = MISSING
    checkpoint_dir: str = MISSING
    models_dir: str = MISSING
    export_after: bool = MISSING  # run `mol_props export` at the end, so `infer` works next
    progress: bool = MISSING


@dataclass
class LoggingConfig:
    tracking_uri: str = MISSING
    experiment_name: str = MISSING
    run_name: str | None = MISSING
    fallback_uri: str = MISSING  # local store used when the server does not answer
    connect_timeout_s: float = MISSING
    plots_dir: str = MISSING


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    onnx_path: str = MISSING  # fixed max_atoms: the Triton / TensorRT contract
    dynamic_onnx_path: str = MISSING  # atom axis left dynamic: local ONNX Runtime buckets
    metadata_path: str = MISSING
    opset: int = MISSING
    exporter: str = MISSING  # torchscript | dynamo (needs onnxscript)
    parity_tolerance: float = MISSING
    parity_molecules: int = MISSING
    triton_model_name: str = MISSING
    dvc_track: bool = MISSING


@dataclass
class InferConfig:
    model_path: str = MISSING
    metadata_path: str = MISSING
    batch_size: int = MISSING
    chunk_size: int = MISSING  # rows read, featurized and written at a time
    atom_buckets: list[int] = MISSING  # pad each molecule to the smallest bucket that fits
    num_threads: int = MISSING  # ONNX Runtime intra-op threads; 0 = its default
    num_workers: int = MISSING  # processes for --input files; 0 = all cores, 1 = none
    smiles_column: str = MISSING
    encoding: str = MISSING  # of --input files; outputs are always UTF-8
    progress: bool = MISSING
    server_model_name: str = MISSING
    server_timeout_s: float = MISSING
    server_concurrency: int = MISSING  # requests a Triton client keeps in flight at once


@dataclass
class ServingConfig:
    triton_repo: str = MISSING
    host: str = MISSING
    http_port: int = MISSING
    grpc_port: int = MISSING
    metrics_port: int = MISSING
    backend: str = MISSING  # onnx | tensorrt
    model_name: str = MISSING
    ready_timeout_s: float = MISSING
    stop_timeout_s: float = MISSING  # on stop, in-flight requests may finish this long
    exit_timeout_s: float = MISSING  # then Triton waits this long for clients to disconnect
    work_dir: str = MISSING  # where the CPU server assembles its backend directory
    log_verbose: int = MISSING
    tritonserver: str = MISSING  # auto | bundled | a path to a tritonserver binary
    python_backend: dict[str, str] = field(default_factory=dict)  # --backend-config=python,k=v


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)


def config_dir() -> Path:
    """`configs/` of a source checkout, or the copy packed into an installed wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parent / "configs", package_dir / "configs"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no {CONFIG_NAME}.yaml next to {package_dir}")


# Free-text settings that take one of a few values: checked when the config is composed, so a
# typo fails at once with the allowed values instead of deep inside a run.
CHOICES = {
    ("data", "source"): ("b3db", "csv"),
    ("data", "task"): ("classification", "regression"),
    ("model", "conv"): ("gin", "graph"),
    ("model", "pooling"): ("mean", "mean_sum"),
    ("model", "forest_class_weight"): ("balanced_subsample", "balanced", "none"),
    ("model", "chemnet_readout"): ("max", "last"),
    ("train", "scheduler"): ("onecycle", "cosine", "constant"),
    ("serving", "backend"): ("onnx", "tensorrt"),
}


def check_fractions(split: SplitConfig) -> None:
    fractions = list(split.fractions)
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"data.split.fractions must be 3 numbers summing to 1: {fractions}")


def check_targets(data: DataConfig) -> None:
    """At least one target column, none listed twice; target names, if given, one per column."""
    columns = list(data.target_columns)
    if not columns:
        raise ConfigError(
            "data.target_columns is empty: name the column(s) to learn, e.g. "
            "data.target_columns=[label]"
        )
    given_names = list(data.target_names or [])
    for option, names in (("target_columns", columns), ("target_names", given_names)):
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"data.{option}={names}: {repeated} listed more than once")
    if data.target_names is not None and len(data.target_names) != len(columns):
        raise ConfigError(
            f"data.target_names={list(data.target_names)}: one name per target column "
            f"(data.target_columns={columns})"
        )


def check_descriptors(preprocess: PreprocessConfig) -> None:
    """The model always takes a descriptor input; Triton cannot declare one of width 0."""
    if not preprocess.descriptors and preprocess.fingerprint.size == 0:
        raise ConfigError(
            "preprocess.descriptors is empty (and no fingerprint): the model's descriptor input "
            "would have width 0, which Triton cannot serve; to train without descriptors keep "
            "the list and set model.descriptor_hidden_dim=0"
        )


def check_ports(serving: ServingConfig) -> None:
    ports = {
        "http_port": serving.http_port,
        "grpc_port": serving.grpc_port,
        "metrics_port": serving.metrics_port,
    }
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            raise ConfigError(f"serving.{name}={port}: a port is a number from 1 to 65535")
    if len(set(ports.values())) < len(ports):
        raise ConfigError(f"serving: the HTTP, gRPC and metrics ports must differ: {ports}")


def check_choices(config: Config) -> None:
    for (group, name), allowed in CHOICES.items():
        value = getattr(getattr(config, group), name)
        if value not in allowed:
            raise ConfigError(f"{group}.{name}={value!r}: expected one of {', '.join(allowed)}")
    if config.data.split.kind not in ("scaffold", "random", "column"):
        raise ConfigError(
            f"data.split.kind={config.data.split.kind!r}: expected scaffold, random or column"
        )


# Counts and sizes that must be at least 1: checked when the config is composed, so that
# `train.max_epochs=0` is refused at once instead of ending a run without a checkpoint.
AT_LEAST_ONE = (
    ("preprocess", "max_atoms"),
    ("preprocess", "chunk_size"),
    ("model", "hidden_dim"),
    ("model", "num_layers"),
    ("model", "head_hidden_dim"),
    ("model", "head_layers"),
    ("train", "max_epochs"),
    ("train", "batch_size"),
    ("train", "patience"),
    ("train", "devices"),
    ("export", "parity_molecules"),
    ("infer", "batch_size"),
    ("infer", "chunk_size"),
    ("infer", "server_concurrency"),
)
# Counts where 0 has a meaning (all cores, the library's default, off) but a negative has none:
# -1 workers used to run quietly in one process, a fingerprint of -5 bits quietly turned it off.
AT_LEAST_ZERO = (
    ("preprocess", "num_workers"),
    ("preprocess", "fingerprint", "size"),
    ("preprocess", "kernel_fingerprint", "size"),
    ("preprocess", "smiles_tokens"),
    ("model", "descriptor_hidden_dim"),
    ("model", "fingerprint_hidden_dim"),
    ("model", "forest_trees"),
    ("model", "forest_depth"),  # 0 = unlimited
    ("model", "chemnet_calibration_folds"),  # 0 = no calibration
    ("train", "num_threads"),
    ("train", "weight_decay"),
    ("train", "gradient_clip"),  # 0 = no clipping (as in Lightning's Trainer)
    ("infer", "num_workers"),
    ("infer", "num_threads"),
)
# Probabilities: dropout rates must lie in [0, 1).
DROPOUT_RATES = (("model", "dropout"), ("model", "fingerprint_dropout"))
# Scales, tolerances and timeouts: 0 or less has no meaning (a scale of 0 divides by zero).
POSITIVE = (
    ("model", "sum_pooling_scale"),
    ("model", "chemnet_c"),
    ("model", "kernel_ridge"),
    ("train", "learning_rate"),
    ("logging", "connect_timeout_s"),
    ("export", "parity_tolerance"),
    ("infer", "server_timeout_s"),
    ("serving", "ready_timeout_s"),
    ("serving", "stop_timeout_s"),
    ("serving", "exit_timeout_s"),
)


def _value(config: Config, path: tuple[str, ...]) -> object:
    node: object = config
    for name in path:
        node = getattr(node, name)
    return node


def check_ranges(config: Config) -> None:
    for path in AT_LEAST_ONE:
        if (value := _value(config, path)) < 1:
            raise ConfigError(f"{'.'.join(path)}={value}: must be at least 1")
    for path in AT_LEAST_ZERO:
        if (value := _value(config, path)) < 0:
            raise ConfigError(f"{'.'.join(path)}={value}: must be 0 or more")
    for path in DROPOUT_RATES:
        if not 0.0 <= (value := _value(config, path)) < 1.0:
            raise ConfigError(f"{'.'.join(path)}={value}: a dropout rate must be in [0, 1)")
    for path in POSITIVE:
        if not (value := _value(config, path)) > 0.0:
            raise ConfigError(f"{'.'.join(path)}={value}: must be positive")
    # Was quietly cut to 0.5: a share of the schedule's steps.
    if not 0.0 <= (value := config.train.warmup_fraction) < 1.0:
        raise ConfigError(f"train.warmup_fraction={value}: a fraction of the steps, in [0, 1)")
    # The averaged output is (1 - weight) * GNN + weight * fingerprint member.
    if not 0.0 <= (value := config.model.fingerprint_weight) <= 1.0:
        raise ConfigError(f"model.fingerprint_weight={value}: a share, in [0, 1]")
    if not 0.0 <= (value := config.model.forest_weight) <= 1.0:
        raise ConfigError(f"model.forest_weight={value}: a share, in [0, 1]")
    check_member_shares(config.model, config.preprocess)
    if config.model.chemnet_weight > 0 and config.data.task != "classification":
        raise ConfigError(
            f"model.chemnet_weight={config.model.chemnet_weight}: the ChemNet member is a "
            f"classifier; data.task={config.data.task!r} needs model.chemnet_weight=0"
        )
    if config.preprocess.smiles_tokens == 1:
        raise ConfigError(
            "preprocess.smiles_tokens=1: room for the end mark alone; 0 (none) or at least 2 "
            "(ChemNet reads 350)"
        )
    if not 0.0 <= (value := config.model.forest_max_features) <= 1.0:
        raise ConfigError(
            f"model.forest_max_features={value}: a share of the features, in (0, 1], or 0 for "
            "scikit-learn's default"
        )


def check_member_shares(model: ModelConfig, preprocess: PreprocessConfig) -> None:
    """The forest's, the kernel's and ChemNet's shares of the averaged output leave the network
    the rest."""
    if not 0.0 <= (value := model.kernel_weight) <= 1.0:
        raise ConfigError(f"model.kernel_weight={value}: a share, in [0, 1]")
    if model.kernel_weight > 0 and preprocess.kernel_fingerprint.size == 0:
        raise ConfigError(
            f"model.kernel_weight={model.kernel_weight}: the kernel member reads the counts of "
            "preprocess.kernel_fingerprint, whose size is 0; set e.g. "
            "preprocess.kernel_fingerprint.size=1024"
        )
    if not 0.0 <= (value := model.chemnet_weight) <= 1.0:
        raise ConfigError(f"model.chemnet_weight={value}: a share, in [0, 1]")
    if model.chemnet_weight > 0 and preprocess.smiles_tokens == 0:
        raise ConfigError(
            f"model.chemnet_weight={model.chemnet_weight}: the ChemNet member reads "
            "preprocess.smiles_tokens, which is 0; set preprocess.smiles_tokens=350 (or use "
            "model=dense_gnn_chemnet, which sets both)"
        )
    if model.chemnet_calibration_folds == 1:
        raise ConfigError(
            "model.chemnet_calibration_folds=1: one fold leaves nothing to fit on; 0 (no "
            "calibration) or at least 2"
        )
    forest_share = model.forest_weight if model.forest_trees > 0 else 0.0
    if forest_share + model.kernel_weight + model.chemnet_weight > 1.0 + 1e-9:
        raise ConfigError(
            f"model.forest_weight={model.forest_weight} + model.kernel_weight="
            f"{model.kernel_weight} + model.chemnet_weight={model.chemnet_weight} > 1: they "
            "are shares of one averaged output"
        )


def _settings(node: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted name, default value) of every section and setting under a config dataclass."""
    for setting in dataclasses.fields(node):
        value, name = getattr(node, setting.name), f"{prefix}{setting.name}"
        yield name, value
        if dataclasses.is_dataclass(value):
            yield from _settings(value, f"{name}.")


def setting_names() -> list[str]:
    """Every section and setting of the config, dotted: "train", "train.patience"."""
    return [name for name, _ in _settings(Config())]


def mapping_settings() -> set[str]:
    """Settings whose value is a mapping: data.label_map, serving.python_backend."""
    return {name for name, value in _settings(Config()) if isinstance(value, dict)}


def _with_mapping_prefix(override: str, mappings: set[str]) -> str:
    """Hydra refuses the form people type for a mapping, `data.label_map={yes: 1, no: 0}`
    ("Could not override 'data.label_map'", then a suggestion of `+`, which fails too): it takes
    only `++data.label_map=...`. The plain form is read as that one, which merges the keys given
    into the mapping as Hydra merges any other mapping override."""
    key = override.split("=", 1)[0]
    return f"++{override}" if key in mappings else override


def unknown_setting_message(key: str) -> str:
    """For an override of a setting that does not exist. Hydra's own message suggests adding it
    with `+`, which fails in turn; a typo wants the setting's real name."""
    import difflib  # only on this error path, not in every command's start-up

    known = setting_names()
    message = f"{key}: no such setting"
    # Not the key's own section ("train" for train.zzz): its settings are listed below instead.
    candidates = [name for name in known if not key.startswith(f"{name}.")]
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if close:
        return f"{message}; did you mean {' or '.join(close)}?"
    section = key.rpartition(".")[0]
    if section in known:
        settings = [
            name.rpartition(".")[2] for name in known if name.rpartition(".")[0] == section
        ]
        return f"{message}; {section} has {', '.join(settings)}"
    sections = [name for name in known if "." not in name]
    return f"{message}; the sections are {', '.join(sections)}"


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose `configs/` with Hydra overrides (`model.hidden_dim=256`) into a typed Config."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    mappings = mapping_settings()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            composed = compose(
                config_name=CONFIG_NAME,
                overrides=[_with_mapping_prefix(override, mappings) for override in overrides],
            )
    except ConfigCompositionException as error:
        unknown = re.match(r"Could not override '([^']+)'", str(error))
        if unknown is None or unknown.group(1) in setting_names():
            raise
        raise ConfigError(unknown_setting_message(unknown.group(1))) from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), composed)
    except ConfigKeyError as error:  # `+train.max_epoch=3`: added, then not in the schema
        raise ConfigError(unknown_setting_message(error.full_key)) from None
    config = OmegaConf.to_object(merged)
    check_choices(config)
    check_ranges(config)
    check_targets(config.data)
    check_fractions(config.data.split)
    check_descriptors(config.preprocess)
    check_ports(config.serving)
    return config


def to_flat_dict(config: Config) -> dict[str, str]:
    """`{"model.hidden_dim": "256", ...}`: the resolved config as MLflow params."""
    from omegaconf import OmegaConf

    flat: dict[str, str] = {}

    def visit(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)

    visit("", OmegaConf.to_container(OmegaConf.structured(config), resolve=True))
    return flat
