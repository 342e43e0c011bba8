"""Training on real molecules: the loss falls, an interrupted run resumes to the same weights,
metrics reach a real MLflow server, and a missing server neither hangs nor fails the run."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mol_props import export, train
from mol_props.config import compose_config
from mol_props.data import prepare_data
from mol_props.errors import ConfigError
from mol_props.featurize import Featurizer
from mol_props.infer import ModelMetadata
from mol_props.tracking import RunLogger
from tests.conftest import (
    REPO_ROOT,
    TINY_MODEL,
    new_network,
    run_process,
    workspace_overrides,
    write_molecule_csv,
)


@pytest.fixture(scope="module")
def molecules_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_molecule_csv(tmp_path_factory.mktemp("train_data") / "molecules.csv", 200)


def _config(root: Path, data_path: Path, *extra: str):
    return compose_config(
        workspace_overrides(root, data_path) + TINY_MODEL + ["train.export_after=false", *extra]
    )


def test_a_few_steps_lower_the_loss(tmp_path, molecules_csv):
    config = _config(tmp_path, molecules_csv)
    data = prepare_data(config.data, config.preprocess, progress=False)
    featurizer = Featurizer(config.preprocess)
    torch.manual_seed(0)
    network = new_network(featurizer, config.model)
    descriptors = np.stack([graph.descriptors for graph in data.graphs])
    network.set_descriptor_scaling(
        torch.from_numpy(descriptors.mean(0)), torch.from_numpy(descriptors.std(0))
    )
    batch = train.collate(list(zip(data.graphs, data.targets)))
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        outputs = network(
            batch["atom_features"], batch["adjacency"], batch["atom_mask"], batch["descriptors"]
        )
        return train.masked_loss(outputs, batch["targets"], "classification")

    network.eval()
    with torch.no_grad():
        before = loss().item()
    network.train()
    for _ in range(50):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    network.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_process_gets_as_many_batches_and_every_molecule_one(world_size):
    sizes = np.random.default_rng(0).integers(5, 40, size=200)  # 7 batches: 4 + 3 per pool
    generator = torch.Generator().manual_seed(0)
    per_process = []
    for rank in range(world_size):
        generator.manual_seed(0)  # every process draws the same order, as in training
        sampler = train.SizeGroupedBatchSampler(
            sizes, 32, generator, pool_batches=4, rank=rank, world_size=world_size
        )
        batches = list(sampler)
        assert len(batches) == len(sampler)
        per_process.append(batches)
    # Unequal counts would leave one DDP process waiting for the others' gradients forever.
    assert len({len(batches) for batches in per_process}) == 1
    seen = [index for batches in per_process for batch in batches for index in batch]
    assert set(seen) == set(range(len(sizes)))
    if world_size == 1:
        assert sorted(seen) == list(range(len(sizes)))


def test_two_process_ddp_run_trains_once_and_exports_once(tmp_path, molecules_csv):
    # Two CPU processes (gloo), 160 training molecules in 5 batches of 32: an odd count.
    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # export fills a copy
    overrides = workspace_overrides(tmp_path, molecules_csv) + TINY_MODEL
    settings = ["train.max_epochs=2", "train.accelerator=cpu", "train.devices=2"]
    process = run_process(
        ["train", *overrides, *settings, "train.strategy=ddp"], cwd=tmp_path, timeout=400
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("done: 2 epochs") == 1, process.stdout
    # The summary line gives each member's main metric after the average's (forest on by default).
    assert re.search(
        r"test roc_auc=[\d.]+.*, network_roc_auc=[\d.]+, forest_roc_auc=", process.stdout
    )
    assert process.stdout.count("export: parity ONNX Runtime vs PyTorch") == 1, process.stdout
    assert len(list((tmp_path / "plots").glob("csv-*"))) == 1  # one run directory
    assert (tmp_path / "models" / "model.onnx").is_file()


@pytest.mark.parametrize("gradient_clip", [0.0, 1.0])
def test_an_epoch_moves_the_weights_with_or_without_clipping(
    tmp_path, molecules_csv, gradient_clip
):
    # gradient_clip=0 means no clipping; clipping to a norm of 0 would zero every gradient.
    config = _config(tmp_path, molecules_csv, f"train.gradient_clip={gradient_clip}")
    data = prepare_data(config.data, config.preprocess, progress=False)
    featurizer = Featurizer(config.preprocess)
    torch.manual_seed(0)
    network = new_network(featurizer, config.model)
    before = [parameter.detach().clone() for parameter in network.parameters()]
    fabric = train.make_fabric(config.train)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, weight_decay=0.0)
    model, optimizer = fabric.setup(network, optimizer)
    model.mark_forward_method("member_outputs")
    loader = train._eval_loader(
        train.MoleculeDataset(data.graphs, data.targets.astype(np.float32)), 32
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train.train_epoch(fabric, model, optimizer, scheduler, loader, config.train, "classification")
    moved = max(
        (after.detach() - start).abs().max().item()
        for after, start in zip(network.parameters(), before)
    )
    assert moved > 1e-4  # Adam steps are ~lr = 1e-3 per parameter


def test_masked_loss_ignores_missing_targets():
    outputs = torch.tensor([[0.3, 5.0], [-1.0, 2.0]])
    targets = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], targets[:, 0])
    torch.testing.assert_close(train.masked_loss(outputs, targets, "classification"), expected)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_resumed_run_ends_with_the_same_weights(tmp_path, molecules_csv, monkeypatch):
    uninterrupted = train.run(_config(tmp_path / "full", molecules_csv, "train.max_epochs=4"))
    expected = _weights(uninterrupted.checkpoint)

    interrupted_root = tmp_path / "interrupted"
    real_validate = train.validate
    calls = {"count": 0}

    def validate_then_die(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:  # Ctrl-C during epoch 3: epochs 1-2 are in last.ckpt
            raise KeyboardInterrupt
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(train, "validate", validate_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(_config(interrupted_root, molecules_csv, "train.max_epochs=4"))
    monkeypatch.setattr(train, "validate", real_validate)
    stopped = torch.load(interrupted_root / "checkpoints" / "last.ckpt", weights_only=False)
    assert stopped["epoch"] == 2

    resumed = train.run(
        _config(interrupted_root, molecules_csv, "train.max_epochs=4", "train.resume=true")
    )
    assert resumed.epochs_run == 4
    actual = _weights(resumed.checkpoint)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed.test_metrics == uninterrupted.test_metrics


def test_a_run_interrupted_in_the_refit_resumes_it_without_training_again(
    tmp_path, molecules_csv, monkeypatch
):
    settings = ("train.max_epochs=4", "train.refit=true")
    uninterrupted = train.run(_config(tmp_path / "full", molecules_csv, *settings))
    assert uninterrupted.refit_epochs == uninterrupted.best_epoch >= 1
    expected = _weights(uninterrupted.checkpoint)

    root = tmp_path / "interrupted"
    # A refit checkpoint left by another run (here: the finished one) is not resumed by a new
    # run: this run must train its own refit, or the interruption below never comes.
    (root / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "refit_last.ckpt", root / "checkpoints")
    real_train_epoch = train.train_epoch
    calls = {"count": 0}
    last_refit_epoch = uninterrupted.epochs_run + uninterrupted.refit_epochs

    def count_then_die(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == last_refit_epoch:  # Ctrl-C in the refit's last epoch
            raise KeyboardInterrupt
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", count_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(_config(root, molecules_csv, *settings))
    refit_state = torch.load(root / "checkpoints" / "refit_last.ckpt", weights_only=False)
    assert refit_state["epoch"] == uninterrupted.refit_epochs - 1

    calls["count"] = 0
    monkeypatch.setattr(train, "train_epoch", count_then_die)
    resumed = train.run(_config(root, molecules_csv, *settings, "train.resume=true"))
    # The finished selection is not trained again: one epoch, the refit's last, remained.
    assert calls["count"] == 1
    assert (resumed.best_epoch, resumed.refit_epochs) == (
        uninterrupted.best_epoch,
        uninterrupted.refit_epochs,
    )
    actual = _weights(resumed.checkpoint)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed.test_metrics == uninterrupted.test_metrics


def test_the_refit_trains_a_new_model_on_train_and_val(tmp_path, molecules_csv):
    config = _config(tmp_path, molecules_csv, "train.refit=true")
    result = train.run(config)
    shipped = torch.load(result.checkpoint, map_location="cpu", weights_only=False)
    assert shipped["trained_on"] == "train+val"
    # Descriptor scaling comes from the molecules a model trains on: here train and val.
    data = prepare_data(config.data, config.preprocess, progress=False)
    rows = np.concatenate([data.splits["train"], data.splits["val"]])
    descriptors = np.stack([data.graphs[i].descriptors for i in rows])
    np.testing.assert_allclose(
        shipped["model"]["descriptor_mean"].numpy(), descriptors.mean(axis=0), rtol=1e-6
    )
    selected = _weights(tmp_path / "checkpoints" / "best.ckpt")
    assert not torch.equal(selected["head.0.weight"], shipped["model"]["head.0.weight"])

    without = train.run(_config(tmp_path / "without", molecules_csv, "train.refit=false"))
    kept = torch.load(without.checkpoint, map_location="cpu", weights_only=False)
    assert kept["trained_on"] == "train" and without.refit_epochs == 0
    best = _weights(tmp_path / "without" / "checkpoints" / "best.ckpt")
    for name in best:
        torch.testing.assert_close(kept["model"][name], best[name], rtol=0, atol=0, msg=name)


def test_fingerprint_member_trains_and_exports_with_onnx_parity(tmp_path, molecules_csv):
    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # export fills a copy
    config = _config(
        tmp_path,
        molecules_csv,
        "preprocess.fingerprint.size=64",
        "model.fingerprint_hidden_dim=16",
    )
    result = train.run(config)
    weights = _weights(result.checkpoint)
    assert any(name.startswith("fingerprint_mlp.") for name in weights)
    rebuilt, _ = export.load_prediction_model(result.checkpoint)  # as export rebuilds it
    torch.testing.assert_close(rebuilt.network.member_weights, torch.tensor([0.7, 0.3]))
    assert result.test_metrics and all(np.isfinite(list(result.test_metrics.values())))
    exported = export.run(config)  # fails loudly above 1e-4 between ONNX Runtime and PyTorch
    assert exported.max_difference <= 1e-4
    metadata = ModelMetadata.load(exported.metadata_path)
    assert metadata.descriptor_size == len(config.preprocess.descriptors) + 64


@pytest.mark.parametrize("refit", [True, False])
def test_forest_member_fits_train_and_val_and_the_exported_model_scores_the_test_metric(
    tmp_path, molecules_csv, refit
):
    from sklearn.ensemble import RandomForestClassifier

    from mol_props.forest import TreeEnsemble, forest_features
    from mol_props.infer import LocalPredictor
    from mol_props.metrics import roc_auc

    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # export fills a copy
    config = _config(
        tmp_path,
        molecules_csv,
        "model.forest_trees=20",
        "model.forest_weight=0.4",
        f"train.refit={str(refit).lower()}",
    )
    result = train.run(config)
    payload = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    forest = TreeEnsemble.from_state(payload["forest"])
    assert forest.trees == 20
    assert payload["trained_on"] == ("train+val" if refit else "train")  # the network's rows

    # The forest is scikit-learn's, with the configured class weights, fitted on train + val
    # with or without the network's refit (it stops at no epoch).
    assert config.model.forest_class_weight == "balanced_subsample"
    data = prepare_data(config.data, config.preprocess, progress=False)

    def features(rows: np.ndarray) -> np.ndarray:
        return forest_features([data.graphs[i] for i in rows])  # Morgan counts included

    fitted = np.concatenate([data.splits["train"], data.splits["val"]])
    test = data.splits["test"]
    reference = RandomForestClassifier(
        20, class_weight="balanced_subsample", n_jobs=-1, random_state=config.train.seed
    )
    reference.fit(features(fitted), data.targets[fitted, 0])
    with torch.no_grad():
        ours = forest(torch.from_numpy(features(test)))[:, 0].numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(features(test))[:, 1], atol=1e-6)

    # The exported model carries the forest: ONNX Runtime matches PyTorch, and its predictions
    # on the test molecules score the test metric the run reported.
    exported = export.run(config)
    assert exported.max_difference <= 1e-4
    predictor = LocalPredictor(
        exported.dynamic_onnx_path, ModelMetadata.load(exported.metadata_path), config.infer
    )
    predicted = predictor.predict([data.smiles[i] for i in test]).values[:, 0]
    assert roc_auc(data.targets[test, 0], predicted) == pytest.approx(
        result.test_metrics["roc_auc"], abs=1e-6
    )


def test_a_model_without_the_descriptor_mlp_exports_every_input(tmp_path, molecules_csv):
    # The exporter drops inputs the model never reads; serving feeds all four to every model.
    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # export fills a copy
    config = _config(tmp_path, molecules_csv, "model.descriptor_hidden_dim=0")
    train.run(config)
    exported = export.run(config)  # checks the inputs of both ONNX files, then parity
    assert exported.max_difference <= 1e-4
    assert list(export.onnx_input_shapes(exported.onnx_path)) == export.INPUT_NAMES


def test_init_from_copies_all_but_the_output_layers(tmp_path, molecules_csv):
    source = train.run(_config(tmp_path / "source", molecules_csv, "train.max_epochs=1"))
    trained = _weights(source.checkpoint)
    config = _config(tmp_path / "target", molecules_csv)
    featurizer = Featurizer(config.preprocess)
    torch.manual_seed(1)
    network = new_network(featurizer, config.model)
    fresh = {name: tensor.clone() for name, tensor in network.state_dict().items()}

    copied = train.initialize_from(network, source.checkpoint)

    state = network.state_dict()
    assert "atom_embedding.layers.0.weight" in copied
    for name in copied:
        torch.testing.assert_close(state[name], trained[name], rtol=0, atol=0)
    for name in network.output_layer_names():
        assert name not in copied
        torch.testing.assert_close(state[name], fresh[name], rtol=0, atol=0)

    wider = _config(tmp_path / "other", molecules_csv, "model.hidden_dim=48")
    other = new_network(featurizer, wider.model)
    with pytest.raises(ValueError, match="tensors differ from this model"):
        train.initialize_from(other, source.checkpoint)
    with pytest.raises(FileNotFoundError, match="init_from"):
        train.initialize_from(other, tmp_path / "missing.ckpt")


def test_init_from_runs_end_to_end(tmp_path, molecules_csv, caplog):
    source = train.run(_config(tmp_path / "source", molecules_csv, "train.max_epochs=1"))
    with caplog.at_level(logging.INFO, logger="mol_props"):
        train.run(
            _config(tmp_path / "target", molecules_csv, f"train.init_from={source.checkpoint}")
        )
    assert f"from {source.checkpoint}" in caplog.text


def test_resume_with_another_schedule_is_a_clear_error(tmp_path, molecules_csv):
    # "Train it longer": the one-cycle schedule of the saved run ends at its own max_epochs;
    # resuming past it raised OneCycleLR's "Tried to step 7 times" after the first new epoch.
    train.run(_config(tmp_path, molecules_csv, "train.max_epochs=2"))
    with pytest.raises(
        train.TrainingError, match="saved with train.max_epochs=2.*train.init_from"
    ):
        train.run(_config(tmp_path, molecules_csv, "train.max_epochs=4", "train.resume=true"))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, molecules_csv):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        train.run(_config(tmp_path, molecules_csv, "train.resume=true"))


def test_resume_with_other_model_settings_is_a_clear_error(tmp_path, molecules_csv):
    train.run(_config(tmp_path, molecules_csv, "train.max_epochs=1"))
    wider = _config(tmp_path, molecules_csv, "train.resume=true", "model.hidden_dim=48")
    with pytest.raises(train.TrainingError, match="last.ckpt holds a model with other settings"):
        train.run(wider)


def test_the_monitored_metric_is_the_loss_when_validation_has_one_class():
    one_class = np.array([[0.0], [0.0], [np.nan]])
    both = np.array([[0.0], [1.0], [np.nan]])
    assert train.monitored_metric("classification", one_class) == ("loss", False)
    assert train.monitored_metric("classification", both) == ("roc_auc", True)
    # Two targets: one with both classes is enough for a (mean) ROC-AUC.
    assert train.monitored_metric("classification", np.hstack([one_class, both]))[0] == "roc_auc"
    assert train.monitored_metric("regression", one_class) == ("rmse", False)


def test_a_one_class_validation_split_trains_on_the_validation_loss(tmp_path, caplog):
    # B3DB's first 120 rows are all BBB-: no epoch could have the best validation ROC-AUC.
    table = write_molecule_csv(tmp_path / "negatives.csv", 120)
    with caplog.at_level(logging.WARNING, logger="mol_props"):
        result = train.run(_config(tmp_path, table, "train.max_epochs=2"))
    assert "use the validation loss" in caplog.text
    assert result.checkpoint.is_file() and result.epochs_run == 2


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.precision=16-mix", "Precision '16-mix' is invalid"),
        pytest.param(
            "train.accelerator=cuda",
            "CUDAAccelerator` can not run",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_fabric_settings_that_cannot_work_name_themselves(tmp_path, override, named):
    config = _config(tmp_path, tmp_path / "unused.csv", override)
    with pytest.raises(ConfigError, match=named) as caught:
        train.make_fabric(config.train)
    assert str(caught.value).startswith("train.accelerator=")


def test_a_lightning_message_reaches_the_console_once():
    """Logging as `mol_props train` sets it up, in a fresh interpreter: in this one, other
    tests have already added and changed handlers."""
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stderr)\n"
        "from lightning.fabric.utilities.seed import seed_everything\n"
        "from mol_props import train\n"
        "train.print_lightning_messages_once()\n"
        "seed_everything(0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("Seed set to 0") == 1


def test_a_table_too_large_for_the_kernel_is_refused_before_training(
    tmp_path, molecules_csv, monkeypatch
):
    from mol_props import kernel

    monkeypatch.setattr(kernel, "MAX_KERNEL_MOLECULES", 50)
    config = _config(
        tmp_path,
        molecules_csv,
        "preprocess.kernel_fingerprint.size=64",
        "model.kernel_weight=0.2",
    )
    with pytest.raises(ConfigError, match="the kernel member keeps every training molecule"):
        train.run(config)
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # no epoch was trained


def test_an_empty_validation_split_is_a_clear_error(tmp_path, molecules_csv):
    config = _config(tmp_path, molecules_csv, "data.split.fractions=[1.0,0.0,0.0]")
    with pytest.raises(ConfigError, match="the val split is empty"):
        train.run(config)


def test_a_diverging_run_is_a_clear_error_and_a_failed_mlflow_run(tmp_path, molecules_csv):
    from mlflow.tracking import MlflowClient

    with pytest.raises(train.TrainingError, match="diverged; try a lower train.learning_rate"):
        train.run(_config(tmp_path, molecules_csv, "train.learning_rate=1e6"))
    store = f"sqlite:///{(tmp_path / 'plots' / 'mlruns' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("mol_props").experiment_id])
    assert run.info.status == "FAILED"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free loopback port, once it answers: (process, url)."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers go with it when the test stops the group
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not become healthy in 120 s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` for this module."""
    process, url = _start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def test_a_server_that_stops_mid_run_costs_one_warning_not_the_run(tmp_path, caplog):
    # MLflow's own retries made one call wait ~4 minutes after the server went, then raise.
    process, url = _start_mlflow_server(tmp_path)
    try:
        config = compose_config([f"logging.tracking_uri={url}"]).logging
        tracker = RunLogger(config, "stops-mid-run")
        tracker.log_metrics({"train_loss": 0.5}, step=1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mol_props"):
        tracker.log_metrics({"train_loss": 0.4}, step=2)
        tracker.log_artifact(tmp_path / "server.log")
        tracker.finish()
    assert time.monotonic() - started < 60
    warnings = [record for record in caplog.records if "stopped answering" in record.message]
    assert len(warnings) == 1 and "training goes on" in warnings[0].message
    assert tracker.lost is not None


def test_run_is_logged_to_a_real_mlflow_server(tmp_path, molecules_csv, mlflow_server):
    from mlflow.tracking import MlflowClient

    config = _config(
        tmp_path,
        molecules_csv,
        f"logging.tracking_uri={mlflow_server}",
        "logging.experiment_name=test-logging",
        "logging.run_name=logged-run",
        "train.max_epochs=2",
    )
    result = train.run(config)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("test-logging")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "logged-run"
    assert run.data.params["model.hidden_dim"] == "32"
    assert run.data.params["train.max_epochs"] == "2"
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.tags["git_dirty"] in {"true", "false"}
    assert len(run.data.tags["data_md5"]) == 32
    history = client.get_metric_history(run.info.run_id, "val_roc_auc")
    assert [point.step for point in history] == [1, 2]
    assert run.data.metrics["test_roc_auc"] == pytest.approx(result.test_metrics["roc_auc"])
    for name in ("train_loss", "val_loss", "val_pr_auc", "val_mcc", "val_brier", "test_f1"):
        assert name in run.data.metrics, name
    # The refit (on by default) logs its own epochs, and the selected model's test metrics beside.
    refit_history = client.get_metric_history(run.info.run_id, "refit_train_loss")
    assert [point.step for point in refit_history] == list(range(1, result.refit_epochs + 1))
    assert "select_test_roc_auc" in run.data.metrics
    # The forest member (on by default): each member's own test metrics beside the average's.
    assert set(result.member_test_metrics) == {"network", "forest"}
    for member in ("network", "forest"):
        assert run.data.metrics[f"{member}_test_roc_auc"] == pytest.approx(
            result.member_test_metrics[member]["roc_auc"]
        )
    assert run.data.metrics["best_epoch"] == result.best_epoch
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/roc.png", "plots/calibration.png"} <= artifacts
    assert {item.path for item in client.list_artifacts(run.info.run_id, "model")} == {
        "model/best.ckpt"
    }
    # ... and the same figures and the log are in plots/<run>/.
    for name in ("learning_curves.png", "roc.png", "pr.png", "calibration.png", "train.log"):
        assert (result.run_directory / name).is_file(), name


def test_training_completes_when_the_server_is_down(tmp_path, molecules_csv, caplog):
    from mlflow.tracking import MlflowClient

    started = time.monotonic()
    result = train.run(_config(tmp_path, molecules_csv, "train.max_epochs=1"))
    assert time.monotonic() - started < 120
    assert "does not answer" in caplog.text
    store = f"sqlite:///{(tmp_path / 'plots' / 'mlruns' / 'mlflow.db').resolve()}"
    runs = MlflowClient(tracking_uri=store).search_runs(
        [MlflowClient(tracking_uri=store).get_experiment_by_name("mol_props").experiment_id]
    )
    assert len(runs) == 1
    assert runs[0].data.metrics["test_roc_auc"] == pytest.approx(result.test_metrics["roc_auc"])


def test_regression_targets_are_standardized_and_restored(tmp_path):
    """logBB in, logBB out: the scaler is saved with the model."""
    from tests.conftest import b3db_rows, write_logbb_csv

    data_path = write_logbb_csv(tmp_path / "logbb.csv", 150)
    rows = b3db_rows(150, "B3DB_regression.tsv")
    config = _config(
        tmp_path,
        data_path,
        "data.task=regression",
        "data.target_columns=[logBB]",
        "train.max_epochs=2",
    )
    result = train.run(config)
    payload = torch.load(result.checkpoint, weights_only=True)
    values = np.array([float(row["logBB"]) for row in rows])
    assert payload["target_mean"][0] == pytest.approx(values.mean(), abs=0.3)
    assert payload["target_std"][0] == pytest.approx(values.std(), rel=0.3)
    assert {"rmse", "mae", "r2"} <= set(result.test_metrics)
    assert (result.run_directory / "parity.png").is_file()
    assert (result.run_directory / "residuals.png").is_file()


def test_the_small_data_preset_serves_forest_and_kernel_and_the_exported_model_scores_it(
    tmp_path,
):
    from sklearn.kernel_ridge import KernelRidge

    from mol_props.infer import LocalPredictor
    from mol_props.kernel import TanimotoKernelRidge, tanimoto
    from mol_props.metrics import evaluate
    from tests.conftest import write_logbb_csv

    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # export fills a copy
    data_path = write_logbb_csv(tmp_path / "logbb.csv", 150)
    config = _config(
        tmp_path,
        data_path,
        "data.task=regression",
        "data.target_columns=[logBB]",
        "train=small_data",
        "train.max_epochs=2",
        "model.forest_trees=10",
    )
    assert (config.model.forest_weight, config.model.kernel_weight) == (0.7, 0.3)
    result = train.run(config)
    assert set(result.member_test_metrics) == {"network", "forest", "kernel"}
    payload = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    kernel = TanimotoKernelRidge.from_state(payload["kernel"])

    # scikit-learn's kernel ridge on the same counts, fitted on train + val (standardized values).
    data = prepare_data(config.data, config.preprocess, progress=False)
    size = config.preprocess.kernel_fingerprint.size
    fitted = np.concatenate([data.splits["train"], data.splits["val"]])
    test = data.splits["test"]
    counts = np.stack([graph.descriptors[-size:] for graph in data.graphs]).astype(np.float64)
    mean, std = payload["target_mean"][0], payload["target_std"][0]
    standardized = (data.targets[fitted, 0] - mean) / std
    reference = KernelRidge(alpha=config.model.kernel_ridge, kernel="precomputed")
    reference.fit(tanimoto(counts[fitted], counts[fitted]), standardized - standardized.mean())
    expected = reference.predict(tanimoto(counts[test], counts[fitted])) + standardized.mean()
    with torch.no_grad():
        ours = kernel(torch.from_numpy(counts[test].astype(np.float32)))[:, 0].numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    kernel_rmse = evaluate(
        data.targets[test], (expected * std + mean)[:, None], "regression", ["y"]
    )
    assert result.member_test_metrics["kernel"]["rmse"] == pytest.approx(
        kernel_rmse["rmse"], abs=1e-4
    )

    # The exported model carries both members: its predictions score the run's test RMSE.
    exported = export.run(config)
    assert exported.max_difference <= 1e-4
    predictor = LocalPredictor(
        exported.dynamic_onnx_path, ModelMetadata.load(exported.metadata_path), config.infer
    )
    predicted = predictor.predict([data.smiles[i] for i in test]).values
    served = evaluate(data.targets[test], predicted, "regression", ["y"])
    assert served["rmse"] == pytest.approx(result.test_metrics["rmse"], abs=1e-5)


def test_the_chemnet_preset_serves_its_member_and_infer_still_imports_no_torch(
    tmp_path, molecules_csv
):
    from mol_props.chemnet import ChemNetSVM
    from mol_props.infer import LocalPredictor
    from mol_props.metrics import roc_auc

    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # export fills a copy
    extra = ["model=dense_gnn_chemnet", "model.forest_trees=10", "train.max_epochs=2"]
    config = _config(tmp_path, molecules_csv, *extra)
    result = train.run(config)
    assert set(result.member_test_metrics) == {"network", "forest", "chemnet"}
    payload = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    member = ChemNetSVM.from_state(payload["chemnet"])
    assert member.token_count == 350 and member.support.shape[1] == 512
    # Platt-scaled over the training molecules' scaffold folds (the model's default 5).
    assert abs(member.margin_slope.item() - 1.0) > 0.01

    # The exported model carries the member: ONNX Runtime matches PyTorch, and its predictions
    # on the test molecules score the test metric the run reported.
    exported = export.run(config)
    assert exported.max_difference <= 1e-4
    metadata = ModelMetadata.load(exported.metadata_path)
    assert metadata.preprocess["smiles_tokens"] == 350
    data = prepare_data(config.data, config.preprocess, progress=False)
    test = data.splits["test"]
    predictor = LocalPredictor(exported.dynamic_onnx_path, metadata, config.infer)
    predicted = predictor.predict([data.smiles[i] for i in test]).values[:, 0]
    assert roc_auc(data.targets[test, 0], predicted) == pytest.approx(
        result.test_metrics["roc_auc"], abs=1e-6
    )

    # `mol_props infer` with it, in a fresh process: a probability, and still no torch.
    probe = (
        "import sys\n"
        "from mol_props import commands\n"
        "sys.argv = ['mol_props', 'infer', '--smiles', 'CN1CCC[C@H]1c1cccnc1', *sys.argv[1:]]\n"
        "try:\n"
        "    commands.main()\n"
        "except SystemExit as exit_:\n"
        "    print('EXIT', exit_.code, file=sys.stderr)\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    overrides = workspace_overrides(tmp_path, molecules_csv) + TINY_MODEL + extra
    process = subprocess.run(
        [sys.executable, "-c", probe, *overrides],
        cwd=REPO_ROOT,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "TORCH False" in process.stderr, process.stderr
    assert "EXIT" not in process.stderr or "EXIT 0" in process.stderr, process.stderr
    assert 0.0 <= json.loads(process.stdout)[metadata.targets[0]] <= 1.0


def test_two_classification_targets_with_missing_labels_train_and_export(tmp_path):
    # Multi-target classification end to end; the checkpoint's metrics must be plain floats for
    # export's torch.load(weights_only=True) (tests/test_metrics.py checks their types).
    from tests.conftest import b3db_rows

    shutil.copytree(REPO_ROOT / "triton_repo", tmp_path / "triton_repo")  # export fills a copy
    rows = b3db_rows(150)
    median_length = sorted(len(row["SMILES"]) for row in rows)[len(rows) // 2]
    lines = ["smiles,bbb,large"]
    for i, row in enumerate(rows):
        label = 1 if row["BBB+/BBB-"] == "BBB+" else 0
        large = "yes" if len(row["SMILES"]) > median_length else "no"  # text labels
        lines.append(f"{row['SMILES']},{label},{'' if i % 5 == 0 else large}")  # some missing
    data_path = tmp_path / "two_targets.csv"
    data_path.write_text("\n".join(lines) + "\n")
    config = _config(
        tmp_path,
        data_path,
        "data.target_columns=[bbb,large]",
        "++data.label_map={yes: 1, no: 0}",
        "train.max_epochs=2",
    )
    result = train.run(config)
    assert {"bbb/roc_auc", "large/roc_auc", "roc_auc"} <= set(result.test_metrics)
    exported = export.run(config)
    assert exported.max_difference <= 1e-4
    assert ModelMetadata.load(exported.metadata_path).targets == ["bbb", "large"]
