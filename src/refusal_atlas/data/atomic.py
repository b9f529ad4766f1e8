"""Write-then-rename helpers, so a killed or failing stage never leaves a partial output."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it over ``path``.

    Works for files and directories (e.g. a Zarr store). On failure the temporary
    is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: object) -> None:
    """Atomically write pretty, key-sorted JSON (stable bytes for DVC hashes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_default) + "\n", encoding="utf-8")


def write_parquet(path: Path, frame) -> None:
    """Atomically write a pandas DataFrame as parquet."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _default(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
