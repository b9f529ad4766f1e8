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
import yaml

# Two torch processes on 2 cores (a test beside the background pipelines) spin-wait on each
# other's cores with OpenMP's default policy: demo training measured 1.3-2.4 s a step beside the
# unit tests against 0.13 s alone. Passive waiting lets them share. Set before torch loads, and
# inherited by every stage process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VENV_BIN = Path(sys.executable).parent


def _env(extra: dict | None = None) -> dict:
    """The caller's environment with the venv first on PATH, offline, and no tracking URI or DVC settings.

    A tracking URI from the caller's shell must not leak into a test's pipeline run.
    """
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("DVC_")}
    return {
        **inherited,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        **(extra or {}),
    }


def run(
    cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: float = 1800
) -> subprocess.CompletedProcess:
    """Run a real command with the venv first on PATH; on failure show its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def copy_repo(dest: Path) -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files into ``dest`` as a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
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


def reduce_repo(repo, sets: list[str], per_set: dict[str, int]) -> None:
    """Cut a repository copy down to ``sets`` (categories plus their baseline pools) with ``per_set[name]`` prompts each."""
    manifest = yaml.safe_load((repo / "prompts/manifest.yaml").read_text())
    manifest["categories"] = {k: v for k, v in manifest["categories"].items() if k in sets}
    manifest["baselines"] = {k: v for k, v in manifest["baselines"].items() if k in sets}
    (repo / "prompts/manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    for path in (repo / "prompts").glob("*.jsonl"):
        if path.stem in sets:
            path.write_text("".join(path.read_text().splitlines(keepends=True)[: per_set[path.stem]]))
        else:
            path.unlink()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


def shared_datasets() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip(
            f"{path} not present: the shared public datasets sit beside the checkout only on the team's machines"
        )
    return path


# The two pipelines the end-to-end tests read, by fixture name: `pipeline` is the smoke profile
# (profiles/smoke.yaml: every stage, on every category, with little work), built in about two
# minutes; `demo_pipeline` is the default demo pipeline (params.yaml, what `make repro` runs),
# needed only by the tests of the demo's behaviour.
PIPELINES = {"pipeline": "profiles/smoke.yaml", "demo_pipeline": None}


def _needs(item) -> list[str]:
    return [name for name in PIPELINES if name in getattr(item, "fixturenames", ())]


def pytest_collection_modifyitems(items):
    """Tests that read a finished pipeline run last (the demo's after the smoke's), so the others run while they are built."""
    items.sort(key=lambda item: max((list(PIPELINES).index(n) + 1 for n in _needs(item)), default=0))


def apply_profile(repo: Path, profile: str) -> None:
    """Write a params profile's keys into ``repo``'s params.yaml (validated, as `refusal-atlas experiment` does) and commit."""
    from refusal_atlas.config import profile_overrides

    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in profile_overrides(repo / profile, repo / "params.yaml").items():
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=test", "commit", "-qam", f"params: {profile}"], repo)


class _Builds:
    """The pipelines a session needs, built by one background shell, one after the other.

    Each pipeline's `dvc repro model` (demo training) runs first with the machine to itself
    (blocking), so the default's recorded training time is an honest 2-core figure; then the
    smoke pipeline and the rest of the default one are built in the background while the tests
    that need neither run.
    """

    def __init__(self, names: list[str], root: Path):
        self.repos = {}
        script = []
        for name in names:
            repo = self.repos[name] = copy_repo(root / name / "repo")
            if PIPELINES[name]:
                apply_profile(repo, PIPELINES[name])
        for name in names:  # training, the heaviest stage, each alone (the default one's time is a recorded metric)
            # Alone, OpenMP's active waiting is the faster (passive: 0.20 against 0.13 s a demo step).
            first = run(["dvc", "repro", "model"], self.repos[name], env={"OMP_WAIT_POLICY": "ACTIVE"}, timeout=3600)
            (self.repos[name] / "repro.log").write_text(first.stdout + first.stderr)
        for name in names:  # the smoke pipeline first: most tests wait on it
            script.append(
                f"cd {self.repos[name]} && dvc repro >> repro.log 2>&1; echo $? > {self.repos[name]}/repro.rc"
            )
        self.proc = subprocess.Popen(["bash", "-c", "; ".join(script)], env=_env(), start_new_session=True)

    def wait(self, name: str, timeout: float = 3600) -> Path:
        import time

        repo, deadline = self.repos[name], time.monotonic() + timeout
        while not (repo / "repro.rc").exists():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name}: dvc repro did not finish in {timeout} s:\n{(repo / 'repro.log').read_text()[-6000:]}"
                )
            if self.proc.poll() is not None and not (repo / "repro.rc").exists():
                raise AssertionError(
                    f"{name}: the build shell exited {self.proc.returncode} first:\n{(repo / 'repro.log').read_text()[-6000:]}"
                )
            time.sleep(1)
        if (code := (repo / "repro.rc").read_text().strip()) != "0":
            raise AssertionError(f"{name}: dvc repro exited {code}:\n{(repo / 'repro.log').read_text()[-6000:]}")
        return repo

    def stop(self) -> None:
        if self.proc.poll() is None:  # the session ended first: stop dvc and the stage it is running
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="session", autouse=True)
def _pipeline_builds(request, tmp_path_factory):
    """Start building the pipelines the selected tests read as soon as the session starts."""
    names = [name for name in PIPELINES if any(name in _needs(item) for item in request.session.items)]
    reuse = {name: os.environ.get(f"REFUSAL_ATLAS_TEST_{name.upper()}") for name in names}
    names = [name for name in names if not reuse[name]]
    if not names:
        yield None
        return
    builds = _Builds(names, tmp_path_factory.mktemp("pipelines"))
    # A SIGTERM (a CI timeout) ends pytest without running finalizers; the builds must not outlive it.
    previous = signal.signal(signal.SIGTERM, lambda *_: (builds.stop(), sys.exit(143)))
    try:
        yield builds
    finally:
        signal.signal(signal.SIGTERM, previous)
        builds.stop()


def _finished(name: str, builds: _Builds | None, tmp_path_factory) -> Path:
    reuse = os.environ.get(f"REFUSAL_ATLAS_TEST_{name.upper()}")
    if reuse:  # iterate on the end-to-end tests against a finished pipeline (never set in CI)
        repo = tmp_path_factory.mktemp(name) / "repo"
        shutil.copytree(reuse, repo, symlinks=True, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
        return repo
    return builds.wait(name)


@pytest.fixture(scope="session")
def pipeline(_pipeline_builds, tmp_path_factory) -> Path:
    """A fresh copy of the repository after a full `dvc repro` of the smoke profile (profiles/smoke.yaml).

    Session-scoped: built once, read by most end-to-end tests. Tests that change the
    repository copy it again first (``clone_pipeline``). With
    REFUSAL_ATLAS_TEST_PIPELINE=<repo with a finished smoke pipeline> a copy of that is used instead.
    """
    return _finished("pipeline", _pipeline_builds, tmp_path_factory)


@pytest.fixture(scope="session")
def demo_pipeline(_pipeline_builds, tmp_path_factory) -> Path:
    """The default demo pipeline (params.yaml, as `make repro`), for the tests of the demo's behaviour.
    REFUSAL_ATLAS_TEST_DEMO_PIPELINE=<repo> reuses a finished one."""
    return _finished("demo_pipeline", _pipeline_builds, tmp_path_factory)


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
        self.proc = subprocess.Popen(
            server_command(repo, "127.0.0.1", self.port),
            cwd=repo,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
            start_new_session=True,
        )
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
        pytest.skip(
            "Debian's chromium is not installed (apt-get install -y chromium); set REQUIRE_BROWSER=1 to make this a failure"
        )
    from playwright.sync_api import sync_playwright

    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=path, args=args, headless=True, viewport={"width": width, "height": height}
        )
        try:
            yield context.new_page()
        finally:
            context.close()
