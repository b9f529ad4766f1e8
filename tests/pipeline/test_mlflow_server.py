"""A real `mlflow server`: the pipeline logs through it, the REST API shows the runs, a browser shows the UI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from helpers import VENV_BIN, MlflowServer, Postgres, browser_page, clone_pipeline, run

from refusal_atlas.pipeline.tracking import runs_url

pytestmark = pytest.mark.slow
KEY, OTHER = "served-pipeline", "served-again"


@contextlib.contextmanager
def _serve(pipeline: Path, base: Path, backend: str | None = None):
    """A copy of the smoke pipeline whose stages logged two executions through a real server on ``backend``."""
    repo = clone_pipeline(pipeline, base / "repo")
    server = MlflowServer(repo, base / "server.log", backend)
    try:
        # Two executions of the same stages, as two settings or two models would be.
        for key in (KEY, OTHER):
            run(
                ["dvc", "repro", "-f", "--single-item", "prompts", "geometry", "report"],
                repo,
                env={"MLFLOW_TRACKING_URI": server.url, "REFUSAL_ATLAS_PIPELINE_KEY": key},
            )
        yield repo, server
    finally:
        server.stop()
    assert server.proc.poll() is not None, "the server was stopped"


@pytest.fixture(scope="module")
def served(pipeline, tmp_path_factory):
    """On the project's sqlite store (what `refusal-atlas ui` serves)."""
    with _serve(pipeline, tmp_path_factory.mktemp("served")) as out:
        yield out


@pytest.fixture(scope="module")
def served_postgres(pipeline, tmp_path_factory):
    """On a real PostgreSQL server (a team's set-up: operations.md)."""
    base = tmp_path_factory.mktemp("served-postgres")
    database = Postgres(base / "postgres.log")
    try:
        with _serve(pipeline, base, database.uri) as out:
            yield out
    finally:
        database.remove()


def _api(server, path, body=None):
    url = f"{server.url}/api/2.0/mlflow/{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST" if data else "GET"
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _runs(server, key=KEY):
    exp = _api(server, "experiments/get-by-name?experiment_name=refusal-atlas")["experiment"]
    found = _api(
        server,
        "runs/search",
        {
            "experiment_ids": [exp["experiment_id"]],
            "filter": f"tags.`refusal_atlas.pipeline_key` = '{key}'",
            "max_results": 100,
        },
    )
    return exp, found["runs"]


def _tags(r):
    return {t["key"]: t["value"] for t in r["data"].get("tags", [])}


