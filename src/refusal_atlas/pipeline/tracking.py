"""MLflow tracking: the only module that imports mlflow.

Every stage logs one run, nested under one parent run per pipeline execution. The
parent is found (or created) by the tag ``refusal_atlas.pipeline_key``: the DVC
experiment name when running under ``dvc exp run``, else the git commit, the dirty
flag and a digest of params.yaml. The parent is reopened (RUNNING) by each stage and ends
with it: FINISHED after a stage that finished, FAILED after one that failed. The report
stage puts the execution's headline metrics and the model's name on it, so the runs
table compares executions. The experiment carries MLflow's kind tag for classic model
development, so the UI opens on its runs.

Failure policy. A remote server that cannot be reached at the start fails the stage
within ``tracking.timeout_s``, before any heavy work. A server that dies mid-run does
not stop the computation: the stage writes its outputs, then exits non-zero with a
``TrackingError`` that says what was lost. DVC therefore does not record the stage in
dvc.lock, and the next ``dvc repro`` reruns it (resuming where the stage can) and logs
it properly; outputs are never recorded as done without their run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from refusal_atlas.digest import file_sha256
from refusal_atlas.errors import RefusalAtlasError

PIPELINE_KEY_TAG = "refusal_atlas.pipeline_key"
# MLflow 3's UI opens an experiment without a kind on its GenAI overview (traces); this kind
# opens it on the runs table where the UI reads the kind (MLflow 3.0-3.x before the global
# GenAI / Model training switch). The UI of MLflow 3.17 ignores it and follows the switch,
# which defaults to GenAI: its runs table is reached by the URL that ``runs_url`` builds.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
RUNS_VIEW = "workflowType=machine_learning"
TRACKED_PACKAGES = (
    "refusal-atlas",
    "torch",
    "transformers",
    "accelerate",
    "dvc",
    "mlflow",
    "zarr",
    "xarray",
    "scikit-learn",
    "numpy",
)
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def experiment_id(uri: str, name: str) -> str | None:
    """The id of experiment ``name`` in a tracking store, None if it has none yet (a sqlite
    store whose file does not exist yet is not created)."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    return found.experiment_id if found else None


def runs_url(server: str, experiment_id: str | None) -> str:
    """The UI address of an experiment's runs table (MLflow's model-training view, not GenAI)."""
    return (
        f"{server.rstrip('/')}/#/experiments/{experiment_id}?{RUNS_VIEW}"
        if experiment_id
        else f"{server.rstrip('/')}/#/experiments?{RUNS_VIEW}"
    )


class TrackingError(RefusalAtlasError, RuntimeError):
    """The tracking server is unreachable or failed during the run."""


def home_repo(repo_root: Path) -> Path:
    """The user's repository: ``repo_root`` itself, or for a ``dvc exp run --temp`` copy
    (``<repo>/.dvc/tmp/exps/<tmp>/``) the repository it was copied from."""
    parts = repo_root.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i + 1 : i + 4] == (".dvc", "tmp", "exps"):
            return Path(*parts[: i + 1])
    return repo_root.resolve()


