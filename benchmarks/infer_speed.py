"""Speed and memory of `mol_props infer` on this machine (prints numbers; it is not a test).

    python benchmarks/infer_speed.py                            # the model in models/
    python benchmarks/infer_speed.py --models=/path/to/models --runs=7 --memory_rows=200000
    python benchmarks/infer_speed.py --runs=0 --rows=0 --nocompare_buckets    # memory only

It needs an exported model (models/model_dynamic_atoms.onnx + model.json, from `mol_props train`
or `mol_props export`) and real SMILES (B3DB, from data/raw/ or the qc-b3db package). It measures

1. cold start: `mol_props infer --smiles CCO` in a new process each time. The first run composes
   the config with Hydra; later runs read it from the cache (mol_props.infer.compose_config_cached)
   and give the median. Target <= 1.0 s.
2. throughput: --rows B3DB SMILES (repeated) in a CSV -> `mol_props infer --input --output`, end
   to end in a new process (start-up, reading, featurizing, the model, writing), with the default
   worker processes and with one process. Target >= 5,000 molecules/s. Beside it, the floor
   under any RDKit featurizer: the same rows parsed by `Chem.MolFromSmiles` alone on every core,
   and how much of the time the target allows that takes.
3. memory: --memory_rows rows the same way, run at low CPU priority (`nice`) so other users of the
   machine keep theirs: peak RSS of the command's processes summed (sampled every 0.1 s), and
   ru_maxrss (the largest single process). Target < 1 GB.
4. size buckets vs padding every molecule to max_atoms, in this process: model time alone and
   featurize + model.

Wall times depend on what else runs on the machine; CPU seconds are printed beside them.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import fire
import psutil
from featurize import parse_only_rate

from mol_props.config import compose_config
from mol_props.featurize import MoleculeGraph, pad_graphs
from mol_props.infer import LocalPredictor, ModelMetadata, bucket_for

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_COLD_START_S = 1.0
TARGET_MOLECULES_PER_S = 5000.0
TARGET_PEAK_MEMORY_MB = 1024.0
SAMPLE_INTERVAL_S = 0.1  # how often the memory of the command's processes is sampled
IN_PROCESS_MOLECULES = 4000  # for the bucket comparison
TIMELINE_POINTS = 8  # memory samples printed for the long run


@dataclasses.dataclass
class ChildRun:
    returncode: int
    wall_s: float
    cpu_s: float  # user + system, the command and its worker processes
    max_rss_mb: float  # ru_maxrss: the largest single process (see `run_child`)
    peak_process_mb: float  # the largest VmHWM (the kernel's peak RSS) of any of its processes
    peak_total_mb: float  # its processes together (PSS: shared pages counted once), sampled
    stdout: str
    stderr: str
    timeline: list[tuple[float, float]]  # (seconds since start, PSS MB together) per sample


def run_child(
    command: Sequence[str], nice: int = 0, env: dict[str, str] | None = None
) -> ChildRun:
    """Run `command`, sampling the memory of it and its children until it exits.

    ru_maxrss of a child also counts this (parent) process's own RSS at the fork before exec,
    so the memory run comes before anything here grows big; VmHWM, read from /proc while the
    processes live, has no such floor."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            [*(["nice", "-n", str(nice)] if nice else []), *command],
            stdout=out,
            stderr=err,
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
        )
        watched = psutil.Process(process.pid)
        peak_total = peak_process = 0
        timeline = []
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            total, largest = tree_memory(watched)
            peak_total, peak_process = max(peak_total, total), max(peak_process, largest)
            timeline.append((time.perf_counter() - start, total / 2**20))
            time.sleep(SAMPLE_INTERVAL_S)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(
            returncode=process.returncode,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            max_rss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
            peak_process_mb=peak_process / 2**20,
            peak_total_mb=peak_total / 2**20,
            stdout=out.read(),
            stderr=err.read(),
            timeline=timeline,
        )


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """(PSS of the process and its children together, the largest VmHWM among them), bytes."""
    total = largest = 0
    try:
        for member in [process, *process.children(recursive=True)]:
            total += member.memory_full_info().pss
            largest = max(largest, peak_rss(member.pid))
    except (psutil.Error, OSError):
        pass  # a process ended between listing and reading: the next sample counts again
    return total, largest


