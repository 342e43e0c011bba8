"""Load test of the Triton server: 8 concurrent clients, 1- and 64-molecule requests, HTTP + gRPC.

    python benchmarks/triton_load.py                  # starts a server on triton_repo/, free ports
    python benchmarks/triton_load.py serving.triton_repo=/tmp/repo --single_requests=50
    python benchmarks/triton_load.py --http=http://127.0.0.1:8000 --grpc=grpc://127.0.0.1:8001

Prints, per protocol and request size: molecules/s, p50/p99 latency per request, molecules sent vs
answered (they must be equal: a molecule that cannot be featurized is answered with its error),
and how many cores the server and this client process kept busy. Every loop is bounded: each
client sends a fixed number of requests, each with a timeout; everything stays on loopback.

Targets on the 2-core CPU machine: >= 2,000 molecules/s with 64-molecule requests, p99 <= 50 ms
with single-molecule requests. The clients run here (threads, one tritonclient each), on the same
cores as the server; the printout shows what they cost.
"""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fire
import numpy as np

from mol_props.client import TritonPredictor, parse_server_url
from mol_props.commands import reported_errors
from mol_props.config import compose_config
from mol_props.serve import TritonServer

TARGET_MOLECULES_PER_S = 2000.0  # with 64-molecule requests
TARGET_P99_MS = 50.0  # with single-molecule requests
REQUEST_SIZES = (1, 64)
WARMUP_REQUESTS = 5  # per client, not timed: lets the batchers and ONNX Runtime settle


@dataclass
class Scenario:
    protocol: str
    molecules_per_request: int
    clients: int
    requests_per_client: int


@dataclass
class Result:
    scenario: Scenario
    wall_s: float
    latencies_ms: np.ndarray  # [requests]
    sent: int
    answered: int
    failed_molecules: int  # answered with a per-molecule error
    failed_requests: int
    server_cpu_s: dict[str, float]  # by process: tritonserver, then each model
    client_cpu_s: float

    @property
    def molecules_per_s(self) -> float:
        return self.answered / self.wall_s

    @property
    def percentiles_ms(self) -> tuple[float, float]:
        if not self.latencies_ms.size:
            return 0.0, 0.0
        p50, p99 = np.percentile(self.latencies_ms, [50, 99])
        return float(p50), float(p99)

    @property
    def server_cores(self) -> float:
        return sum(self.server_cpu_s.values()) / self.wall_s


def load_molecules(limit: int) -> list[str]:
    """Real SMILES from B3DB (the qc-b3db package, or the DVC copy under data/raw/)."""
    config = compose_config()
    path = Path(config.data.path)
    if not path.is_file():
        import B3DB

        path = Path(B3DB.__file__).parent / path.name
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        smiles = [row[config.data.smiles_column] for _, row in zip(range(limit), reader)]
    return smiles


def make_client(url: str, timeout_s: float) -> tuple[object, object]:
    protocol, address = parse_server_url(url)
    if protocol == "http":
        import tritonclient.http as module

        return module, module.InferenceServerClient(
            address, connection_timeout=timeout_s, network_timeout=timeout_s
        )
    import tritonclient.grpc as module

    return module, module.InferenceServerClient(address)


def client_loop(
    url: str,
    model_name: str,
    batches: Sequence[np.ndarray],
    timeout_s: float,
    start: threading.Barrier,
    latencies: list[float],
    counts: list[int],
) -> None:
    """One client: warm up, wait for the others, then send its batches one after another."""
    module, client = make_client(url, timeout_s)
    outputs = [module.InferRequestedOutput(name) for name in ("prediction", "valid", "error")]

    def send(batch: np.ndarray) -> tuple[int, int]:
        request_input = module.InferInput("smiles", list(batch.shape), "BYTES")
        request_input.set_data_from_numpy(batch)
        keywords = {"client_timeout": timeout_s} if module.__name__.endswith("grpc") else {}
        result = client.infer(model_name, [request_input], outputs=outputs, **keywords)
        valid = result.as_numpy("valid").reshape(-1)
        return len(valid), int((~valid).sum())

    for batch in batches[:WARMUP_REQUESTS]:
        send(batch)
    start.wait()
    answered = failed = failed_requests = 0
    for batch in batches:
        began = time.perf_counter()
        try:
            rows, bad = send(batch)
        except Exception as error:  # a failed request is counted and reported, not fatal
            failed_requests += 1
            print(f"request failed: {error}", file=sys.stderr)
            continue
        latencies.append((time.perf_counter() - began) * 1000.0)
        answered += rows
        failed += bad
    counts.extend([answered, failed, failed_requests])
    client.close()


