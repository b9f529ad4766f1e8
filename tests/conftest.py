"""Shared fixtures: the repository root, real copies of the repository to run DVC in."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from builds import BUILDS
from helpers import REPO, _env, copy_repo, run

# Two torch processes on 2 cores (a test beside the background pipelines) spin-wait on each
# other's cores with OpenMP's default policy: demo training measured 1.3-2.4 s a step beside the
# unit tests against 0.13 s alone. Passive waiting lets them share. Set before torch loads, and
# inherited by every stage process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    return copy_repo(tmp_path / "repo")


def _needs(item) -> list[str]:
    return [name for name in BUILDS if name in getattr(item, "fixturenames", ())]


def pytest_collection_modifyitems(items):
    """Tests that read a build run after every test that reads none, in BUILDS' order (the order they are built
    in), so the others run while they are built."""
    items.sort(key=lambda item: max((list(BUILDS).index(n) + 1 for n in _needs(item)), default=0))


class _Builds:
    """The builds a session needs (tests/builds.py), made by one background shell, one after the other.

    Each build that trains first runs its `dvc repro model` (demo training) before any test, with the machine to
    itself (blocking), so the default's recorded training time is an honest 2-core figure; then every build's
    command runs in the background while the tests that need none run.
    """

    def __init__(self, names: list[str], root: Path):
        self.repos, self.skipped, commands = {}, {}, {}
        for name in names:
            repo = copy_repo(root / name / "repo")
            try:
                commands[name] = BUILDS[name].prepare(repo)
            except pytest.skip.Exception as skip:  # e.g. ../shared/datasets absent: its tests skip, saying why
                self.skipped[name] = skip.msg
                continue
            self.repos[name] = repo
        for name in self.repos:  # training, the heaviest stage, each alone (the default one's time is a metric)
            if BUILDS[name].train_first:
                # Alone, OpenMP's active waiting is the faster (passive: 0.20 against 0.13 s a demo step).
                first = run(
                    ["dvc", "repro", "model"], self.repos[name], env={"OMP_WAIT_POLICY": "ACTIVE"}, timeout=3600
                )
                (self.repos[name] / "repro.log").write_text(first.stdout + first.stderr)
        script = [
            f"cd {repo} && ({commands[name]}) >> repro.log 2>&1; echo $? > {repo}/repro.rc"
            for name, repo in self.repos.items()
        ]
        self.proc = subprocess.Popen(["bash", "-c", "; ".join(script)], env=_env(), start_new_session=True)

    def wait(self, name: str, timeout: float = 3600) -> Path:
        import time

        if name in self.skipped:
            pytest.skip(self.skipped[name])
        repo, deadline = self.repos[name], time.monotonic() + timeout
        while not (repo / "repro.rc").exists():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{name}: its build did not finish in {timeout} s:\n{(repo / 'repro.log').read_text()[-6000:]}"
                )
            if self.proc.poll() is not None and not (repo / "repro.rc").exists():
                raise AssertionError(
                    f"{name}: the build shell exited {self.proc.returncode} first:\n"
                    f"{(repo / 'repro.log').read_text()[-6000:]}"
                )
            time.sleep(1)
        if (code := (repo / "repro.rc").read_text().strip()) != "0":
            raise AssertionError(f"{name}: its build exited {code}:\n{(repo / 'repro.log').read_text()[-6000:]}")
        return repo

    def stop(self) -> None:
        if self.proc.poll() is None:  # the session ended first: stop dvc and the stage it is running
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="session", autouse=True)
def _pipeline_builds(request, tmp_path_factory):
    """Start making the builds the selected tests read as soon as the session starts."""
    names = [name for name in BUILDS if any(name in _needs(item) for item in request.session.items)]
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
    if reuse:  # iterate on the end-to-end tests against a finished build (never set in CI)
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


@pytest.fixture(scope="session")
def smollm2_pipeline(_pipeline_builds, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's reduced pipeline (tests/builds.py), after `dvc repro`."""
    return _finished("smollm2_pipeline", _pipeline_builds, tmp_path_factory)


@pytest.fixture(scope="session")
def study_pipeline(_pipeline_builds, tmp_path_factory) -> Path:
    """A repository after `refusal-atlas study run` on ../shared/datasets (tests/builds.py); skips without them."""
    return _finished("study_pipeline", _pipeline_builds, tmp_path_factory)
