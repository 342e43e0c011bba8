"""scripts/onnx2trt.sh: arguments, shapes read from the real exported ONNX model, clear errors
without trtexec or a GPU, and the full flow against a fake trtexec (TensorRT needs a GPU, and
there is none here)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mol_props.export import onnx_input_shapes
from mol_props.infer import ModelMetadata

from .conftest import REPO_ROOT, ExportedModel

SCRIPT = REPO_ROOT / "scripts" / "onnx2trt.sh"
TRITON_TRT_CONFIG = REPO_ROOT / "triton_repo" / "mol_props_trt" / "config.pbtxt"
DEFAULT_ENGINE = REPO_ROOT / "triton_repo" / "mol_props_trt" / "1" / "model.plan"
SYSTEM_PATH = "/usr/bin:/bin"  # coreutils, sed, grep; no trtexec, no nvidia-smi (checked)


def triton_max_batch_size() -> int:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(TRITON_TRT_CONFIG.read_text(), model_config_pb2.ModelConfig())
    return config.max_batch_size


def run_script(*args: str, path: str = SYSTEM_PATH, **env: str) -> subprocess.CompletedProcess:
    """The script with a controlled PATH; python for the shape reader is this interpreter."""
    environment = {
        "PATH": path,
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def trtexec_flags(command_line: str) -> dict[str, str]:
    """--name=value flags of a printed trtexec command (bare flags map to "")."""
    words = shlex.split(command_line)
    assert Path(words[0]).name == "trtexec", command_line
    flags = {}
    for word in words[1:]:
        name, _, value = word.partition("=")
        flags[name] = value
    return flags


def expected_shapes(metadata: ModelMetadata, batch: int) -> str:
    atoms, width = metadata.max_atoms, metadata.atom_feature_size
    return (
        f"atom_features:{batch}x{atoms}x{width},adjacency:{batch}x{atoms}x{atoms},"
        f"atom_mask:{batch}x{atoms},descriptors:{batch}x{metadata.descriptor_size}"
    )


@pytest.fixture(scope="module")
def metadata(exported_model: ExportedModel) -> ModelMetadata:
    return ModelMetadata.load(exported_model.metadata_path)


@pytest.fixture(scope="module")
def system_without_tensorrt() -> None:
    """The error-path tests need a PATH with neither trtexec nor nvidia-smi on it."""
    for tool in ("trtexec", "nvidia-smi"):
        if shutil.which(tool, path=SYSTEM_PATH):
            pytest.skip(f"{tool} is installed in {SYSTEM_PATH}")
    if Path("/usr/src/tensorrt/bin/trtexec").exists():
        pytest.skip("TensorRT's trtexec is installed")


def fake_tool(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def fake_trtexec(folder: Path, record: Path, status: int = 0) -> Path:
    """A stand-in for TensorRT's trtexec: records its arguments and writes a fake engine."""
    return fake_tool(
        folder,
        "trtexec",
        f"# FAKE trtexec for tests: not TensorRT.\n"
        f'printf "%s\\n" "$@" > {shlex.quote(str(record))}\n'
        'for argument in "$@"; do\n'
        '  case "$argument" in --saveEngine=*) echo "fake engine" > "${argument#*=}" ;; esac\n'
        "done\n"
        f"exit {status}\n",
    )


def fake_nvidia_smi(folder: Path) -> Path:
    return fake_tool(folder, "nvidia-smi", 'echo "GPU 0: FAKE GPU for tests (UUID: GPU-0)"\n')


# --- arguments ----------------------------------------------------------------------------------


def test_help_lists_the_options_and_the_triton_batch_default():
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--onnx", "--output", "--fp16", "--min-batch", "--opt-batch", "--max-batch"):
        assert option in result.stdout
    assert f"config.pbtxt, {triton_max_batch_size()})" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--max-batch", "0"], "--max-batch needs a positive integer"),
        (["--opt-batch=many"], "--opt-batch needs a positive integer"),
        (["--min-batch", "8", "--max-batch", "4"], "--min-batch <= --opt-batch <= --max-batch"),
        (["--onnx"], "--onnx needs a value"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args: list[str], message: str):
    result = run_script(*args)
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr


def test_missing_onnx_model_names_the_export_command(tmp_path: Path):
    result = run_script("--onnx", str(tmp_path / "model.onnx"), "--dry-run")
    assert result.returncode == 1
    assert f"ONNX model {tmp_path / 'model.onnx'} not found" in result.stderr
    assert "mol_props export" in result.stderr


# --- shapes from the real exported model ---------------------------------------------------------


def test_dry_run_reads_the_shapes_from_the_exported_model(
    exported_model: ExportedModel, metadata: ModelMetadata
):
    result = run_script("--onnx", str(exported_model.onnx_path), "--dry-run")
    assert result.returncode == 0, result.stderr
    flags = trtexec_flags(result.stdout)
    max_batch = triton_max_batch_size()  # Triton sends batches up to this: the engine must fit
    assert flags["--onnx"] == str(exported_model.onnx_path)
    assert flags["--minShapes"] == expected_shapes(metadata, 1)
    assert flags["--optShapes"] == expected_shapes(metadata, max_batch)
    assert flags["--maxShapes"] == expected_shapes(metadata, max_batch)
    assert flags["--saveEngine"] == str(DEFAULT_ENGINE)
    assert "--fp16" not in flags  # fp32 unless asked


