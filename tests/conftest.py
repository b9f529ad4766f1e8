"""Shared fixtures: the repository root, real copies of the repository to run DVC in."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VENV_BIN = Path(sys.executable).parent


def _env(extra: dict | None = None) -> dict:
    """The caller's environment with the venv first on PATH, offline, and no tracking URI or DVC settings.

    A tracking URI from the caller's shell must not leak into a test's pipeline run.
    """
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("DVC_")}
    return {**inherited, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1", **(extra or {})}


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run a real command with the venv first on PATH; on failure show its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def copy_repo(dest: Path) -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files into ``dest`` as a fresh git repo."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, listed.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel in ("dvc.lock",):
        (dest / rel).unlink(missing_ok=True)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]
    run(["git", "init", "-q"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-q", "-m", "copy"], dest)
    return dest


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip(f"{path} not present: the shared public datasets sit beside the checkout only on the team's machines")
    return path


def _needs_pipeline(item) -> bool:
    return "pipeline" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    """Tests that read the finished pipeline run last, so the others can run while it is built."""
    items.sort(key=_needs_pipeline)


@pytest.fixture(scope="session", autouse=True)
def _pipeline_build(request, tmp_path_factory):
    """Start the default pipeline as soon as the session starts, when any selected test needs it.

    `dvc repro model` runs first with the machine to itself, so the demo's recorded training time
    is an honest 2-core figure. The rest of `dvc repro` then runs in the background while the
    tests that do not need it go on (the pipeline's stages mostly wait on one core for imports).
    """
    if os.environ.get("REFUSAL_ATLAS_TEST_PIPELINE") or not any(map(_needs_pipeline, request.session.items)):
        yield None
        return
    repo = copy_repo(tmp_path_factory.mktemp("pipeline") / "repo")
    first = run(["dvc", "repro", "model"], repo, timeout=3600)
    log = (repo / "repro.log").open("w")
    log.write(first.stdout + first.stderr)
    log.flush()
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield repo, proc
    finally:
        if proc.poll() is None:  # the session ended first: stop dvc and the stage it is running
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


@pytest.fixture(scope="session")
def pipeline(_pipeline_build, tmp_path_factory) -> Path:
    """A fresh copy of the repository after a full `dvc repro` of the default (demo) pipeline.

    Session-scoped: the whole pipeline runs once, and the end-to-end tests read its outputs.
    Tests that change the repository copy it again first (``clone_pipeline``). With
    REFUSAL_ATLAS_TEST_PIPELINE=<repo with a finished pipeline> a copy of that is used instead.
    """
    reuse = os.environ.get("REFUSAL_ATLAS_TEST_PIPELINE")
    if reuse:  # iterate on the end-to-end tests against a finished pipeline (never set in CI)
        repo = tmp_path_factory.mktemp("pipeline") / "repo"
        shutil.copytree(reuse, repo, symlinks=True, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
        return repo
    repo, proc = _pipeline_build
    if proc.wait(timeout=3600) != 0:
        raise AssertionError(f"dvc repro exited {proc.returncode}:\n{(repo / 'repro.log').read_text()[-6000:]}")
    return repo


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` process (the `refusal-atlas ui` command line) on a free loopback port."""

    def __init__(self, repo: Path, log: Path):
        import time
        import urllib.request

        from refusal_atlas.cli import server_command

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen(server_command(repo, "127.0.0.1", self.port), cwd=repo, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {self.proc.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow server did not become healthy in 90 s: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def clone_pipeline(pipeline: Path, dest: Path) -> Path:
    """A copy of the finished pipeline repository (artifacts, DVC cache, MLflow store and all) to change freely."""
    shutil.copytree(pipeline, dest, symlinks=True)
    return dest


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    """A page in Debian's headless Chromium, driven by Playwright (which downloads no browser of its own).

    Skips when Chromium is missing, unless REQUIRE_BROWSER=1 (set by .ci/run) makes that a failure.
    """
    import tempfile

    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("REQUIRE_BROWSER=1 but Debian's chromium is not installed (apt-get install -y chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); set REQUIRE_BROWSER=1 to make this a failure")
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=path, args=args, headless=True,
                                                       viewport={"width": width, "height": height})
        try:
            yield context.new_page()
        finally:
            context.close()