def resolve_tracking_uri(configured: str | None, repo_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > absolute ``sqlite:///<repo>/mlflow.db``.

    The default is absolute because MLflow's own default is relative to the working
    directory, and relative paths resolve against the user's repository (``home_repo``),
    so runs of a ``dvc exp run --temp`` copy land in the same store as ``dvc repro``'s.
    """
    repo_root = home_repo(repo_root)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        return f"sqlite:///{(repo_root / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(repo_root / uri[len('sqlite:///') :]).resolve()}"
    return uri


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_root(repo_root: Path) -> Path:
    """Where a local store keeps run artifacts (served by ``refusal-atlas ui`` too)."""
    return home_repo(repo_root) / "mlartifacts"


def redact_uri(uri: str) -> str:
    """The URI without any ``user:password@`` part, safe to print."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast (within ``timeout_s``) if an http(s) tracking server does not answer."""
    if not is_remote(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise TrackingError(f"tracking server {redact_uri(uri)} answered {resp.status} on /health")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {redact_uri(uri)} ({getattr(err, 'reason', err)}). "
            "Start it (refusal-atlas ui, or your team's server), or unset MLFLOW_TRACKING_URI / tracking.uri "
            "to log to the local sqlite store."
        ) from None


def _git(repo_root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_state(repo_root: Path) -> dict[str, str]:
    """Commit and dirty flag of the repository (empty commit outside git)."""
    commit = _git(repo_root, "rev-parse", "HEAD")
    dirty = bool(_git(repo_root, "status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit or "unknown", "git_dirty": str(dirty).lower()}


def pipeline_key(repo_root: Path, params_path: Path) -> str:
    """Key that groups the stage runs of one pipeline execution under one parent:
    ``REFUSAL_ATLAS_PIPELINE_KEY``, else the DVC experiment, else commit + params digest."""
    if os.environ.get("REFUSAL_ATLAS_PIPELINE_KEY"):
        return os.environ["REFUSAL_ATLAS_PIPELINE_KEY"]
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp:{os.environ['DVC_EXP_NAME']}"
    # The dirty flag is left out on purpose: DVC's autostage dirties the tree after the
    # first stage (dvc.lock), which would split one execution over two parents. Each run
    # still records its own git_dirty tag.
    commit = git_state(repo_root)["git_commit"]
    digest = file_sha256(params_path)[:12] if params_path.exists() else "none"
    return f"git:{commit[:12]}:params:{digest}"


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "absent"
    out["version.python"] = sys.version.split()[0]
    return out


def dvc_digest(path: Path) -> str:
    """DVC's own md5 of a file or folder (``<md5>.dir`` for folders), as dvc.lock records it.

    Computed with dvc-data, so it is available before dvc.lock is written. SQL tracking
    stores cap dataset digests at 36 characters; an md5 with DVC's ``.dir`` suffix fits.
    """
    import tempfile

    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value[:36]


def _flatten(prefix: str, value: object, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = json.dumps(value) if not isinstance(value, str) else value
        out[prefix] = text[:6000]


class StageRun:
    """Narrow logging interface handed to a stage. Every call survives a dead server:
    the first failure is kept and reported when the stage's block ends."""

    def __init__(self, mlflow_module, run_id: str, uri: str, repo_root: Path, parent_id: str | None = None):
        self._mlflow = mlflow_module
        self.repo_root = repo_root
        self.run_id = run_id
        self.parent_id = parent_id
        self.uri = uri
        self.error: Exception | None = None

    def _call(self, fn, *args, **kwargs) -> None:
        if self.error is not None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any client failure means the server is gone
            self.error = err
            print(
                f"refusal-atlas: MLflow logging failed ({type(err).__name__}: {err}); continuing so outputs are "
                "written",
                file=sys.stderr,
            )

    def log_params(self, params: dict[str, object]) -> None:
        flat: dict[str, str] = {}
        _flatten("", params, flat)
        self._call(self._mlflow.log_params, flat)

    def set_tags(self, tags: dict[str, object]) -> None:
        self._call(self._mlflow.set_tags, {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        flat: dict[str, str] = {}
        _flatten("", metrics, flat)
        numeric = {k.replace("@", "_"): float(v) for k, v in flat.items() if _is_number(v)}
        if numeric:
            self._call(self._mlflow.log_metrics, numeric, step=step)

    def log_input(self, path: Path, context: str = "input") -> None:
        """Log a file or folder the stage read, with DVC's md5 as the dataset digest."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        rel = os.path.relpath(path.resolve(), self.repo_root)
        dataset = MetaDataset(source=LocalArtifactDatasetSource(str(path.resolve())), name=rel, digest=dvc_digest(path))
        self._call(self._mlflow.log_input, dataset, context=context)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self._call(self._mlflow.log_artifacts, str(path), artifact_path=artifact_path)
        else:
            self._call(self._mlflow.log_artifact, str(path), artifact_path=artifact_path)

    def log_identity(self, identity: dict) -> None:
        """The model identity record, as ``model.*`` tags and an identity.json artifact."""
        self.set_tags({f"model.{k}": v for k, v in identity.items()})
        self.log_dict(identity, "identity.json")

    def log_dict(self, data: dict, name: str) -> None:
        self._call(self._mlflow.log_dict, data, name)

    def log_headline(self, metrics: dict, params: dict[str, object]) -> None:
        """Metrics and params of the whole execution, on its parent run, so that the runs table
        compares executions (models, settings) without opening them."""
        if self.parent_id is None:
            return
        flat: dict[str, str] = {}
        _flatten("", metrics, flat)
        client = self._mlflow.MlflowClient(self.uri)
        for key, value in flat.items():
            if _is_number(value):
                self._call(client.log_metric, self.parent_id, key.replace("@", "_"), float(value))
        for key, value in params.items():
            self._call(client.log_param, self.parent_id, key, str(value))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text not in ("true", "false")


@contextmanager
def stage_run(
    stage: str,
    params: dict[str, object],
    repo_root: Path,
    *,
    uri: str | None = None,
    experiment: str = "refusal-atlas",
    timeout_s: float = 8.0,
    params_path: Path | None = None,
) -> Iterator[StageRun]:
    """Open the stage's MLflow run, nested under the pipeline's parent run.

    ``params`` are the params the stage read. Raises ``TrackingError`` within
    ``timeout_s`` when a remote server is unreachable, and after the block when
    logging failed mid-run.
    """
    repo_root = repo_root.resolve()
    uri = resolve_tracking_uri(uri, repo_root)
    # Bound every client request so that a dead server fails fast instead of retrying for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    check_reachable(uri, timeout_s)

    import mlflow

    run_name = os.environ.get("DVC_STAGE") or stage
    key = pipeline_key(repo_root, params_path or repo_root / "params.yaml")
    tags = {PIPELINE_KEY_TAG: key, "refusal_atlas.stage": stage, **git_state(repo_root), **package_versions()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    try:
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            # A local store keeps artifacts beside mlflow.db at an absolute path, so runs made in
            # `dvc exp run --temp` copies land in the same place; a server decides for itself.
            location = None if is_remote(uri) else artifact_root(repo_root).as_uri()
            client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        exp = mlflow.set_experiment(experiment)
        for tag, value in EXPERIMENT_TAGS.items():  # an experiment made before the tag existed
            if exp.tags.get(tag) != value:
                client.set_experiment_tag(exp.experiment_id, tag, value)
        parents = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`refusal_atlas.role` = 'pipeline'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if parents:
            parent_id = parents[0].info.run_id
            client.update_run(parent_id, status="RUNNING")  # a later stage of the execution reopens it
        else:
            parent = client.create_run(
                exp.experiment_id,
                run_name=f"pipeline {key}",
                tags={PIPELINE_KEY_TAG: key, "refusal_atlas.role": "pipeline", **git_state(repo_root)},
            )
            parent_id = parent.info.run_id
        # A run of this stage that never ended (its process was killed, or lost its server mid-run) is closed as
        # KILLED, so the UI shows no stage running that is not.
        stale = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.run_name = '{run_name}' and "
            "attributes.status = 'RUNNING'",
        )
        for old in stale:
            client.set_terminated(old.info.run_id, status="KILLED")
        active = mlflow.start_run(
            run_name=run_name, tags={**tags, "mlflow.parentRunId": parent_id, "refusal_atlas.role": "stage"}
        )
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - a store that cannot open is a clear, early failure
        raise TrackingError(f"cannot open an MLflow run at {redact_uri(uri)}: {type(err).__name__}: {err}") from None

    run = StageRun(mlflow, active.info.run_id, uri, repo_root, parent_id)
    run.log_params(params)
    status, start = "FAILED", time.perf_counter()
    try:
        yield run
        status = "FINISHED"
    finally:
        run.log_metrics({"stage_wall_s": time.perf_counter() - start})
        try:
            mlflow.end_run(status=status)
            # The parent ends with each stage: FINISHED after the last one, FAILED where one failed.
            client.set_terminated(parent_id, status=status)
        except Exception as err:  # noqa: BLE001
            run.error = run.error or err
    if run.error is not None:
        raise TrackingError(
            f"MLflow logging to {redact_uri(uri)} failed during stage '{run_name}': {type(run.error).__name__}: "
            f"{run.error}. The stage's outputs were written, but its run is incomplete, so the stage exits non-zero "
            "and DVC does not record it in dvc.lock; rerun `dvc repro` once the server is back (`dvc repro -f -s "
            f"{run_name}` where dvc.lock already holds the same outputs)."
        )