def run_scenario(
    scenario: Scenario, url: str, model_name: str, smiles: list[str], timeout_s: float, server_pid
) -> Result:
    size = scenario.molecules_per_request
    per_client = []
    for i in range(scenario.clients):
        batches = []
        for j in range(scenario.requests_per_client):
            offset = ((i * scenario.requests_per_client + j) * size) % len(smiles)
            rows = [smiles[(offset + k) % len(smiles)].encode() for k in range(size)]
            batches.append(np.array(rows, dtype=np.object_).reshape(size, 1))  # [size, 1]
        per_client.append(batches)
    start = threading.Barrier(scenario.clients + 1)
    latencies: list[list[float]] = [[] for _ in range(scenario.clients)]
    counts: list[list[int]] = [[] for _ in range(scenario.clients)]
    threads = [
        threading.Thread(
            target=client_loop,
            args=(url, model_name, per_client[i], timeout_s, start, latencies[i], counts[i]),
            daemon=True,
        )
        for i in range(scenario.clients)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    server_before = _server_cpu_seconds(server_pid)
    client_before = time.process_time()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    client_cpu = time.process_time() - client_before
    server_after = _server_cpu_seconds(server_pid)
    server_cpu = {
        name: seconds - server_before.get(name, 0.0) for name, seconds in server_after.items()
    }
    totals = np.array([row if row else [0, 0, 0] for row in counts]).sum(axis=0)
    return Result(
        scenario=scenario,
        wall_s=wall,
        latencies_ms=np.array([value for client in latencies for value in client]),
        sent=scenario.clients * scenario.requests_per_client * size,
        answered=int(totals[0]),
        failed_molecules=int(totals[1]),
        failed_requests=int(totals[2]),
        server_cpu_s=server_cpu,
        client_cpu_s=client_cpu,
    )


def _server_cpu_seconds(pid: int | None) -> dict[str, float]:
    """CPU seconds of the server process and of each model's python processes (by model name).

    Empty when the server runs elsewhere (--http/--grpc)."""
    if pid is None:
        return {}
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    seconds: dict[str, float] = {}
    for process in processes:
        try:
            times = process.cpu_times()
            arguments = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        # A python stub's 9th argument names its model instance, e.g. mol_props_onnx_0_1.
        name = arguments[8].rsplit("_", 2)[0] if process.pid != pid else "tritonserver"
        seconds[name] = seconds.get(name, 0.0) + times.user + times.system
    return seconds


def print_results(results: list[Result]) -> bool:
    header = (
        f"{'protocol':8} {'mol/req':>7} {'requests':>8} {'sent':>7} {'answered':>8} "
        f"{'mol/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'mol err':>7} {'req err':>7} "
        f"{'srv cpu/s':>9} {'cli cpu/s':>9}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for result in results:
        scenario = result.scenario
        p50, p99 = result.percentiles_ms
        print(
            f"{scenario.protocol:8} {scenario.molecules_per_request:7d} "
            f"{result.latencies_ms.size:8d} {result.sent:7d} {result.answered:8d} "
            f"{result.molecules_per_s:8.0f} {p50:7.1f} {p99:7.1f} {result.failed_molecules:7d} "
            f"{result.failed_requests:7d} {result.server_cores:9.2f} "
            f"{result.client_cpu_s / result.wall_s:9.2f}"
        )
        ok &= result.sent == result.answered
    print(f"\ncpu/s: cores kept busy (this machine has {_cores()}); the server's, by process:")
    for result in results:
        parts = ", ".join(
            f"{name} {seconds / result.wall_s:.2f}"
            for name, seconds in sorted(result.server_cpu_s.items())
        )
        scenario = result.scenario
        print(f"  {scenario.protocol:4} {scenario.molecules_per_request:3d}: {parts or '-'}")
    print()
    for result in results:
        scenario = result.scenario
        if scenario.molecules_per_request == 1:
            p99 = result.percentiles_ms[1]
            verdict = "meets" if p99 <= TARGET_P99_MS else "MISSES"
            print(
                f"{scenario.protocol} 1-molecule p99 {p99:.1f} ms {verdict} <= {TARGET_P99_MS} ms"
            )
        else:
            rate = result.molecules_per_s
            verdict = "meets" if rate >= TARGET_MOLECULES_PER_S else "MISSES"
            print(
                f"{scenario.protocol} {scenario.molecules_per_request}-molecule {rate:.0f} mol/s "
                f"{verdict} >= {TARGET_MOLECULES_PER_S:.0f}"
            )
    print("sent == answered in every scenario" if ok else "MOLECULES LOST: sent != answered")
    return ok


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def benchmark(
    *overrides: str,
    http: str | None = None,
    grpc: str | None = None,
    clients: int = 8,
    single_requests: int = 200,
    batch_requests: int = 20,
    protocols: Sequence[str] = ("http", "grpc"),
    sizes: Sequence[int] = REQUEST_SIZES,
    timeout_s: float = 30.0,
) -> None:
    """Run every scenario; start a server on triton_repo/ unless --http/--grpc name a running one.

    single_requests / batch_requests: requests per client with 1 molecule / with more;
    --protocols=grpc or --sizes=64 run a subset."""
    config = compose_config(list(overrides))
    # fire hands over one value as a scalar, several as a tuple.
    protocols = [protocols] if isinstance(protocols, str) else list(protocols)
    sizes = [sizes] if isinstance(sizes, int) else [int(size) for size in sizes]
    smiles = load_molecules(limit=4096)
    with contextlib.ExitStack() as stack:
        server_pid = None
        if http is None and grpc is None:
            serving = config.serving
            serving.http_port, serving.grpc_port, serving.metrics_port = (
                _free_port(),
                _free_port(),
                _free_port(),
            )
            log_path = Path(serving.work_dir) / "triton_load.log"
            server = stack.enter_context(TritonServer(serving, log_path=log_path))
            http, grpc, server_pid = server.http_url, server.grpc_url, server.process.pid
        chosen = [
            (protocol, url)
            for protocol, url in (("http", http), ("grpc", grpc))
            if url is not None and protocol in protocols
        ]
        for _, url in chosen:
            # A server that does not answer, or lacks the model, is named before any scenario.
            TritonPredictor(url, config).close()
        results = []
        for protocol, url in chosen:
            for size in sizes:
                count = single_requests if size == 1 else batch_requests
                scenario = Scenario(protocol, size, clients, count)
                print(f"running {protocol}, {clients} clients x {count} requests of {size}...")
                results.append(
                    run_scenario(
                        scenario, url, config.serving.model_name, smiles, timeout_s, server_pid
                    )
                )
    print()
    if not print_results(results):
        sys.exit(1)


def main() -> None:
    with reported_errors():
        fire.Fire(benchmark)


if __name__ == "__main__":
    main()
