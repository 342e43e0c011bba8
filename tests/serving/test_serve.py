"""`mol_props serve`: starts a real server, prints its endpoints, and on Ctrl-C / SIGTERM stops it
with no process and no shared memory left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from mol_props.client import TritonPredictor
from mol_props.infer import InferenceError
from mol_props.serve import SHARED_MEMORY_DIR, SHM_PREFIX_ROOT, ServeError, TritonServer, serve
from mol_props.triton_repo import rewrite_config

from .conftest import copy_repository, require_server_binary, server_config

READY_LINE = "Ctrl-C stops it."


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


class OutputReader:
    """Collects a process's output lines on a thread, so waiting for one never blocks forever."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self.process = process
        self._marker = ""
        self._found = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if self._marker and self._marker in line:
                self._found.set()

    def wait_for(self, marker: str, timeout_s: float) -> str:
        self._marker = marker
        if not (any(marker in line for line in self.lines) or self._found.wait(timeout_s)):
            self.process.kill()
            pytest.fail(f"no {marker!r} within {timeout_s} s:\n{self.tail()}")
        return "".join(self.lines)

    def finish(self, timeout_s: float) -> str:
        """Everything the process printed, once it has exited and its pipe is drained."""
        self._thread.join(timeout_s)
        return "".join(self.lines)

    def tail(self, count: int = 40) -> str:
        return "".join(self.lines[-count:])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_answers_then_stops_cleanly(filled_repository: Path, tmp_path: Path, signum: int):
    require_server_binary()
    config = server_config(filled_repository, tmp_path / "work")
    before = shared_memory()
    # Its own session, like a shell job: Ctrl-C goes to the whole group, as a terminal sends it.
    process = subprocess.Popen(
        [sys.executable, "-m", "mol_props.commands", "serve", *overrides_for(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = OutputReader(process)
    try:
        printed = output.wait_for(READY_LINE, timeout_s=90)
        assert f"http://127.0.0.1:{config.serving.http_port}" in printed
        assert f"grpc://127.0.0.1:{config.serving.grpc_port}" in printed
        children = psutil.Process(process.pid).children(recursive=True)
        assert any(child.name() == "tritonserver" for child in children)
        assert shared_memory() - before  # the python models are up, with their own regions
        # A client that keeps its connection open must not keep the server from stopping.
        predictor = TritonPredictor(f"http://127.0.0.1:{config.serving.http_port}", config)
        assert predictor.predict(["CCO"]).errors == [None]
        os.killpg(process.pid, signum)
        code = process.wait(timeout=config.serving.stop_timeout_s + 30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    printed = output.finish(timeout_s=10)
    assert code == 0, output.tail()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    assert shared_memory() - before == set()
    assert "tritonserver stopped" in printed
    # Triton itself released everything: serve had no leftovers to clean up.
    assert "removed shared memory" not in printed, output.tail()
    assert "Exit timeout expired" not in printed, output.tail()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_server_that_dies_mid_run_is_one_clear_error(
    filled_repository: Path, tmp_path: Path, capfd, protocol: str
):
    require_server_binary()
    config = server_config(filled_repository, tmp_path / "work", ["infer.server_timeout_s=10"])
    server = TritonServer(config.serving, log_path=tmp_path / "tritonserver.log")
    server.__enter__()
    try:
        url = server.http_url if protocol == "http" else server.grpc_url
        predictor = TritonPredictor(url, config)
        assert predictor.predict(["CCO"]).errors == [None]  # connected and answering
        os.killpg(server.process.pid, signal.SIGKILL)  # the server dies, without a word
        server.process.wait(timeout=30)
        capfd.readouterr()
        with pytest.raises(InferenceError, match=f"no Triton server answers at {url}"):
            predictor.predict(["CCO", "c1ccccc1"] * 300)
        # The client's own libraries print nothing of it: the error is said once, above.
        assert "Traceback" not in capfd.readouterr().err
    finally:
        server.stop()


SIGNAL_STORM = """
import os, signal, sys, time
from mol_props.serve import StopRequest

stop = StopRequest()
signal.signal(signal.SIGTERM, stop)
child = os.fork()
if child == 0:  # signals as fast as they can be sent, while the parent polls
    for _ in range(100_000):
        os.kill(os.getppid(), signal.SIGTERM)
    os._exit(0)
while os.waitpid(child, os.WNOHANG) == (0, 0):
    stop.is_set()  # what serve's loop does between its sleeps
    time.sleep(1e-5)
print("stopped" if stop.is_set() else "never set")
"""


def test_a_stop_signal_can_never_deadlock_the_serve_loop():
    # A threading.Event here hung this script for good within seconds (and `serve` once, after
    # SIGTERM): the handler's Event.set() waited on the lock the interrupted Event.wait() held.
    process = subprocess.run(
        [sys.executable, "-c", SIGNAL_STORM], capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == "stopped"


@pytest.mark.parametrize("setting", ["http_port", "grpc_port", "metrics_port"])
def test_a_port_in_use_is_named_before_the_server_starts(
    filled_repository: Path, tmp_path: Path, setting: str
):
    # Another server's answer on the HTTP port passed for this one's readiness (it printed
    # "Triton is serving" and then exited): now refused before anything starts.
    config = server_config(filled_repository, tmp_path / "work")
    port = getattr(config.serving, setting)
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", port))
        other_server.listen()
        server = TritonServer(config.serving)
        try:
            with pytest.raises(ServeError, match=f"serving.{setting}={port}: 127.0.0.1:{port} is"):
                server.start()
        finally:
            server.stop()  # a server that did start (the old behaviour) is not left running
    assert server.process is None


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
