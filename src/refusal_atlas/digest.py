"""sha256 digests: of bytes or text, of a whole file, and of JSON-serialisable values (fingerprints)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_hex(data: bytes | str) -> str:
    """sha256 of ``data`` (text is encoded as UTF-8), as 64 hex digits."""
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file, read in pieces."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def json_sha256(value: object) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys; anything JSON lacks as ``str``): a fingerprint of inputs."""
    return sha256_hex(json.dumps(value, sort_keys=True, default=str))
