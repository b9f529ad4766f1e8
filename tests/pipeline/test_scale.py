"""Real parts at scale: a DVC remote round trip, experiment sweeps, multi-process extraction."""

from __future__ import annotations

import hashlib
import shutil
import sys

import numpy as np
import pytest
import yaml
from helpers import clone_pipeline, run
from mlflow import MlflowClient

from refusal_atlas.data import store

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]


def _digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "artifacts").rglob("*"))
        if p.is_file()
    }


def test_dvc_remote_round_trip(pipeline, tmp_path):
    origin = clone_pipeline(pipeline, tmp_path / "origin")
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], origin)
    run([*GIT, "add", "-A"], origin)
    run([*GIT, "commit", "-q", "-m", "pipeline results"], origin)
    run(["dvc", "push"], origin)

    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(origin), str(fresh)], tmp_path)
    run(["dvc", "pull"], fresh)
    assert "up to date" in run(["dvc", "status"], fresh).stdout
    repro = run(["dvc", "repro"], fresh).stdout
    assert "Running stage" not in repro, repro
    original, pulled = _digests(origin), _digests(fresh)
    assert sorted(set(original) - set(pulled)) == []
    assert [k for k, v in original.items() if pulled[k] != v] == []


def test_steering_only_experiment_reruns_only_steering_and_report(pipeline, tmp_path):
    repo = clone_pipeline(pipeline, tmp_path / "exp")
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-q", "-m", "results"], repo)
    # What a sweep of steering params would rerun: DVC's own plan for the edited params.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["steering"]["alphas"] = [0.5, 2.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = run(["dvc", "repro", "--dry"], repo).stdout
    run(["git", "checkout", "params.yaml"], repo)
    ran = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
    assert ran == {"steering", "report"}, ran

    out = run(["dvc", "exp", "run", "-n", "alpha-sweep", "-S", "steering.alphas=[0.5,2.0]", "steering"], repo).stdout
    assert "Running stage 'steering'" in out and "Running stage 'activations'" not in out
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("refusal-atlas")
    tagged = client.search_runs([exp.experiment_id], filter_string="tags.`dvc.exp_name` = 'alpha-sweep'")
    assert [r.info.run_name for r in tagged] == ["steering"]
    assert (
        client.get_run(tagged[0].data.tags["mlflow.parentRunId"]).data.tags["refusal_atlas.pipeline_key"]
        == "exp:alpha-sweep"
    )


def test_two_process_extraction_equals_one(pipeline, tmp_path):
    repo = clone_pipeline(pipeline, tmp_path / "dp")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["activations"]["num_processes"] = 2
    (repo / "params2.yaml").write_text(yaml.safe_dump(params))
    # One set is enough: the stage runs every set it finds the same way.
    for kind in ("prompts", "baseline"):
        (tmp_path / kind).mkdir()
        shutil.copy(repo / f"artifacts/{kind}/sets/benign.parquet", tmp_path / kind)
    args = [
        "--prompts",
        str(tmp_path / "prompts"),
        "--verdicts",
        str(tmp_path / "baseline"),
        "--model",
        "artifacts/model",
        "--out",
        str(tmp_path / "acts"),
        "--no-progress",
    ]
    out = tmp_path / "acts" / "benign.zarr"
    proc = run(
        [sys.executable, str(repo / "stages/activations.py"), "--params", "params2.yaml", *args],
        repo,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert "2 process(es)" in proc.stdout
    assert "Loading weights" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr[
        -1000:
    ]  # --no-progress hides transformers' bars too
    two = store.open_store(out)
    one = store.open_store(repo / "artifacts/activations/benign.zarr")
    assert list(two.prompt_id.values) == list(one.prompt_id.values)
    np.testing.assert_array_equal(store.load_resid(two), store.load_resid(one))
