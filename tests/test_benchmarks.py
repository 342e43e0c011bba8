"""The benchmark scripts refuse bad arguments with one `error:` line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        ("train_quality.py", ["--task=bogus"], "--task='bogus': choose one of"),
        ("train_quality.py", ["--benchmark_dir=/nonexistent"], "no b3db_classification"),
        ("featurize.py", ["bogus.key=1"], "error: bogus.key: no such setting"),
        ("featurize.py", ["--runs=0"], "error: --runs=0 and --repeats=3 must be at least 1"),
        ("classical_baselines.py", ["--task=bogus"], "--task='bogus': choose one of"),
        ("classical_baselines.py", ["--fingerprint_size=0"], "must be at least 1"),
        (
            "triton_load.py",
            ["--http=http://127.0.0.1:9", "--protocols=http"],
            "error: no Triton server answers at http://127.0.0.1:9",
        ),
    ],
)
def test_a_bad_argument_is_one_error_line(script: str, arguments: list[str], message: str):
    process = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode != 0
    assert message in process.stderr, process.stderr[-2000:]
    assert "Traceback" not in process.stderr
