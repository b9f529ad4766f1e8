"""Helpers the tests share: the repository's paths, real commands, repository copies, MLflow, PostgreSQL and
S3 server processes and a headless browser page. Fixtures live in conftest.py; tiny models in tiny_models.py."""

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

REPO = Path(__file__).resolve().parents[1]


SHARED = REPO.parent / "shared"


VENV_BIN = Path(sys.executable).parent


def shared_datasets() -> Path:
    """../shared/datasets, or a skip where it is absent."""
    path = SHARED / "datasets"
    if not path.is_dir():
        pytest.skip(
            f"{path} not present: the shared public datasets sit beside the checkout only on the team's machines"
        )
    return path


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
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}"
            f"\nstderr:\n{proc.stderr[-4000:]}"
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
    """Cut a repository copy down to ``sets`` (categories plus their baseline pools) with ``per_set[name]`` prompts
    each."""
    manifest = yaml.safe_load((repo / "prompts/manifest.yaml").read_text())
    manifest["categories"] = {k: v for k, v in manifest["categories"].items() if k in sets}
    manifest["baselines"] = {k: v for k, v in manifest["baselines"].items() if k in sets}
    (repo / "prompts/manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    for path in (repo / "prompts").glob("*.jsonl"):
        if path.stem in sets:
            path.write_text("".join(path.read_text().splitlines(keepends=True)[: per_set[path.stem]]))
        else:
            path.unlink()


def apply_profile(repo: Path, profile: str) -> None:
    """Write a params profile's keys into ``repo``'s params.yaml (validated, as `refusal-atlas experiment` does) and
    commit."""
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 90) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{what} did not become healthy in {timeout:.0f} s: {log.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class MlflowServer:
    """A real `mlflow server` process (the `refusal-atlas ui` command line) on a free loopback port, on the
    project's sqlite store or on ``backend`` (e.g. a PostgreSQL URI)."""

    def __init__(self, repo: Path, log: Path, backend: str | None = None):
        from refusal_atlas.cli import server_command

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            server_command(repo, "127.0.0.1", self.port, backend),
            cwd=repo,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
            start_new_session=True,
        )
        try:
            _wait_healthy(self.url + "/health", self.proc, log, "mlflow server")
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_group(self.proc)
        self.log.close()


class Postgres:
    """A real PostgreSQL server (Debian's postgresql package) in a scratch cluster, on loopback only.

    PostgreSQL refuses to run as root, so under root the cluster belongs to the ``postgres``
    user the package creates and every command runs as that user.
    """

    def __init__(self, log: Path):
        import tempfile

        bindir = next(Path("/usr/lib/postgresql").glob("*/bin"), None) if shutil.which("initdb") is None else None
        self.bin = (lambda name: str(bindir / name)) if bindir else (lambda name: name)
        if not shutil.which(self.bin("initdb")):
            missing = "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)"
            if os.environ.get("REQUIRE_POSTGRES") == "1":
                pytest.fail(f"REQUIRE_POSTGRES=1 but {missing}")
            pytest.skip(missing)
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.root = Path(tempfile.mkdtemp(prefix="refusal-atlas-pg-"))  # outside pytest's root-only tmp
        self.port, self.log = free_port(), log
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._pg("initdb", "-D", str(self.root / "data"), "-U", "postgres", "--auth=trust", "--no-sync")
        self.start()
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "mlflow")
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def _pg(self, *cmd: str) -> None:
        proc = subprocess.run([*self.as_user, self.bin(cmd[0]), *cmd[1:]], capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-3000:]}")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-o", options, "-l", str(self.root / "pg.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(AssertionError):
            self.stop("immediate")
        with contextlib.suppress(OSError):
            self.log.write_text((self.root / "pg.log").read_text())
        shutil.rmtree(self.root, ignore_errors=True)


class S3Server:
    """moto's S3 server (an emulator of the S3 API, from PyPI: no real S3 implementation installs from PyPI or
    Debian here) on a free loopback port, with one bucket; ``env`` holds the credentials DVC reads."""

    BUCKET = "refusal-atlas"

    def __init__(self, log: Path):
        import boto3

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_healthy(self.url + "/moto-api/", self.proc, log, "moto S3 server")
        self.client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing"})  # fmt: skip
        self.client.create_bucket(Bucket=self.BUCKET)

    def keys(self) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        _stop_group(self.proc)
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
            "Debian's chromium is not installed (apt-get install -y chromium); set REQUIRE_BROWSER=1 to make this a "
            "failure"
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
