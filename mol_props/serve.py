"""`mol_props serve`: a real Triton Inference Server on `triton_repo/`, bound to loopback.

Two ways to get a `tritonserver`:

- the official Triton container: its own binary and real backends (onnxruntime, TensorRT);
- anywhere else (these CPU machines): the binary the nvidia-pytriton wheel bundles. It has only
  the python backend, so a backend directory is assembled under `serving.work_dir`: the python
  backend and its stub (copied, not linked: the stub finds its libraries next to itself), and the
  CPU stand-in for the onnxruntime backend (mol_props/cpu_standin_backends/onnxruntime/model.py).

The server runs in its own session and process group, so a Ctrl-C in the terminal reaches only
this process, which then stops the server in order: unload the models (in-flight requests finish,
the python stubs exit and free their shared memory), SIGTERM, and only if that hangs, SIGKILL to
the whole group. Each server gets its own shared-memory prefix, so anything a killed stub left in
/dev/shm is found and removed without touching another server's regions.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mol_props.config import Config, ServingConfig
from mol_props.errors import MolPropsError
from mol_props.triton_repo import (
    FEATURIZER_MODEL,
    METADATA_FILE,
    ONNX_MODEL,
    TENSORRT_MODEL,
    VERSION,
)

STANDIN_BACKENDS_DIR = Path(__file__).resolve().parent / "cpu_standin_backends"
SHARED_MEMORY_DIR = Path("/dev/shm")
SHM_PREFIX_ROOT = "triton_python_backend_shm_region_mol_props_"
PYTHON_STUB = "triton_python_backend_stub"
KILL_WAIT_S = 5.0  # after SIGKILL the kernel needs only moments
READY_POLL_S = 0.1
READY_TIMEOUT_S = 2.0  # one health / repository request to the local server
# Linux prctl option: a signal delivered to the child when its parent dies.
PR_SET_PDEATHSIG = 1


class ServeError(MolPropsError, RuntimeError):
    """The server could not be started (missing binary, model files, or it exited)."""


def bundled_server_dir() -> Path | None:
    """pytriton's `tritonserver/` folder (binary, python backend, stubs), if the wheel is here."""
    try:
        import pytriton
    except ImportError:
        return None
    folder = Path(pytriton.__file__).resolve().parent / "tritonserver"
    return folder if (folder / "bin" / "tritonserver").is_file() else None


