"""The tree is formatted and lint-clean (ruff, configured in pyproject.toml; `make format` fixes most)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(repo_root, command):
    proc = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"`ruff {' '.join(command)} .` failed; run `make format` and review:\n{proc.stdout}{proc.stderr}"
    )
