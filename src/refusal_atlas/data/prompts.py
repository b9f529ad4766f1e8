"""Prompt sets: the manifest, record validation, deterministic splits, the prompt table.

A prompt file is JSON Lines with one record per line: ``id`` (stable), ``text``,
``category``, ``source`` and an optional ``note``. The manifest names each target
category's file and the baseline pool it is compared against. Every problem found
is reported with its file and line, and nothing is returned until all files pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from refusal_atlas.config import SplitFractions, read_yaml
from refusal_atlas.digest import sha256_hex
from refusal_atlas.errors import RefusalAtlasError

REQUIRED_FIELDS = ("id", "text", "category", "source")
OPTIONAL_FIELDS = ("note",)
TABLE_COLUMNS = ["prompt_id", "category", "role", "split", "text", "source", "sha256"]
IGNORED_DIRS = ("styles",)  # style exemplars live beside the prompt sets but are not prompt sets


class PromptValidationError(RefusalAtlasError, ValueError):
    """Prompt files or manifest that do not validate; one line per problem, each with file:line."""


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="JSONL file, relative to the manifest's folder.")
    baseline: str | None = Field(None, description="Baseline pool this category is compared against (targets only).")
    description: str | None = Field(None, description="One-line meaning of the set.")


class Manifest(BaseModel):
    """Categories (targets) and baseline pools, each with its file."""

    model_config = ConfigDict(extra="forbid")
    categories: dict[str, _Entry] = Field(description="Target categories: should-refuse prompt sets.")
    baselines: dict[str, _Entry] = Field(description="Baseline pools of prompts that should be answered.")
    default_baseline: str = Field("benign", description="Pool used by a category that names none.")

    def baseline_of(self, category: str) -> str:
        return self.categories[category].baseline or self.default_baseline

    def sets(self) -> dict[str, tuple[str, _Entry]]:
        """name → (role, entry) for every target category and baseline pool."""
        out = {name: ("target", e) for name, e in self.categories.items()}
        out.update({name: ("baseline", e) for name, e in self.baselines.items()})
        return out


@dataclass(frozen=True)
class PromptRecord:
    id: str
    text: str
    category: str
    source: str
    note: str | None = None


def load_manifest(path: Path) -> Manifest:
    """Read and validate ``prompts/manifest.yaml``."""
    missing = "manifest not found; create it or set prompts.manifest in params.yaml"
    data = read_yaml(path, missing, PromptValidationError)
    try:
        manifest = Manifest.model_validate(data or {})
    except ValidationError as err:
        problems = "; ".join(f"'{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in err.errors())
        raise PromptValidationError(f"{path}: invalid manifest: {problems}") from None
    overlap = set(manifest.categories) & set(manifest.baselines)
    problems = [f"{path}: '{n}' is both a category and a baseline pool; rename one" for n in sorted(overlap)]
    for name in manifest.categories:
        pool = manifest.baseline_of(name)
        if pool not in manifest.baselines:
            problems.append(
                f"{path}: category '{name}' uses baseline pool '{pool}', which is not listed under baselines"
            )
    if problems:
        raise PromptValidationError("\n".join(problems))
    return manifest


def parse_prompt_file(path: Path, expected_category: str) -> tuple[list[PromptRecord], list[str]]:
    """Parse one JSONL prompt file; return its records and the problems found (``file:line: …``)."""
    records, problems = [], []
    raw = path.read_bytes()
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{where}: bytes that are not UTF-8 at column {err.start + 1}; re-save the file as UTF-8")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(
                f"{where}: malformed JSON ({err.msg} at column {err.colno}); each line must be one JSON object"
            )
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        missing = [f for f in REQUIRED_FIELDS if f not in obj]
        if missing:
            problems.append(
                f"{where}: missing field(s) {', '.join(missing)}; every record needs {', '.join(REQUIRED_FIELDS)}"
            )
            continue
        unknown = sorted(set(obj) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            problems.append(
                f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
                f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}"
            )
            continue
        bad_types = [f for f in REQUIRED_FIELDS if not isinstance(obj[f], str)]
        if bad_types or not isinstance(obj.get("note", ""), (str, type(None))):
            problems.append(f"{where}: field(s) {', '.join(bad_types or ['note'])} must be strings")
            continue
        if not obj["id"].strip():
            problems.append(f"{where}: empty id")
            continue
        if not obj["text"].strip():
            problems.append(f"{where}: empty text for id '{obj['id']}'; remove the record or write the prompt")
            continue
        if obj["category"] != expected_category:
            problems.append(
                f"{where}: category '{obj['category']}' in the file of '{expected_category}'; move the record or fix "
                "its category"
            )
            continue
        records.append(PromptRecord(**{k: obj.get(k) for k in REQUIRED_FIELDS + OPTIONAL_FIELDS}))
    return records, problems


def assign_split(prompt_id: str, fractions: SplitFractions) -> str:
    """Split of one prompt from a hash of its id alone, so adding or removing other prompts never moves it."""
    u = int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < fractions.train:
        return "train"
    if u < fractions.train + fractions.val:
        return "val"
    return "test"


def _listed_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.jsonl") if not any(part in IGNORED_DIRS for part in p.relative_to(root).parts[:-1])
    )


def build_prompt_table(
    manifest_path: Path, fractions: SplitFractions, min_per_category: int, max_per_set: int | None = None
) -> pd.DataFrame:
    """Validate the manifest and every prompt file; return one row per prompt (``TABLE_COLUMNS``).

    ``max_per_set`` keeps the first that many prompts of each file (in file order) once the
    whole file is validated: a quick run on a sample of every set. None keeps them all.

    Raises ``PromptValidationError`` listing every problem with its file and line.
    """
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    problems: list[str] = []
    listed = {}
    for name, (role, entry) in manifest.sets().items():
        path = (root / entry.file).resolve()
        listed[path] = name
        if not path.is_file():
            problems.append(
                f"{manifest_path}: {role} '{name}' names file '{entry.file}', which does not exist; add the file or "
                "remove the entry"
            )
    for path in _listed_files(root):
        if path.resolve() not in listed:
            problems.append(
                f"{path}: prompt file not listed in {manifest_path}; add it under categories or baselines, or delete it"
            )

    rows, seen = [], {}
    for path, name in listed.items():
        if not path.is_file():
            continue
        role = manifest.sets()[name][0]
        records, file_problems = parse_prompt_file(path, name)
        problems += file_problems
        for rec in records[:max_per_set]:
            if rec.id in seen:
                problems.append(
                    f"{path}: duplicate id '{rec.id}' (first seen in {seen[rec.id]}); ids must be unique across all "
                    "files"
                )
                continue
            seen[rec.id] = path.name
            rows.append(
                {
                    "prompt_id": rec.id,
                    "category": name,
                    "role": role,
                    "split": assign_split(rec.id, fractions),
                    "text": rec.text,
                    "source": rec.source,
                    "sha256": sha256_hex(rec.text),
                }
            )
        if not file_problems and len(records) < min_per_category:
            problems.append(
                f"{path}: {role} '{name}' has {len(records)} prompts, fewer than "
                f"prompts.min_per_category={min_per_category}; add prompts or lower the minimum in params.yaml"
            )
    if problems:
        shown = problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else [])
        raise PromptValidationError(f"{len(problems)} problem(s) in the prompt sets:\n" + "\n".join(shown))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values(["role", "category", "prompt_id"], ignore_index=True)


def summarize_prompts(table: pd.DataFrame) -> dict:
    """Counts per category, role and split (the prompts stage's DVC metrics)."""

    def counts(cols: list[str]) -> dict:
        grouped = table.groupby(cols).size()
        out: dict = {}
        for key, n in grouped.items():
            key = key if isinstance(key, tuple) else (key,)
            node = out
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = int(n)
        return out

    return {
        "total": int(len(table)),
        "by_category": counts(["category"]),
        "by_role": counts(["role"]),
        "by_split": counts(["split"]),
        "by_category_split": counts(["category", "split"]),
    }