class TritonServer:
    """One tritonserver process serving a model repository: start, wait until ready, stop."""

    def __init__(
        self,
        config: ServingConfig,
        repository: Path | None = None,
        work_dir: Path | None = None,
        log_path: Path | None = None,
        onnx_model_name: str = ONNX_MODEL,
    ) -> None:
        self.config = config
        self.onnx_model_name = onnx_model_name
        self.repository = Path(repository or config.triton_repo).resolve()
        self.work_dir = Path(work_dir or config.work_dir).resolve()
        self.log_path = log_path
        self.shm_prefix = f"{SHM_PREFIX_ROOT}{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None
        self.removed_shared_memory: list[Path] = []
        self._log_handle: IO[bytes] | None = None
        self.binary, self.backend_dir = self._locate_server()

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    @property
    def bundled(self) -> bool:
        """True when running pytriton's binary with the assembled CPU backend directory."""
        return self.backend_dir is not None

    def _locate_server(self) -> tuple[Path, Path | None]:
        choice = self.config.tritonserver
        if choice not in ("auto", "bundled"):
            binary = Path(choice)
            if not binary.is_file():
                raise ServeError(f"serving.tritonserver={choice}: no such file")
            return binary, None
        on_path = shutil.which("tritonserver") if choice == "auto" else None
        if on_path:
            # The official container: its own backends directory, real onnxruntime/TensorRT.
            return Path(on_path), None
        bundled = bundled_server_dir()
        if bundled is None:
            raise ServeError(
                "no tritonserver found: install the serving extra (nvidia-pytriton bundles one), "
                "or run inside the official Triton container"
            )
        return bundled / "bin" / "tritonserver", self.work_dir / "backends"

    def assemble_backends(self) -> None:
        """Backend dir for the bundled binary: python backend + stub + the onnxruntime stand-in."""
        if self.backend_dir is None:
            return
        bundled = self.binary.parent.parent
        python_dir = self.backend_dir / "python"
        stub = bundled / "python_backend_stubs" / sysconfig.get_python_version() / PYTHON_STUB
        if not stub.is_file():
            raise ServeError(f"nvidia-pytriton has no python backend stub for {stub.parent.name}")
        sources = [
            (path, python_dir / path.name) for path in (bundled / "backends/python").iterdir()
        ]
        sources.append((stub, python_dir / PYTHON_STUB))
        for standin in STANDIN_BACKENDS_DIR.iterdir():
            if (standin / "model.py").is_file():
                sources.append(
                    (standin / "model.py", self.backend_dir / standin.name / "model.py")
                )
        for source, target in sources:
            _copy_if_changed(source, target)

    def check_repository(self) -> None:
        """Fail before starting when a model file the selected backend loads is missing."""
        if self.config.backend not in ("onnx", "tensorrt"):
            raise ServeError(f"serving.backend={self.config.backend}: expected onnx or tensorrt")
        if self.config.backend == "tensorrt" and self.bundled:
            raise ServeError(
                "serving.backend=tensorrt needs a GPU and Triton's TensorRT backend: run it in "
                "the official Triton container (see docs/serving.md); the bundled CPU server "
                "has neither"
            )
        if self.config.backend == "tensorrt":
            model_file = self.repository / TENSORRT_MODEL / VERSION / "model.plan"
            hint = "scripts/onnx2trt.sh"
        else:
            model_file = self.repository / self.onnx_model_name / VERSION / "model.onnx"
            hint = "mol_props export"
        needed = [model_file, self.repository / FEATURIZER_MODEL / VERSION / METADATA_FILE]
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            raise ServeError(f"missing {', '.join(missing)}: run `{hint}` first")

    def command(self) -> list[str]:
        host = self.config.host
        command = [
            str(self.binary),
            f"--model-repository={self.repository}",
            # Every config in triton_repo/ is complete; nothing is guessed from model files.
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={int(self.config.exit_timeout_s)}",
            f"--http-address={host}",
            f"--http-port={self.config.http_port}",
            f"--grpc-address={host}",
            f"--grpc-port={self.config.grpc_port}",
            f"--metrics-address={host}",
            f"--metrics-port={self.config.metrics_port}",
            # Explicit mode loads the public ensemble and the steps it names, nothing else: the
            # engine of the other backend is never touched.
            "--model-control-mode=explicit",
            f"--load-model={self.config.model_name}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.config.log_verbose}",
        ]
        command += [
            f"--backend-config=python,{key}={value}"
            for key, value in self.config.python_backend.items()
        ]
        if self.config.backend == "tensorrt":
            command.append("--model-config-name=tensorrt")
        if self.bundled:
            # The stand-in backends run on the CPU: no pinned host buffers, no GPU metrics.
            command += [
                f"--backend-directory={self.backend_dir}",
                "--pinned-memory-pool-byte-size=0",
                "--allow-gpu-metrics=false",
            ]
        return command

    def environment(self) -> dict[str, str]:
        """The server's environment: the python stubs must run this interpreter's packages."""
        env = dict(os.environ)
        venv_bin = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        # The stub embeds libpython: it must load this interpreter's, not another on the system.
        libraries = [sysconfig.get_config_var("LIBDIR")]
        if self.bundled:
            # The wheel's own shared libraries, next to the pytriton package in site-packages.
            libraries.append(str(self.binary.parents[3] / "nvidia_pytriton.libs"))
        env["LD_LIBRARY_PATH"] = _join_paths(libraries, env.get("LD_LIBRARY_PATH"))
        # The embedded interpreter starts from the base Python's prefix, not the virtualenv: put
        # this environment's site-packages (where mol_props is installed) and mol_props' own
        # parent first on its path.
        package_parent = str(Path(__file__).resolve().parent.parent)
        site_packages = sysconfig.get_paths()["purelib"]
        env["PYTHONPATH"] = _join_paths([package_parent, site_packages], env.get("PYTHONPATH"))
        return env

    def start(self) -> None:
        self.check_repository()
        self.check_ports_free()
        self.assemble_backends()
        output: int | IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = self.log_path.open("wb")
            output = self._log_handle
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
            preexec_fn=_parent_death_signal() if sys.platform == "linux" else None,
        )

    def check_ports_free(self) -> None:
        """A port in use is named before the server starts: when another server held the HTTP
        port, its answer to the readiness check passed for this one's (which then exited)."""
        for setting in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self.config, setting)
            with socket.socket() as probe:
                # As servers bind: connections of an earlier server still closing (TIME_WAIT)
                # do not count, only a socket listening there now.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.config.host, port))
                except OSError as error:
                    raise ServeError(
                        f"serving.{setting}={port}: {self.config.host}:{port} is in use "
                        f"({error.strerror}); is a server running already? choose another "
                        f"port with serving.{setting}=..."
                    ) from None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_until_ready(self, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Block until the server and all its models are ready; ServeError if it exits first."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if cancelled():
                raise ServeError("interrupted while the server was starting")
            if not self.running():
                code = self.process.returncode if self.process else None
                raise ServeError(
                    f"tritonserver exited with code {code} while starting" + self._tail()
                )
            if _http_ok(url):
                return
            time.sleep(READY_POLL_S)
        raise ServeError(
            f"tritonserver not ready after {self.config.ready_timeout_s:.0f} s" + self._tail()
        )

    def stop(self) -> int | None:
        """Stop in order: unload the models (in-flight requests finish, python stubs exit and free
        their shared memory), SIGTERM, wait; kill the group only if that hangs; clear leftovers.

        Returns the server's exit code (None if it never started)."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self._unload_models()
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=self.config.exit_timeout_s + KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    _kill_group(self.process.pid)
                    self.process.wait(timeout=KILL_WAIT_S)
            # Stubs share the server's process group: one that outlived its server goes too.
            _kill_group(self.process.pid)
            code = self.process.returncode
        self.removed_shared_memory = self.remove_shared_memory()
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return code

    def _unload_models(self) -> None:
        """Unload everything through the repository API and wait (bounded) until it is gone.

        Triton's own SIGTERM path shares one timeout between idle client connections (it waits
        for keep-alive connections to close) and unloading the models, so a client that merely
        keeps its connection open would leave no time to unload them cleanly."""
        base = self.http_url
        body = json.dumps({"parameters": {"unload_dependents": True}}).encode()
        url = f"{base}/v2/repository/models/{self.config.model_name}/unload"
        if _http_post(url, body) is None:
            return
        deadline = time.monotonic() + self.config.stop_timeout_s
        while time.monotonic() < deadline:
            index = _http_post(f"{base}/v2/repository/index", b"{}")
            if index is None:
                return
            states = {entry.get("state") for entry in json.loads(index)}
            if not states & {"READY", "LOADING", "UNLOADING"}:
                return
            time.sleep(READY_POLL_S)

    def leftover_shared_memory(self) -> list[Path]:
        return sorted(SHARED_MEMORY_DIR.glob(f"{self.shm_prefix}*"))

    def remove_shared_memory(self) -> list[Path]:
        leftovers = self.leftover_shared_memory()
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n--- tritonserver log (last lines) ---\n" + "\n".join(text)


def _copy_if_changed(source: Path, target: Path) -> None:
    stat = source.stat()
    if target.is_file():
        existing = target.stat()
        if (existing.st_size, existing.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy beside the target and rename: a second server starting at the same time never sees
    # half a library.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copy2(source, partial)
    partial.replace(target)


def _join_paths(paths: list[str], existing: str | None) -> str:
    return os.pathsep.join([path for path in paths if path] + ([existing] if existing else []))


def _http_post(url: str, body: bytes) -> bytes | None:
    """POST to the server; None when it does not answer with 200."""
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=READY_TIMEOUT_S) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=READY_TIMEOUT_S) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parent_death_signal() -> Callable[[], None]:
    """A pre-exec hook: the kernel SIGTERMs the server if `mol_props serve` (or pytest) dies.

    Linux ties it to the thread that starts the server, so start it from one that lives as long
    as the server (the main thread). prctl is looked up here, in the parent: the hook runs
    between fork and exec, where loading a library could deadlock on a lock another thread held
    at the fork."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def prepare_repository(config: Config) -> None:
    """Fill triton_repo/ from models/ when the export ran elsewhere (e.g. models pulled by DVC)."""
    from mol_props.artifacts import ArtifactError, pull_models
    from mol_props.infer import ModelMetadata
    from mol_props.triton_repo import ModelRepositoryError, populate_model_repository

    repository = Path(config.serving.triton_repo)
    onnx_name = config.export.triton_model_name
    if (repository / onnx_name / "1" / "model.onnx").is_file():
        return
    onnx_path = Path(config.export.onnx_path)
    metadata_path = Path(config.export.metadata_path)
    try:
        if not (onnx_path.is_file() and metadata_path.is_file()):
            pull_models(config, needed=[onnx_path, metadata_path])
        metadata = ModelMetadata.load(metadata_path)
        populate_model_repository(repository, onnx_path, metadata, onnx_name)
    except (ArtifactError, ModelRepositoryError) as error:
        raise ServeError(str(error)) from error