@pytest.mark.parametrize("backend", ["served", "served_postgres"])
def test_runs_metrics_inputs_and_artifacts_through_the_rest_api(backend, request, pipeline):
    _, server = request.getfixturevalue(backend)
    _, runs = _runs(server)
    parents = [r for r in runs if _tags(r).get("refusal_atlas.role") == "pipeline"]
    assert len(parents) == 1
    children = {
        r["info"]["run_name"]: r for r in runs if _tags(r).get("mlflow.parentRunId") == parents[0]["info"]["run_id"]
    }
    assert set(children) == {"prompts", "geometry", "report"}
    # The parent ended with its last stage and carries the execution's headline numbers.
    parent = parents[0]
    assert (
        parent["info"]["status"] == "FINISHED" and parent["info"]["end_time"] >= children["report"]["info"]["end_time"]
    )
    headline = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    geometry = {m["key"]: m["value"] for m in children["geometry"]["data"]["metrics"]}
    assert headline["geometry.cosine_offdiag_mean"] == geometry["cosine_offdiag_mean"]
    assert {
        "pooled.add_1.rr",
        "pooled.add_1.orr",
        "pooled.ablate.rr",
        "shared_knob.inconclusive",
        "judge.keywords_vs_substring.kappa",
    } <= set(headline)
    assert {p["key"]: p["value"] for p in parent["data"]["params"]}["model"] == "demo"
    metrics = {m["key"]: m["value"] for m in children["geometry"]["data"]["metrics"]}
    assert -1 <= metrics["cosine_offdiag_mean"] <= 1
    inputs = children["prompts"]["inputs"]["dataset_inputs"]
    assert inputs[0]["dataset"]["name"] == "prompts" and len(inputs[0]["dataset"]["digest"]) <= 36
    query = urllib.parse.urlencode(
        {"path": "figures/cosine_heatmap.png", "run_uuid": children["geometry"]["info"]["run_id"]}
    )
    with urllib.request.urlopen(f"{server.url}/get-artifact?{query}", timeout=30) as resp:
        assert resp.read()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_ui_in_a_real_browser(served, tmp_path):
    _, server = served
    exp, runs = _runs(server)
    parent = next(r for r in runs if _tags(r).get("refusal_atlas.role") == "pipeline")
    other = next(r for r in _runs(server, OTHER)[1] if _tags(r).get("refusal_atlas.role") == "pipeline")
    geometry = next(r for r in runs if r["info"]["run_name"] == "geometry")
    shots = Path(os.environ.get("TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    with browser_page() as page:
        # The address `refusal-atlas ui` prints opens the runs table (not MLflow 3's GenAI overview of traces).
        page.goto(runs_url(server.url, exp["experiment_id"]), timeout=60000)
        page.get_by_role("link", name=f"pipeline {KEY}", exact=True).first.wait_for(timeout=60000)
        page.get_by_role("link", name=f"pipeline {OTHER}", exact=True).first.wait_for(timeout=60000)
        assert "overview" not in page.url and "traces" not in page.url, page.url
        page.screenshot(path=str(shots / "mlflow_experiment_runs.png"), full_page=True)

        # Two executions side by side in the compare view, headline metrics and the model as rows.
        ids = json.dumps([parent["info"]["run_id"], other["info"]["run_id"]])
        page.goto(
            f"{server.url}/#/compare-runs?runs={ids}&experiments={json.dumps([exp['experiment_id']])}", timeout=60000
        )
        for text in (f"pipeline {KEY}", f"pipeline {OTHER}", "geometry.cosine_offdiag_mean", "pooled.add_1.rr"):
            page.get_by_text(text, exact=True).first.wait_for(timeout=60000)
        page.screenshot(path=str(shots / "mlflow_compare_executions.png"), full_page=True)

        page.goto(f"{server.url}/#/experiments/{exp['experiment_id']}/runs/{parent['info']['run_id']}", timeout=60000)
        page.wait_for_load_state("domcontentloaded", timeout=60000)
        page.get_by_text("Child runs").first.wait_for(timeout=60000)
        for stage in ("prompts", "geometry"):  # the stage runs, listed as links to themselves
            page.get_by_role("link", name=stage, exact=True).wait_for(timeout=60000)
        page.screenshot(path=str(shots / "mlflow_parent_run.png"), full_page=True)

        page.goto(
            f"{server.url}/#/experiments/{exp['experiment_id']}/runs/{geometry['info']['run_id']}/artifacts/figures/cosine_heatmap.png",
            timeout=60000,
        )
        page.get_by_text("figures/cosine_heatmap.png").first.wait_for(timeout=60000)
        # The UI fetches the artifact and shows it from a blob: URL.
        image = page.locator("img[src^='blob:']")
        image.first.wait_for(timeout=60000)
        assert page.evaluate("(img) => img.complete && img.naturalWidth", image.first.element_handle()) > 100
        page.screenshot(path=str(shots / "mlflow_cosine_heatmap.png"), full_page=True)


@pytest.mark.parametrize("what", ["server", "database"])
def test_server_dying_mid_run_keeps_the_outputs_and_fails_clearly(pipeline, tmp_path, what):
    """The tracking server (on sqlite), or the PostgreSQL database under a server, stops while a stage runs: the
    stage still writes its outputs, then exits non-zero with a message that says what was lost, so DVC does not
    record it as done; once the database is back, a rerun completes and is logged."""
    repo = clone_pipeline(pipeline, tmp_path / "dies")
    shutil.rmtree(repo / ".dvc/cache/runs", ignore_errors=True)  # run the stage, not a cached copy
    stage, out = "steering", repo / "artifacts/steering/random_0"
    shutil.rmtree(out)  # the one direction the stage evaluates again (the others are up to date)
    database = Postgres(tmp_path / "postgres.log") if what == "database" else None
    server = MlflowServer(repo, tmp_path / "server.log", database and database.uri)
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": server.url,
        "REFUSAL_ATLAS_PIPELINE_KEY": "dies-mid-run",
    }
    proc = subprocess.Popen(
        ["dvc", "repro", "--force", "--single-item", stage],
        cwd=repo,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        search = {"filter": f"attributes.run_name = '{stage}' and tags.`refusal_atlas.pipeline_key` = 'dies-mid-run'"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:  # a fresh database has no experiment until the stage creates it
                exp = _api(server, "experiments/get-by-name?experiment_name=refusal-atlas")["experiment"]
            except urllib.error.HTTPError:
                time.sleep(0.3)
                continue
            search["experiment_ids"] = [exp["experiment_id"]]
            if _api(server, "runs/search", search).get("runs"):
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the stage finished before the server could be stopped"
        if database:
            database.stop("immediate")
        else:
            server.stop()
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode != 0
        assert f"failed during stage '{stage}'" in stderr and "outputs were written" in stderr, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / "responses.parquet"),
            pd.read_parquet(pipeline / "artifacts/steering/random_0/responses.parquet"),
        )
        if database:  # back up: the rerun completes (the stage's finished work kept) and is logged
            database.start()
            # The outputs equal those dvc.lock already holds, so DVC would skip the stage: force it, as the
            # message says.
            assert f"`dvc repro -f -s {stage}` where dvc.lock already holds the same outputs" in stderr
            rerun = subprocess.run(["dvc", "repro", "-f", "-s", stage], cwd=repo, env=env, capture_output=True)
            assert rerun.returncode == 0, rerun.stderr[-3000:]
            assert run(["dvc", "status", stage], repo).stdout.strip() == "Data and pipelines are up to date."
            # The run that lost its database is closed as KILLED when the stage runs again.
            runs = _api(server, "runs/search", search)["runs"]
            assert sorted(r["info"]["status"] for r in runs) == ["FINISHED", "KILLED"]
    finally:
        server.stop()
        if database:
            database.remove()
