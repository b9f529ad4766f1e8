"""Fetch a recipe manifest's dataset files as DVC external data (``dvc import-url``).

A recipe (``prompts/study/manifest.yaml``) lists, per set, the dataset files it can be read
from, each with a pinned URL and sha256 where the file is public. :func:`fetch_sources`
imports every such file to its path under the manifest's folder, from its URL or from a local
copy of the datasets (``DIR/<path after raw/>``, the layout of ``../shared/datasets``), stages
the ``.dvc`` files with git (an experiment sees only files git knows), and says, for each
file it could not fetch, where the dataset is published and what the sets fall back to.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from refusal_atlas.data.prompts import PROMPTS_FORMAT, Source, load_manifest, pick_source
from refusal_atlas.digest import file_sha256
from refusal_atlas.errors import RefusalAtlasError


class FetchError(RefusalAtlasError):
    """A dataset file that could not be imported, or a recipe set left with no source."""


@dataclass
class Fetched:
    file: str  # as the manifest names it
    source: Source
    sets: list[str] = field(default_factory=list)
    origin: str | None = None  # URL or local path it was imported from; None when not fetched
    status: str = ""


def _origin(src: Source, local: Path | None) -> str | None:
    if local is None:
        return src.url
    relative = Path(src.file)
    relative = Path(*relative.parts[1:]) if relative.parts[0] == "raw" else relative
    path = local / relative
    return str(path.resolve()) if path.is_file() else None


def plan(manifest_path: Path, local: Path | None = None) -> list[Fetched]:
    """Every dataset file of the recipe (its sets' sources other than JSONL prompt files, its judge-validation and
    cross-lingual files), with its origin."""
    manifest = load_manifest(manifest_path)
    files: dict[str, Fetched] = {}
    named = [(name, src) for name, (_, entry) in manifest.sets().items() for src in entry.candidates()]
    languages = [(f"cross-lingual {e.language}", src) for e in manifest.crosslingual for src in (e.harmful, e.harmless)]
    for name, src in [*named, *(("judge validation", src) for src in manifest.judge_validation), *languages]:
        if src.format == PROMPTS_FORMAT:
            continue
        item = files.setdefault(src.file, Fetched(src.file, src, origin=_origin(src, local)))
        item.sets.append(name)
    return list(files.values())


def fetch_sources(manifest_path: Path, local: Path | None, dvc: str) -> list[Fetched]:
    """Import each of the recipe's dataset files with ``dvc import-url`` (``dvc``: the executable), from its URL
    or from ``local``, and check its pinned sha256.

    Files already present with the pinned sha256 are kept. Raises :class:`FetchError` when an
    import fails or a fetched file differs from its pin.
    """
    manifest_path = Path(manifest_path)
    root = manifest_path.parent
    items = plan(manifest_path, local)
    for item in items:
        target = root / item.file
        pin = item.source.sha256
        if target.is_file() and (pin is None or file_sha256(target) == pin):
            item.status = "present"
            continue
        if item.origin is None:
            where = f"not in {local}" if local is not None else "no public URL"
            item.status = f"not fetched ({where}); published at {item.source.published or 'an unknown place'}"
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([dvc, "import-url", "--force", item.origin, str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(
                f"{item.file}: `dvc import-url {item.origin}` failed:\n{proc.stderr.strip()[-2000:]}\nfix the URL or "
                "the network access, or pass --from DIR with a local copy of the datasets"
            )
        if pin is not None and (found := file_sha256(target)) != pin:
            subprocess.run([dvc, "remove", "--outs", f"{target}.dvc"], capture_output=True)  # leave nothing of it
            raise FetchError(
                f"{item.file}: fetched from {item.origin} with sha256 {found}, but the recipe pins {pin}; the source "
                "changed: fetch the pinned revision, or edit the pin in the manifest to study this file"
            )
        item.status = f"imported from {item.origin}"
        # Staged at once (a later failure keeps it): `dvc exp run --temp` copies only what git tracks or stages.
        subprocess.run(["git", "add", "--", f"{target}.dvc", str(target.parent / ".gitignore")], capture_output=True)
    return items


def fallbacks(manifest_path: Path) -> list[str]:
    """A note for each set read from a fallback source; raises :class:`FetchError` for a set with none present."""
    manifest = load_manifest(manifest_path)
    notes, problems = [], []
    for name, (role, entry) in manifest.sets().items():
        src, message = pick_source(manifest_path, name, role, entry)
        (problems if src is None else notes).append(message)
    if problems:
        raise FetchError("\n".join(problems))
    return [note for note in notes if note]