def test_dry_run_with_fp16_custom_batches_and_extra_options(
    exported_model: ExportedModel, metadata: ModelMetadata, tmp_path: Path
):
    engine = tmp_path / "engines" / "model.plan"
    result = run_script(
        f"--onnx={exported_model.onnx_path}",
        "--fp16",
        "--min-batch",
        "2",
        "--opt-batch",
        "16",
        "--max-batch",
        "512",
        "--output",
        str(engine),
        "--dry-run",
        "--",
        "--verbose",
    )
    assert result.returncode == 0, result.stderr
    flags = trtexec_flags(result.stdout)
    assert flags["--minShapes"] == expected_shapes(metadata, 2)
    assert flags["--optShapes"] == expected_shapes(metadata, 16)
    assert flags["--maxShapes"] == expected_shapes(metadata, 512)
    assert flags["--fp16"] == "" and flags["--verbose"] == ""
    assert flags["--saveEngine"] == str(engine)
    assert not engine.parent.exists()  # a dry run writes nothing


def test_a_max_batch_below_tritons_is_warned_about(exported_model: ExportedModel):
    result = run_script("--onnx", str(exported_model.onnx_path), "--max-batch", "8", "--dry-run")
    assert result.returncode == 0
    assert "Triton will refuse to load this engine" in result.stderr


def test_the_dynamic_atoms_model_is_refused(exported_model: ExportedModel):
    result = run_script("--onnx", str(exported_model.dynamic_onnx_path), "--dry-run")
    assert result.returncode == 1
    assert "dynamic axes besides the batch" in result.stderr
    assert "models/model.onnx" in result.stderr


def load_shape_reader():
    spec = importlib.util.spec_from_file_location("onnx_shapes", SCRIPT.parent / "onnx_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["onnx_path", "dynamic_onnx_path"])
def test_standard_library_shape_reader_agrees_with_onnx(exported_model: ExportedModel, name: str):
    """The containers have python3 but not the onnx package: the script reads protobuf itself."""
    path = getattr(exported_model, name)
    assert load_shape_reader().read_input_shapes(path) == onnx_input_shapes(path)


def test_shape_reader_rejects_a_file_that_is_not_onnx(exported_model: ExportedModel):
    reader = load_shape_reader()
    with pytest.raises(reader.ShapeError):
        reader.read_input_shapes(exported_model.metadata_path)


# --- running trtexec -----------------------------------------------------------------------------


def test_missing_trtexec_is_a_clear_error(
    exported_model: ExportedModel, system_without_tensorrt: None
):
    result = run_script("--onnx", str(exported_model.onnx_path))
    assert result.returncode == 3
    assert "trtexec not found" in result.stderr
    assert "TensorRT container" in result.stderr


def test_missing_gpu_is_a_clear_error_with_fake_trtexec(
    exported_model: ExportedModel, system_without_tensorrt: None, tmp_path: Path
):
    tools = tmp_path / "bin"
    fake_trtexec(tools, tmp_path / "args.txt")
    result = run_script("--onnx", str(exported_model.onnx_path), path=f"{tools}:{SYSTEM_PATH}")
    assert result.returncode == 4
    assert "no NVIDIA GPU visible" in result.stderr
    assert not (tmp_path / "args.txt").exists()  # trtexec never ran


def test_full_flow_with_fake_trtexec(
    exported_model: ExportedModel, metadata: ModelMetadata, tmp_path: Path
):
    tools, record = tmp_path / "bin", tmp_path / "args.txt"
    fake_trtexec(tools, record)
    fake_nvidia_smi(tools)
    engine = tmp_path / "repo" / "mol_props_trt" / "1" / "model.plan"
    result = run_script(
        "--onnx",
        str(exported_model.onnx_path),
        "--output",
        str(engine),
        "--fp16",
        path=f"{tools}:{SYSTEM_PATH}",
    )
    assert result.returncode == 0, result.stderr
    assert engine.read_text() == "fake engine\n"
    arguments = record.read_text().splitlines()
    flags = dict(argument.partition("=")[::2] for argument in arguments)
    assert flags["--onnx"] == str(exported_model.onnx_path)
    assert flags["--minShapes"] == expected_shapes(metadata, 1)
    assert flags["--maxShapes"] == expected_shapes(metadata, triton_max_batch_size())
    assert "--fp16" in arguments
    # Written beside the engine, then moved into place: no half-written model.plan for Triton.
    assert re.fullmatch(r".*/\.model\.plan\.partial", flags["--saveEngine"])
    assert sorted(path.name for path in engine.parent.iterdir()) == ["model.plan"]
    assert f"engine written to {engine}" in result.stderr


def test_a_failing_trtexec_fails_the_script_with_fake_trtexec(
    exported_model: ExportedModel, tmp_path: Path
):
    tools = tmp_path / "bin"
    fake_trtexec(tools, tmp_path / "args.txt", status=7)
    fake_nvidia_smi(tools)
    engine = tmp_path / "out" / "model.plan"
    result = run_script(
        "--onnx",
        str(exported_model.onnx_path),
        "--output",
        str(engine),
        path=f"{tools}:{SYSTEM_PATH}",
    )
    assert result.returncode == 7
    assert "trtexec failed with exit status 7" in result.stderr
    assert list(engine.parent.iterdir()) == []  # neither an engine nor a partial one
