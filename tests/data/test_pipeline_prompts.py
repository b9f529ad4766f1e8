"""`dvc repro prompts` in a real copy of the repository, tracked in a real MLflow sqlite store."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from helpers import run
from mlflow import MlflowClient


@pytest.mark.slow
def test_dvc_repro_prompts_logs_a_nested_run(repo_copy):
    run(["dvc", "repro", "prompts"], repo_copy)
    table = pd.read_parquet(repo_copy / "artifacts/prompts/prompts.parquet")
    assert list(table.columns) == ["prompt_id", "category", "role", "split", "text", "source", "sha256"]
    summary = json.loads((repo_copy / "artifacts/prompts/summary.json").read_text())
    assert summary["total"] == len(table)

    client = MlflowClient(f"sqlite:///{repo_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("refusal-atlas")
    runs = client.search_runs([exp.experiment_id])
    stage = next(r for r in runs if r.info.run_name == "prompts")
    parent = client.get_run(stage.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["refusal_atlas.role"] == "pipeline"
    assert stage.data.tags["refusal_atlas.pipeline_key"] == parent.data.tags["refusal_atlas.pipeline_key"]
    assert stage.data.metrics["n_prompts"] == len(table)
    assert stage.data.metrics["count.benign"] == (table.category == "benign").sum()
    assert stage.data.params["prompts.min_per_category"] == "48"
    assert stage.data.tags["git_commit"] != "unknown" and "version.mlflow" in stage.data.tags
    inputs = stage.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "prompts"
    lock = (repo_copy / "dvc.lock").read_text()
    assert inputs[0].dataset.digest in lock, "the dataset digest is DVC's md5 of the prompts folder"

    # A second repro runs nothing, and a second pipeline execution reuses the parent.
    again = run(["dvc", "repro", "prompts"], repo_copy)
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout
    run(["dvc", "repro", "-f", "prompts"], repo_copy)
    parents = [
        r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("refusal_atlas.role") == "pipeline"
    ]
    assert len(parents) == 1
