"""mol_props.config: every option of every group in configs/ composes into the typed schema with
its own values, and a typo fails loudly instead of being ignored."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from mol_props.config import Config, compose_config, config_dir, mapping_settings, to_flat_dict
from mol_props.errors import ConfigError

# Options that cannot compose alone, with the value each needs (as configs/data/csv.yaml shows).
REQUIRED_WITH = {("data", "csv"): ["data.path=molecules.csv"]}


def config_options() -> list[tuple[str, str]]:
    """(group, option) for every YAML file in a group folder of configs/, nested groups too."""
    root = config_dir()
    return sorted(
        (path.parent.relative_to(root).as_posix(), path.stem) for path in root.glob("*/**/*.yaml")
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Parametrized from the folder at collection time, so a new option file is tested unasked.
    if "group_option" in metafunc.fixturenames:
        options = config_options()
        metafunc.parametrize(
            "group_option", options, ids=[f"{group}={option}" for group, option in options]
        )


def node_for(config: Config, group: str) -> object:
    node: object = config
    for part in group.split("/"):
        node = getattr(node, part)
    return node


def test_every_option_composes_with_its_own_values(group_option: tuple[str, str]):
    group, option = group_option
    extra = REQUIRED_WITH.get(group_option, [])
    config = compose_config([f"{group}={option}", *extra])
    assert isinstance(config, Config)
    path = config_dir() / group / f"{option}.yaml"
    # Interpolations (`${train.models_dir}/best.ckpt`) are resolved against the whole config.
    whole = OmegaConf.create(
        {**OmegaConf.to_container(OmegaConf.structured(config)), "_file": OmegaConf.load(path)}
    )
    written = OmegaConf.to_container(whole, resolve=True)["_file"]
    written.pop("defaults", None)
    if path.read_text().startswith("# @package _global_"):
        # A preset that sets keys of several sections (train=small_data): {section: {key: value}}.
        sections = {
            section: (node_for(config, section), values) for section, values in written.items()
        }
    else:
        sections = {group: (node_for(config, group), written)}
    overridden = {override.split("=")[0].rsplit(".", 1)[-1] for override in extra}
    for section, (node, values) in sections.items():
        composed = dataclasses.asdict(node)
        for key, value in values.items():
            if key not in overridden:
                if isinstance(value, dict):  # a nested section: the keys the file sets
                    for name, setting in value.items():
                        where = f"{group}={option}: {section}.{key}.{name}"
                        assert composed[key][name] == setting, where
                else:
                    assert composed[key] == value, f"{group}={option}: {section}.{key}"


def test_every_group_folder_is_a_config_section():
    folders = {path.name for path in config_dir().iterdir() if path.is_dir()}
    assert folders == {field.name for field in dataclasses.fields(Config)}
    assert len(config_options()) >= len(folders)


def test_config_dir_is_the_checkout_configs():
    assert config_dir() == Path(__file__).resolve().parents[1] / "configs"


def test_override_is_applied_and_typed():
    config = compose_config(["model.hidden_dim=7", "data/split=random", "train.learning_rate=0.5"])
    assert config.model.hidden_dim == 7 and isinstance(config.model.hidden_dim, int)
    assert config.data.split.kind == "random"
    assert config.train.learning_rate == 0.5
    flat = to_flat_dict(config)
    assert flat["model.hidden_dim"] == "7" and flat["data.split.kind"] == "random"


def test_models_dir_moves_every_model_file_and_an_explicit_path_still_wins():
    config = compose_config(["train.models_dir=elsewhere"])
    assert config.export.checkpoint == "elsewhere/best.ckpt"
    assert config.export.onnx_path == "elsewhere/model.onnx"
    # Inference reads what export writes.
    assert config.infer.model_path == config.export.dynamic_onnx_path
    assert config.infer.model_path == "elsewhere/model_dynamic_atoms.onnx"
    assert config.infer.metadata_path == "elsewhere/model.json"
    config = compose_config(["train.models_dir=elsewhere", "infer.model_path=mine.onnx"])
    assert config.infer.model_path == "mine.onnx"
    assert to_flat_dict(config)["export.checkpoint"] == "elsewhere/best.ckpt"


@pytest.mark.parametrize("prefix", ["", "++"])
def test_a_mapping_setting_takes_the_form_people_type(prefix: str):
    # Hydra alone refuses `data.label_map={...}` ("Could not override") and wants `++`.
    config = compose_config(["data=csv", "data.path=x.csv", f"{prefix}data.label_map={{yes: 1}}"])
    assert config.data.label_map == {"yes": 1.0}
    merged = compose_config([f"{prefix}data.label_map={{active: 1, inactive: 0}}"])
    assert merged.data.label_map == {"BBB+": 1.0, "BBB-": 0.0, "active": 1.0, "inactive": 0.0}
    served = compose_config([f"{prefix}serving.python_backend={{shm-default-byte-size: 1000}}"])
    assert served.serving.python_backend["shm-default-byte-size"] == "1000"
    assert mapping_settings() == {"data.label_map", "serving.python_backend"}


@pytest.mark.parametrize(
    ("overrides", "error", "names"),
    [
        # Hydra's own message suggested adding the key with `+`, which fails in turn.
        (["model.hiden_dim=3"], ConfigError, "model.hiden_dim: .* did you mean model.hidden_dim"),
        (["+model.hiden_dim=3"], ConfigError, "model.hiden_dim: .* did you mean model.hidden_dim"),
        (["dat=csv"], ConfigError, "dat: no such setting; did you mean data?"),
        (
            ["train.qqqqqqqq=1"],
            ConfigError,
            "train.qqqqqqqq: no such setting; train has seed, max_",
        ),
        (["zzz.zzz=1"], ConfigError, "zzz.zzz: no such setting; the sections are data, preproc"),
        (["model.hidden_dim=three"], ValidationError, "three"),
        (["model=dense_gn"], MissingConfigException, "dense_gn"),
        (["data=csv"], MissingMandatoryValue, "path"),
        (["data.task=clasification"], ValueError, "data.task='clasification'"),
        (["data.split.kind=scafold"], ValueError, "scaffold, random or column"),
        (["model.conv=gcn"], ValueError, "gin, graph"),
        (["train.max_epochs=0"], ConfigError, "train.max_epochs=0: must be at least 1"),
        (["train.batch_size=-4"], ConfigError, "train.batch_size=-4"),
        (
            ["model.dropout=1.0"],
            ConfigError,
            r"model.dropout=1.0: a dropout rate must be in \[0, 1\)",
        ),
        (["train.learning_rate=0"], ConfigError, "train.learning_rate=0.0: must be positive"),
        (
            ["model.forest_weight=1.5"],
            ConfigError,
            r"model.forest_weight=1.5: a share, in \[0, 1\]",
        ),
        (
            ["model.forest_max_features=1.5"],
            ConfigError,
            r"model.forest_max_features=1.5: a share of the features",
        ),
        (
            ["model.forest_class_weight=balance"],
            ValueError,
            "model.forest_class_weight='balance': expected one of balanced_subsample, balanced",
        ),
        (["infer.num_workers=-1"], ConfigError, "infer.num_workers=-1: must be 0 or more"),
        (["data.target_columns=[]"], ConfigError, "data.target_columns is empty"),
        (
            ["preprocess.descriptors=[]", "preprocess.fingerprint.size=0"],
            ConfigError,
            "model.descriptor_hidden_dim=0",
        ),
        (["serving.http_port=70000"], ConfigError, "serving.http_port=70000: a port is"),
        (["serving.grpc_port=8000"], ConfigError, "ports must differ"),
        (["data.target_columns=[y,y]"], ConfigError, r"\['y'\] listed more than once"),
        (
            ["data.target_columns=[a,b]", "data.target_names=[a]"],
            ConfigError,
            "one name per target column",
        ),
        (
            ["data.split.fractions=[0.8,0.2]"],
            ConfigError,
            "data.split.fractions must be 3 numbers summing to 1",
        ),
        (
            ["preprocess.fingerprint.size=-5"],
            ConfigError,
            "preprocess.fingerprint.size=-5: must be 0 or more",
        ),
        (["train.gradient_clip=-1"], ConfigError, "train.gradient_clip=-1.0: must be 0 or more"),
        (["train.warmup_fraction=1.5"], ConfigError, r"warmup_fraction=1.5: .* in \[0, 1\)"),
        (["model.fingerprint_weight=2"], ConfigError, r"fingerprint_weight=2.0: a share"),
        (
            ["model.kernel_weight=0.3"],
            ConfigError,
            "kernel_weight=0.3: the kernel member reads the counts of "
            "preprocess.kernel_fingerprint, whose size is 0",
        ),
        (
            ["preprocess.kernel_fingerprint.size=64", "model.kernel_weight=0.4"],
            ConfigError,
            r"model.forest_weight=0.7 \+ model.kernel_weight=0.4 \+ model.chemnet_weight=0.0 > 1",
        ),
        (["model.kernel_ridge=0"], ConfigError, "kernel_ridge=0.0: must be positive"),
        (
            ["preprocess.kernel_fingerprint.size=-1"],
            ConfigError,
            "preprocess.kernel_fingerprint.size=-1: must be 0 or more",
        ),
        (["model.sum_pooling_scale=0"], ConfigError, "sum_pooling_scale=0.0: must be positive"),
        (["export.parity_tolerance=0"], ConfigError, "parity_tolerance=0.0: must be positive"),
        (["infer.server_timeout_s=-1"], ConfigError, "server_timeout_s=-1.0: must be positive"),
    ],
)
def test_mistakes_fail_loudly(overrides: list[str], error: type[Exception], names: str):
    with pytest.raises(error, match=names):
        compose_config(overrides)
