"""The benchmark scripts refuse bad arguments with one `error:` line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
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
        ("blend_cv.py", ["--folds=1"], "error: --folds=1: must be at least 2"),
        ("blend_cv.py", ["--forests=[[100,-1]]"], "entry [100, -1]: must be [trees, depth]"),
        ("blend_cv.py", ["--benchmark_dir=/nonexistent"], "no b3db_classification"),
        ("chemnet_cv.py", ["--readouts=[mean]"], "error: --readouts: ['mean'] not among"),
        ("chemnet_cv.py", ["--shares=[0.5,1.5]"], "error: --shares=[0.5, 1.5]: each must lie"),
        ("chemnet_cv.py", ["--calibrations=[0,1]"], "error: --calibrations=[0, 1]: each 0"),
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


def test_cross_validation_folds_keep_scaffolds_whole_and_balanced(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from blend_cv import scaffold_folds

    # Groups of 6, 5, 4, 3, 2 and four singletons (24 molecules) into 3 folds.
    scaffolds = ["a"] * 6 + ["b"] * 5 + ["c"] * 4 + ["d"] * 3 + ["e"] * 2 + ["f", "g", "h", "i"]
    assignment = scaffold_folds(scaffolds, 3, seed=0)
    for scaffold in set(scaffolds):
        assert len({assignment[i] for i, name in enumerate(scaffolds) if name == scaffold}) == 1
    assert sorted(np.bincount(assignment, minlength=3).tolist()) == [8, 8, 8]
    assert (scaffold_folds(scaffolds, 3, seed=0) == assignment).all()  # seeded


def test_lone_scaffolds_are_the_molecules_alone_with_their_scaffold(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from blend_cv import lone_scaffolds

    scaffolds = ["c1ccccc1", "C1CCNCC1", "c1ccccc1", "", "c1ccncc1", ""]
    assert lone_scaffolds(scaffolds).tolist() == [False, True, False, False, True, False]


def test_cached_cross_validation_predictions_are_keyed_by_what_the_network_trains_with(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from blend_cv import cache_path

    default = cache_path("cache", seed=0, folds=5, extra=[])
    assert default == cache_path("cache", seed=0, folds=5, extra=[])
    # A network setting trains again; the default value spelled out does not.
    assert cache_path("cache", 0, 5, ["model.hidden_dim=32"]) != default
    assert cache_path("cache", 0, 5, ["model.hidden_dim=48"]) == default
    assert cache_path("cache", 1, 5, []) != default and cache_path("cache", 0, 4, []) != default
    # The fold runs fit no forest, so its settings reuse the cache.
    assert cache_path("cache", 0, 5, ["model.forest_weight=0.2"]) == default
    # Nor a kernel member, whose counts the network does not read.
    kernel = ["preprocess.kernel_fingerprint.size=64", "model.kernel_weight=0.2"]
    assert cache_path("cache", 0, 5, kernel) == default
    # Nor a ChemNet member, whose token ids the network does not read either.
    chemnet = ["preprocess.smiles_tokens=350", "model.chemnet_weight=0.5", "model.chemnet_c=3"]
    assert cache_path("cache", 0, 5, chemnet) == default
    assert cache_path("", 0, 5, []) is None


def test_bootstrap_difference_is_the_roc_auc_gap_with_its_spread_over_resamples(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from chemnet_cv import bootstrap_difference
    from sklearn.metrics import roc_auc_score

    generator = np.random.default_rng(0)
    labels = (generator.random(300) < 0.6).astype(float)  # [300]
    baseline = labels + generator.normal(0, 1.0, 300)  # a weak ranker
    candidate = labels + generator.normal(0, 0.5, 300)  # a stronger one
    difference, error = bootstrap_difference(labels, baseline, candidate, 200, seed=0)
    expected = roc_auc_score(labels, candidate) - roc_auc_score(labels, baseline)
    assert difference == pytest.approx(expected)
    assert 0.005 < error < 0.05  # a few hundred molecules: a spread of about a hundredth
    # The same predictions on both sides: no difference in any resample.
    assert bootstrap_difference(labels, baseline, baseline, 50, seed=0) == (0.0, 0.0)


def test_featurize_benchmark_runs_on_a_small_table(tmp_path):
    table = tmp_path / "small.csv"
    table.write_text(
        "smiles,label\nCCO,1\nc1ccccc1,0\nCC(=O)Oc1ccccc1C(=O)O,1\nC[C@H](N)C(=O)O,0\nC1CC,1\n"
    )
    process = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "featurize.py"),
            "data=csv",
            f"data.path={table}",
            "data.target_columns=[label]",
            "--repeats=1",
            "--runs=2",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    # 5 SMILES, the unclosed ring refused: 4 featurized, the same with 1 worker and with all.
    assert process.stdout.count("(5 in ") == 4  # 2 runs x (1 worker, all cores)
    assert process.stdout.count("4 featurized") == 4
    assert process.stdout.count("identical to the 1-worker results: True") == 2
    assert "all cores, 2 runs: median" in process.stdout
    assert "x the parse-only rate of one process (median)" in process.stdout