def peak_rss(pid: int) -> int:
    """VmHWM of a live process: its peak resident set since it started (or exec'd)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def mol_props_command() -> list[str]:
    """`mol_props` as a user runs it: the console script beside this interpreter."""
    script = Path(sys.executable).parent / "mol_props"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mol_props.commands"]


def b3db_smiles() -> list[str]:
    config = compose_config()
    path = REPO_ROOT / config.data.path
    if not path.is_file():
        import B3DB

        path = Path(B3DB.__file__).parent / path.name
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        return [row[config.data.smiles_column] for row in reader]


def write_input(path: Path, smiles: list[str], rows: int) -> Path:
    """`rows` rows (id, smiles), the B3DB SMILES repeated; written as a stream."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "smiles"])
        for i, text in zip(range(rows), itertools.cycle(smiles)):
            writer.writerow([i, text])
    return path


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def cold_start(command: list[str], overrides: list[str], runs: int) -> None:
    print("\n1. cold start: mol_props infer --smiles CCO, a new process each time")
    results = []
    # An empty config cache: the first run composes with Hydra, as on a fresh machine.
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(runs + 1):
            result = run_child(
                [*command, "infer", "--smiles", "CCO", *overrides], env={"XDG_CACHE_HOME": cache}
            )
            results.append(result)
    for i, result in enumerate(results):
        if result.returncode != 0 or '"error": null' not in result.stdout:
            raise SystemExit(f"mol_props infer failed:\n{result.stderr}")
        label = "first (config composed by Hydra)" if i == 0 else f"run {i} (cached config)"
        print(f"   {label:34s} {result.wall_s:5.2f} s wall, {result.cpu_s:5.2f} s CPU")
    median = statistics.median(result.wall_s for result in results[1:])
    median_cpu = statistics.median(result.cpu_s for result in results[1:])
    print(
        f"   median of {runs}: {median:.2f} s wall ({median_cpu:.2f} s CPU); "
        f"target <= {TARGET_COLD_START_S:.1f} s: {verdict(median <= TARGET_COLD_START_S)}"
    )


def file_run(
    command: list[str], overrides: list[str], source: Path, rows: int, label: str, nice: int = 0
) -> ChildRun:
    output = source.with_name(f"{source.stem}-predictions.csv")
    result = run_child(
        [*command, "infer", "--input", str(source), "--output", str(output), *overrides], nice
    )
    if result.returncode != 0:
        raise SystemExit(f"mol_props infer --input failed:\n{result.stderr}")
    output.unlink()
    rate = rows / result.wall_s
    print(
        f"   {label:28s} {rows:>9,} rows in {result.wall_s:6.1f} s = {rate:7,.0f} molecules/s "
        f"({result.cpu_s:.1f} s CPU)"
    )
    print(
        f"   {'':28s} memory: {result.peak_total_mb:,.0f} MB all processes (PSS), largest "
        f"process {result.peak_process_mb:,.0f} MB (VmHWM), ru_maxrss {result.max_rss_mb:,.0f} MB"
    )
    return result


def throughput(command: list[str], overrides: list[str], smiles: list[str], rows: int) -> None:
    print(f"\n2. throughput: {rows:,} B3DB SMILES from a CSV, end to end")
    with tempfile.TemporaryDirectory() as folder:
        source = write_input(Path(folder) / "molecules.csv", smiles, rows)
        workers = file_run(command, overrides, source, rows, "default (worker processes)")
        file_run(command, [*overrides, "infer.num_workers=1"], source, rows, "one process")
    rate = rows / workers.wall_s
    print(
        f"   target >= {TARGET_MOLECULES_PER_S:,.0f} molecules/s: "
        f"{verdict(rate >= TARGET_MOLECULES_PER_S)} ({os.cpu_count()} CPU cores here)"
    )
    rows_smiles = list(itertools.islice(itertools.cycle(smiles), rows))
    parse_rate = parse_only_rate(rows_smiles, repeats=3, processes=os.cpu_count() or 1)
    allowed_s = rows / TARGET_MOLECULES_PER_S
    print(
        f"   floor: RDKit Chem.MolFromSmiles alone on {os.cpu_count()} processes parses these "
        f"rows at {parse_rate:,.0f} molecules/s ({rows / parse_rate:.2f} s, best of 3), "
        f"{rows / parse_rate / allowed_s:.0%} of the {allowed_s:.1f} s the target allows for "
        "start-up, parsing, featurizing, the model, reading and writing"
    )


