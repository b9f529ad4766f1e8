"""Tracking: the URI rules, fail-fast on an unreachable server, and no secrets in runs."""

from __future__ import annotations

import socket
import sys
import time

from helpers import REPO, run
from mlflow import MlflowClient

from refusal_atlas.pipeline.tracking import (
    artifact_root,
    experiment_id,
    pipeline_key,
    redact_uri,
    resolve_tracking_uri,
    runs_url,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_uri_is_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/rel.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "http://127.0.0.1:1"


def test_a_dvc_exp_temp_copy_logs_to_the_users_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    assert resolve_tracking_uri(None, copy) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/m.db", copy) == f"sqlite:///{tmp_path.resolve()}/runs/m.db"
    assert artifact_root(copy) == tmp_path.resolve() / "mlartifacts"
    assert artifact_root(tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve() / "mlartifacts"


def test_redact_uri_hides_credentials():
    assert redact_uri("postgresql://user:pw@db:5432/m") == "postgresql://***@db:5432/m"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_pipeline_key_prefers_the_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv("REFUSAL_ATLAS_PIPELINE_KEY", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-1")
    assert pipeline_key(tmp_path, tmp_path / "params.yaml") == "exp:sweep-1"
    monkeypatch.delenv("DVC_EXP_NAME")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    key = pipeline_key(tmp_path, tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert key.startswith("git:") and key != pipeline_key(tmp_path, tmp_path / "params.yaml")


def test_unreachable_server_fails_fast_before_work(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    proc = run(
        [sys.executable, str(REPO / "stages/prompts.py"), "--out", str(out)],
        cwd=REPO,
        check=False,
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"},
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2 and elapsed < 10, (elapsed, proc.stderr)
    assert "cannot reach the MLflow tracking server" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_secrets_never_reach_mlflow(tmp_path):
    db = tmp_path / "mlflow.db"
    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-1", "HF_TOKEN": "hf_token_value_2", "MY_API_KEY": "key-value-3"}
    params = tmp_path / "params.yaml"
    params.write_text(f"prompts:\n  manifest: {REPO / 'prompts/manifest.yaml'}\ntracking:\n  uri: sqlite:///{db}\n")
    run(
        [sys.executable, str(REPO / "stages/prompts.py"), "--params", str(params), "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=secrets,
    )
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for r in runs:
        logged = " ".join(f"{k}={v}" for k, v in {**r.data.params, **r.data.tags}.items())
        for name, value in secrets.items():
            assert value not in logged and name not in logged


def test_the_parent_run_ends_with_each_stage_and_a_later_stage_reopens_it(tmp_path, monkeypatch):
    """FINISHED after a stage that finished, FAILED after one that failed, RUNNING while one runs;
    the experiment opens on its runs (kind tag); the report's headline lands on the parent."""
    import pytest

    from refusal_atlas.pipeline.tracking import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("REFUSAL_ATLAS_PIPELINE_KEY", "lifecycle")
    (tmp_path / "params.yaml").write_text("{}\n")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    def parent():
        exp = client.get_experiment_by_name("refusal-atlas")
        return next(
            r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("refusal_atlas.role") == "pipeline"
        )

    with stage_run("prompts", {}, tmp_path) as run:
        assert parent().info.status == "RUNNING"
    assert parent().info.status == "FINISHED" and parent().info.end_time is not None
    assert client.get_experiment_by_name("refusal-atlas").tags["mlflow.experimentKind"] == "custom_model_development"
    with pytest.raises(RuntimeError), stage_run("baseline", {}, tmp_path):
        raise RuntimeError("a stage fails")
    assert parent().info.status == "FAILED"
    with stage_run("report", {}, tmp_path) as run:
        assert parent().info.status == "RUNNING"
        run.log_headline({"geometry": {"cosine_offdiag_mean": 0.25}, "note": "not a number"}, {"model": "demo"})
    done = parent()
    assert done.info.status == "FINISHED"
    assert done.data.metrics == {"geometry.cosine_offdiag_mean": 0.25} and done.data.params == {"model": "demo"}
    stages = [
        r for r in client.search_runs([done.info.experiment_id]) if r.data.tags.get("refusal_atlas.role") == "stage"
    ]
    assert sorted((r.info.run_name, r.info.status) for r in stages) == [
        ("baseline", "FAILED"),
        ("prompts", "FINISHED"),
        ("report", "FINISHED"),
    ]
    assert all(r.data.metrics["stage_wall_s"] >= 0 for r in stages)


def test_the_ui_address_opens_the_runs_of_an_existing_experiment_and_creates_no_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert experiment_id(uri, "refusal-atlas") is None and not (tmp_path / "mlflow.db").exists()
    made = MlflowClient(tracking_uri=uri).create_experiment("refusal-atlas")
    assert experiment_id(uri, "refusal-atlas") == made and experiment_id(uri, "other") is None
    assert (
        runs_url("http://127.0.0.1:5000/", made)
        == f"http://127.0.0.1:5000/#/experiments/{made}?workflowType=machine_learning"
    )
