"""SIGKILL a long stage mid-run, then `dvc repro` again: it resumes and the result equals an uninterrupted run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from helpers import VENV_BIN, clone_pipeline, run

from refusal_atlas.data import store

pytestmark = pytest.mark.slow
STAGE = "activations"


def _set_batch_size(repo, size):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["batch_size"] = size
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _done(path) -> int:
    try:
        return int(zarr.open_group(path, mode="r")["done"][:].sum())
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return 0


def test_killed_extraction_resumes_to_identical_data(demo_pipeline, tmp_path):
    """The default pipeline's benign store (320 prompts, 160 chunks of 2): the smoke profile's 40
    prompts extract in well under a second, too fast for a kill to land mid-store."""
    reference, killed = (
        clone_pipeline(demo_pipeline, tmp_path / "reference"),
        clone_pipeline(demo_pipeline, tmp_path / "killed"),
    )
    for repo in (reference, killed):
        # One prompt per batch gives many chunks, so a kill lands between finished chunks.
        _set_batch_size(repo, 2)
    run(["dvc", "repro", "--single-item", STAGE], reference)

    store_path = killed / "artifacts/activations/benign.zarr"
    shutil.rmtree(store_path)  # so the poll below watches the new store fill, not the old one
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        ["dvc", "repro", "--single-item", STAGE],
        cwd=killed,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    total = len(pd.read_parquet(killed / "artifacts/prompts/sets/benign.parquet"))
    deadline = time.monotonic() + 300
    target = np.random.default_rng().integers(total // 8, total // 2)
    while time.monotonic() < deadline and _done(store_path) < target and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _done(store_path)
    assert 0 < partial < total, f"the kill should land mid-extraction (done {partial} of {total})"
    with pytest.raises(store.StoreError, match="unfinished"):
        store.open_store(store_path)

    rerun = run(["dvc", "repro", "--single-item", STAGE], killed)
    assert "Running stage 'activations'" in rerun.stdout
    finished = store.open_store(store_path)
    expected = store.open_store(reference / "artifacts/activations/benign.zarr")
    np.testing.assert_array_equal(store.load_resid(finished), store.load_resid(expected))
    assert list(finished.prompt_id.values) == list(expected.prompt_id.values)
    assert run(["dvc", "status", STAGE], killed).stdout.strip().endswith("up to date.")


def _parts(folder) -> int:
    return len(list(folder.glob(".parts/*/*.json")))


def _kill_when(repo, stage, ready, timeout=600):
    """Start `dvc repro --single-item stage`, SIGKILL its process group once ``ready()``; return whether it was still
    running.

    The stage is made to look never run: its dvc.lock entry and DVC's run cache are removed
    first. Otherwise the rerun after the kill would just check the finished pipeline's outputs
    out of the DVC cache ("Stage ... is cached") instead of running, and prove nothing.
    """
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    del lock["stages"][stage]
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        ["dvc", "repro", "--single-item", stage],
        cwd=repo,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


@pytest.mark.parametrize(
    "stage, out, table",
    [
        ("baseline", "artifacts/baseline", "responses.parquet"),
        # The steering stage evaluates directions in name order; this one is first, and the only
        # one it recomputes once its folder is gone (the others' inputs did not change).
        ("steering", "artifacts/steering/crime_assistance", "responses.parquet"),
    ],
)
def test_killed_generation_keeps_finished_chunks_and_resumes_to_identical_rows(pipeline, tmp_path, stage, out, table):
    repo = clone_pipeline(pipeline, tmp_path / "killed")
    folder = repo / out
    if stage == "steering":
        shutil.rmtree(folder)
    # Kill at a random point after the first finished chunk, before the stage ends.
    at_least = int(np.random.default_rng().integers(1, 3))
    assert _kill_when(repo, stage, lambda: _parts(folder) >= at_least), f"{stage} finished before the kill"
    kept = _parts(folder)
    assert kept >= at_least

    rerun = run(["dvc", "repro", "--single-item", stage], repo)
    assert f"Running stage '{stage}'" in rerun.stdout
    # One message per generation it resumed (baseline: one; steering: one per intervention), together the chunks kept.
    resumed = [int(n) for n in re.findall(r"resuming, (\d+) of \d+ chunks already generated", rerun.stderr)]
    assert sum(resumed) == kept, rerun.stderr[-2000:]
    finished = pd.read_parquet(folder / table)
    expected = pd.read_parquet(pipeline / out / table)
    pd.testing.assert_frame_equal(finished, expected)
    assert not (folder / ".parts").exists()
    assert run(["dvc", "status", stage], repo).stdout.strip().endswith("up to date.")


def test_killed_demo_training_reruns_to_identical_weights(pipeline, tmp_path):
    """Training has no checkpoints to resume from (it is minutes long): the rerun starts over, and
    the atomic write means the kill leaves no half-written model directory behind.

    A much shorter training than the default keeps the test under a minute: an uninterrupted run
    of it is the reference."""
    repo = clone_pipeline(pipeline, tmp_path / "killed")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"]["demo"].update(steps=80, augment=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    weights = repo / "artifacts/model/weights"
    assert "Running stage 'model'" in run(["dvc", "repro", "--single-item", "model"], repo).stdout
    reference = {name: (weights / name).read_bytes() for name in ("model.safetensors", "tokenizer.json", "config.json")}

    started = time.monotonic()
    delay = float(np.random.default_rng().uniform(3, 10))
    assert _kill_when(repo, "model", lambda: time.monotonic() - started > delay), (
        "model training finished before the kill"
    )
    assert not weights.exists() or not any(weights.glob("*.safetensors"))
    assert "Running stage 'model'" in run(["dvc", "repro", "--single-item", "model"], repo).stdout
    assert {name: (weights / name).read_bytes() for name in reference} == reference
    assert run(["dvc", "status", "model"], repo).stdout.strip().endswith("up to date.")
