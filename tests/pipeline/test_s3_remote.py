"""A DVC remote on S3: push the smoke pipeline's outputs, pull them into a fresh clone, and an S3 server that stops
mid-push.

The S3 server is moto's (`moto_server`, from PyPI), an **emulator** of the S3 API: no real S3
implementation installs from PyPI or Debian here (MinIO and Garage are not packaged; Debian's
radosgw needs a Ceph cluster). DVC reaches it through dvc-s3 (`pip install 'refusal-atlas[s3]'`)
exactly as it reaches AWS or MinIO: `endpointurl` in the remote's config, credentials from the
environment. moto keeps objects in memory, so a restarted server starts with an empty bucket.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from helpers import S3Server, _env, clone_pipeline, run

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]


def _use_remote(repo: Path, server: S3Server) -> None:
    run(["dvc", "remote", "add", "-f", "-d", "shared", f"s3://{S3Server.BUCKET}/cache"], repo)
    run(["dvc", "remote", "modify", "shared", "endpointurl", server.url], repo)
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "the pipeline, with an S3 remote"], repo)


def _cache_objects(repo: Path) -> int:
    return sum(
        1 for p in (repo / ".dvc/cache/files/md5").rglob("*") if p.is_file() and not p.name.endswith(".unpacked")
    )


def _artifacts(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((repo / "artifacts").rglob("*"))
        if p.is_file()
    }


def _pull_into_a_fresh_clone(repo: Path, dest: Path, server: S3Server) -> Path:
    run(["git", "clone", "-q", str(repo), str(dest)], dest.parent)
    assert not (dest / "artifacts").exists() and not (dest / ".dvc/cache").exists()
    run(["dvc", "pull"], dest, env=server.env)
    return dest


def test_push_to_s3_then_pull_into_a_fresh_clone_gives_the_same_outputs(pipeline, tmp_path):
    server = S3Server(tmp_path / "s3.log")
    try:
        repo = clone_pipeline(pipeline, tmp_path / "repo")
        _use_remote(repo, server)
        run(["dvc", "push"], repo, env=server.env)
        assert len(server.keys()) == _cache_objects(repo) > 50
        assert all(k.startswith("cache/files/md5/") for k in server.keys())
        fresh = _pull_into_a_fresh_clone(repo, tmp_path / "fresh", server)
        assert _artifacts(fresh) == _artifacts(repo)
        assert "up to date" in run(["dvc", "status"], fresh).stdout
    finally:
        server.stop()


def test_s3_server_stopping_mid_push_fails_clearly_loses_nothing_and_a_rerun_completes(pipeline, tmp_path):
    server = S3Server(tmp_path / "s3.log")
    repo = clone_pipeline(pipeline, tmp_path / "repo")
    _use_remote(repo, server)
    before, objects = _artifacts(repo), _cache_objects(repo)
    # One attempt per request (botocore retries a refused connection with backoff otherwise, a minute here).
    push = subprocess.Popen(
        ["dvc", "push", "--jobs", "1"], cwd=repo, env=_env({**server.env, "AWS_MAX_ATTEMPTS": "1"}), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while push.poll() is None and time.monotonic() < deadline and len(server.keys()) < 5:
            time.sleep(0.05)
        assert push.poll() is None, "the push finished before the server could be stopped"
    finally:
        server.stop()
    _, stderr = push.communicate(timeout=600)
    assert push.returncode != 0
    # DVC says "failed to transfer ..." or "unexpected error ..." depending on the request the stop hits; both name
    # the endpoint it could not reach.
    assert f'Could not connect to the endpoint URL: "{server.url}/' in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    # Nothing finished is lost: the workspace, dvc.lock and the local cache are as they were.
    assert _artifacts(repo) == before and _cache_objects(repo) == objects
    assert "up to date" in run(["dvc", "status"], repo).stdout

    again = S3Server(tmp_path / "s3-again.log")  # a server back at the same remote URL's place
    try:
        run(["dvc", "remote", "modify", "shared", "endpointurl", again.url], repo)
        run(["dvc", "push"], repo, env=again.env)
        assert len(again.keys()) == objects
        run([*GIT, "commit", "-qam", "the remote's new address"], repo)
        fresh = _pull_into_a_fresh_clone(repo, tmp_path / "fresh", again)
        assert _artifacts(fresh) == before
    finally:
        again.stop()