def memory(
    command: list[str], overrides: list[str], smiles: list[str], rows: int, nice: int
) -> None:
    print(f"\n3. memory: {rows:,} rows, end to end, at nice {nice}")
    with tempfile.TemporaryDirectory() as folder:
        source = write_input(Path(folder) / "molecules.csv", smiles, rows)
        print(f"   input file: {source.stat().st_size / 2**20:,.0f} MB")
        result = file_run(command, overrides, source, rows, "default (worker processes)", nice)
    # Flat over time is what bounded means: the same memory at the end as a minute in.
    points = result.timeline[:: max(1, len(result.timeline) // TIMELINE_POINTS)]
    print(
        "   all processes over time (PSS): "
        + ", ".join(f"{seconds:.0f} s {megabytes:.0f} MB" for seconds, megabytes in points)
    )
    peak = max(result.peak_total_mb, result.peak_process_mb, result.max_rss_mb)
    print(f"   target < {TARGET_PEAK_MEMORY_MB:,.0f} MB: {verdict(peak < TARGET_PEAK_MEMORY_MB)}")


def model_only_rate(predictor: LocalPredictor, graphs: list[MoleculeGraph]) -> float:
    """Molecules/s of padding + ONNX Runtime alone (molecules featurized beforehand)."""
    by_bucket: dict[int, list[MoleculeGraph]] = {}
    for graph in graphs:
        by_bucket.setdefault(bucket_for(graph.num_atoms, predictor.buckets), []).append(graph)
    featurizer, session, batch = predictor.featurizer, predictor.session, predictor.batch_size
    start = time.perf_counter()
    for size, members in by_bucket.items():
        for first in range(0, len(members), batch):
            padded = pad_graphs(
                members[first : first + batch], size, featurizer.descriptor_size, len(featurizer)
            )
            session.run(["prediction"], padded.as_inputs())
    return len(graphs) / (time.perf_counter() - start)


def buckets(overrides: list[str], smiles: list[str]) -> None:
    config = compose_config(overrides)
    metadata = ModelMetadata.load(Path(config.infer.metadata_path))
    molecules = smiles[:IN_PROCESS_MOLECULES]
    print(
        f"\n4. size buckets vs all padded to {metadata.max_atoms}: {len(molecules):,} molecules, "
        "this process, one ONNX Runtime thread"
    )
    variants = {
        f"buckets {config.infer.atom_buckets}": config.infer.atom_buckets,
        "buckets [32, 64, 128]": [32, 64, 128],
        f"all padded to {metadata.max_atoms}": [metadata.max_atoms],
    }
    featurizer = LocalPredictor(Path(config.infer.model_path), metadata, config.infer).featurizer
    start = time.perf_counter()
    results = featurizer.featurize_many(molecules)
    featurize_rate = len(molecules) / (time.perf_counter() - start)
    graphs = [result for result in results if isinstance(result, MoleculeGraph)]
    print(f"   featurization alone: {featurize_rate:,.0f} molecules/s")
    rates = {}
    for label, sizes in variants.items():
        settings = dataclasses.replace(config.infer, atom_buckets=sizes, num_threads=1)
        predictor = LocalPredictor(Path(config.infer.model_path), metadata, settings)
        model_only_rate(predictor, graphs[:256])  # warm-up: ONNX Runtime plans each shape once
        rates[label] = model_only_rate(predictor, graphs)
        start = time.perf_counter()
        predictor.predict(molecules)
        both = len(molecules) / (time.perf_counter() - start)
        print(
            f"   {label:42s} model {rates[label]:7,.0f} molecules/s; "
            f"featurize + model {both:6,.0f} molecules/s"
        )
    default, padded = rates[next(iter(variants))], rates[f"all padded to {metadata.max_atoms}"]
    print(f"   default buckets vs all padded: model {default / padded:.1f}x faster")


def benchmark(
    models: str = "models",
    runs: int = 5,
    rows: int = 10_000,
    memory_rows: int = 1_000_000,
    memory_nice: int = 10,
    compare_buckets: bool = True,
) -> None:
    """Cold start, throughput, memory and bucket speed of `mol_props infer` (see module doc).
    A count of 0 (or --nocompare_buckets) skips that part."""
    folder = Path(models)
    model_path, metadata_path = folder / "model_dynamic_atoms.onnx", folder / "model.json"
    if not (model_path.is_file() and metadata_path.is_file()):
        raise SystemExit(
            f"no exported model in {folder}/ (model_dynamic_atoms.onnx, model.json): "
            "make one with `uv run mol_props train` (trains and exports), or with "
            "`uv run mol_props export` from an existing models/best.ckpt; or point --models "
            "at a folder that holds one"
        )
    overrides = [
        f"infer.model_path={model_path.resolve()}",
        f"infer.metadata_path={metadata_path.resolve()}",
        "infer.progress=false",
    ]
    command = mol_props_command()
    smiles = b3db_smiles()
    print(
        f"mol_props infer benchmark: model {model_path}, {len(smiles):,} distinct B3DB SMILES, "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}"
    )
    if runs > 0:
        cold_start(command, overrides, runs)
    if rows > 0:
        throughput(command, overrides, smiles, rows)
    if memory_rows > 0:
        memory(command, overrides, smiles, memory_rows, memory_nice)
    if compare_buckets:
        buckets(overrides, smiles)  # last: it grows this process (see run_child)


def main() -> None:
    fire.Fire(benchmark)


if __name__ == "__main__":
    main()