class StopRequest:
    """Set by SIGINT / SIGTERM. A plain flag, because a signal handler must not take a lock: with
    a threading.Event, a signal landing while the main thread's Event.wait() held the Event's
    lock made the handler's Event.set() wait for that lock forever (seen: `serve` hung after
    SIGTERM, its server's python stubs left running)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested


def serve(config: Config) -> int:
    """The `mol_props serve` command: run until Ctrl-C / SIGTERM; returns the exit code."""
    stop_requested = StopRequest()
    previous = {
        signum: signal.signal(signum, stop_requested) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    server: TritonServer | None = None
    failure: str | None = None
    try:
        if config.serving.backend == "onnx":
            prepare_repository(config)
        server = TritonServer(config.serving, onnx_model_name=config.export.triton_model_name)
        server.start()
        server.wait_until_ready(cancelled=stop_requested.is_set)
        _print_endpoints(server)
        while server.running() and not stop_requested.is_set():
            time.sleep(READY_POLL_S)
    except ServeError as error:
        failure = str(error)
    finally:
        if server is not None and stop_requested.is_set():
            limit = server.config.stop_timeout_s + server.config.exit_timeout_s
            print(f"mol_props serve: stopping (at most ~{limit:.0f} s)", file=sys.stderr)
        code = server.stop() if server is not None else None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if server is not None and server.removed_shared_memory:
        names = ", ".join(path.name for path in server.removed_shared_memory)
        print(f"mol_props serve: removed shared memory left behind: {names}", file=sys.stderr)
    if stop_requested.is_set():
        print("mol_props serve: tritonserver stopped", file=sys.stderr)
        return 0
    if failure is None:
        failure = f"tritonserver exited unexpectedly with code {code}"
    print(f"mol_props serve: {failure}", file=sys.stderr)
    return 1


def _print_endpoints(server: TritonServer) -> None:
    model = server.config.model_name
    kind = "bundled CPU server, onnxruntime stand-in" if server.bundled else str(server.binary)
    print(
        f"\nTriton is serving model {model!r} ({server.config.backend}; {kind})\n"
        f"  HTTP     {server.http_url}\n"
        f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}\n"
        f"  try:     mol_props infer --server {server.http_url} --smiles CCO\n"
        "Ctrl-C stops it.",
        flush=True,
    )
