"""`mol_props serve`: starts a real server, prints its endpoints, and on Ctrl-C / SIGTERM stops it
with no process and no shared memory left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from mol_props.client import TritonPredictor
from mol_props.serve import SHARED_MEMORY_DIR, SHM_PREFIX_ROOT, ServeError, TritonServer, serve
from mol_props.triton_repo import rewrite_config

from .conftest import copy_repository, require_server_binary, server_config

READY_LINE = "Ctrl-C stops it."
SERVE_CODE = (
    "import sys\n"
    "from mol_props.config import compose_config\n"
    "from mol_props.serve import serve\n"
    "sys.exit(serve(compose_config(sys.argv[1:])))\n"
)


def shared_memory() -> set[str]:
    return {path.name for path in SHARED_MEMORY_DIR.glob(f"{SHM_PREFIX_ROOT}*")}


def overrides_for(config) -> list[str]:
    serving = config.serving
    return [
        f"serving.triton_repo={serving.triton_repo}",
        f"serving.work_dir={serving.work_dir}",
        f"serving.http_port={serving.http_port}",
        f"serving.grpc_port={serving.grpc_port}",
        f"serving.metrics_port={serving.metrics_port}",
    ]


def wait_for_line(process: subprocess.Popen, marker: str, timeout_s: float) -> list[str]:
    """Read the process's output until `marker` appears; fail after `timeout_s`."""
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                found.set()

    threading.Thread(target=reader, daemon=True).start()
    if not found.wait(timeout_s):
        process.kill()
        pytest.fail(f"no {marker!r} within {timeout_s} s:\n" + "".join(lines[-40:]))
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_answers_then_stops_cleanly(filled_repository: Path, tmp_path: Path, signum: int):
    require_server_binary()
    config = server_config(filled_repository, tmp_path / "work")
    before = shared_memory()
    # Its own session, like a shell job: Ctrl-C goes to the whole group, as a terminal sends it.
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_CODE, *overrides_for(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = wait_for_line(process, READY_LINE, timeout_s=90)
        printed = "".join(lines)
        assert f"http://127.0.0.1:{config.serving.http_port}" in printed
        assert f"grpc://127.0.0.1:{config.serving.grpc_port}" in printed
        children = psutil.Process(process.pid).children(recursive=True)
        assert any(child.name() == "tritonserver" for child in children)
        assert shared_memory() - before  # the python models are up, with their own regions
        # A client that keeps its connection open must not keep the server from stopping.
        predictor = TritonPredictor(f"http://127.0.0.1:{config.serving.http_port}", config)
        assert predictor.predict(["CCO"]).errors == [None]
        os.killpg(process.pid, signum)
        assert process.wait(timeout=config.serving.stop_timeout_s + 20) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    assert shared_memory() - before == set()
    printed = "".join(lines)
    assert "tritonserver stopped" in printed
    # Triton itself released everything: serve had no leftovers to clean up.
    assert "removed shared memory" not in printed
    assert "Exit timeout expired" not in printed


def test_serve_without_a_model_says_what_to_run(tmp_path: Path, capsys):
    repository = copy_repository(tmp_path / "triton_repo")
    config = server_config(
        repository,
        tmp_path / "work",
        [
            f"export.onnx_path={tmp_path}/models/model.onnx",
            f"export.metadata_path={tmp_path}/models/model.json",
            f"train.models_dir={tmp_path}/models",
        ],
    )
    assert serve(config) == 1
    assert "mol_props train" in capsys.readouterr().err


def test_tensorrt_needs_the_official_container(filled_repository: Path, tmp_path: Path):
    require_server_binary()
    config = server_config(filled_repository, tmp_path / "work", ["serving.backend=tensorrt"])
    server = TritonServer(config.serving)
    if server.bundled:
        with pytest.raises(ServeError, match="official Triton container"):
            server.check_repository()
    else:
        with pytest.raises(ServeError, match="onnx2trt.sh"):
            server.check_repository()


def test_stop_removes_this_servers_shared_memory_only(tmp_path: Path):
    require_server_binary()
    config = server_config(tmp_path, tmp_path / "work")
    server, other = TritonServer(config.serving), TritonServer(config.serving)
    mine = SHARED_MEMORY_DIR / f"{server.shm_prefix}left_by_a_killed_stub"
    theirs = SHARED_MEMORY_DIR / f"{other.shm_prefix}still_in_use"
    try:
        mine.write_bytes(b"x")
        theirs.write_bytes(b"x")
        assert server.stop() is None
        assert not mine.exists() and theirs.exists()
    finally:
        mine.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)


def test_a_model_that_fails_to_load_stops_the_start_with_its_reason(
    filled_repository: Path, tmp_path: Path
):
    """The stand-in, like the real onnxruntime backend, refuses a config that disagrees with the
    ONNX file; the server exits and `wait_until_ready` says why instead of waiting it out."""
    require_server_binary()
    repository = tmp_path / "triton_repo"
    shutil.copytree(filled_repository, repository)
    config_path = repository / "mol_props_onnx" / "config.pbtxt"
    rewrite_config(config_path, {"descriptors": [7]})
    config = server_config(repository, tmp_path / "work")
    server = TritonServer(config.serving, log_path=tmp_path / "server.log")
    with pytest.raises(ServeError, match="exited") as raised:
        with server:
            pass
    assert "descriptors" in str(raised.value) and "the ONNX model has" in str(raised.value)
    assert server.leftover_shared_memory() == []
