"""Prompt sets: the manifest, record validation, deterministic splits, the prompt table.

A prompt file is JSON Lines with one record per line: ``id`` (stable), ``text``,
``category``, ``source`` and an optional ``note``. The manifest names each target
category's file and the baseline pool it is compared against. Instead of a file, a set
may list ``sources``: public dataset files read by the importers
(:mod:`refusal_atlas.data.importers`), the first one present being used, so a recipe can
name a gated dataset and fall back to a public one (``prompts/study/manifest.yaml``).
Every problem found is reported with its file and line, and nothing is returned until
all files pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from refusal_atlas.config import SplitFractions, read_yaml
from refusal_atlas.data.importers import ImportFormatError, import_file
from refusal_atlas.digest import file_sha256, sha256_hex
from refusal_atlas.errors import RefusalAtlasError

REQUIRED_FIELDS = ("id", "text", "category", "source")
OPTIONAL_FIELDS = ("note",)
TABLE_COLUMNS = ["prompt_id", "category", "role", "split", "text", "source", "sha256"]
# Folders under a manifest's that hold no prompt sets of it: style exemplars, the study recipe
# (its own manifest) and raw dataset files (read by importers, some of them JSONL).
IGNORED_DIRS = ("styles", "study", "raw")
PROMPTS_FORMAT = "prompts"  # a source in the project's own JSONL format (parse_prompt_file)
VALIDATION_FORMAT = "xstest_completions"  # human-labelled completions (judging.validation.load_completions)


class PromptValidationError(RefusalAtlasError, ValueError):
    """Prompt files or manifest that do not validate; one line per problem, each with file:line."""


class Source(BaseModel):
    """One file a set can be read from: a public dataset's file (an importer format) or a JSONL prompt file."""

    model_config = ConfigDict(extra="forbid")
    format: str = Field(description=f"An importer format (importers.FORMATS) or '{PROMPTS_FORMAT}' (JSONL records).")
    file: str = Field(description="The file, relative to the manifest's folder.")
    kind: str | None = Field(None, description="The format's variant where it has them (importers.FORMATS).")
    category: str | None = Field(None, description="Which of the file's categories; default: the set's name.")
    limit: int | None = Field(None, ge=1, description="Keep the first N prompts imported, in file order.")
    sha256: str | None = Field(None, description="The file's pinned sha256; another file is an error.")
    url: str | None = Field(None, description="Pinned download URL (`refusal-atlas study fetch` imports it).")
    published: str | None = Field(None, description="Where the dataset is published: said when it is absent.")


class LanguageSources(BaseModel):
    """One language's harmful and harmless prompt files (cross-lingual transfer)."""

    model_config = ConfigDict(extra="forbid")
    language: str = Field(description="Language code, e.g. en, de, zh; 'en' is the reference the others compare to.")
    harmful: Source = Field(description="Prompts the model should refuse, in this language.")
    harmless: Source = Field(description="Prompts it should answer, in this language.")


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str | None = Field(None, description="JSONL file, relative to the manifest's folder.")
    sources: list[Source] | None = Field(
        None, min_length=1, description="Instead of file: the files to read the set from, the first present used."
    )
    baseline: str | None = Field(None, description="Baseline pool this category is compared against (targets only).")
    description: str | None = Field(None, description="One-line meaning of the set.")

    @model_validator(mode="after")
    def _one_origin(self) -> _Entry:
        if (self.file is None) == (self.sources is None):
            raise ValueError("give either file (a JSONL prompt file) or sources (dataset files), not both or neither")
        return self

    def candidates(self) -> list[Source]:
        return self.sources or [Source(format=PROMPTS_FORMAT, file=self.file)]


class Manifest(BaseModel):
    """Categories (targets) and baseline pools, each with its file."""

    model_config = ConfigDict(extra="forbid")
    categories: dict[str, _Entry] = Field(description="Target categories: should-refuse prompt sets.")
    baselines: dict[str, _Entry] = Field(description="Baseline pools of prompts that should be answered.")
    default_baseline: str = Field("benign", description="Pool used by a category that names none.")
    crosslingual: list[LanguageSources] = Field(
        [],
        description="Harmful and harmless prompts per language (PolyRefuse), for the directions stage's cross-lingual "
        "transfer analysis; a language whose files are absent is noted and left out.",
    )
    judge_validation: list[Source] = Field(
        [],
        description="Human-labelled completion files (format xstest_completions) the baseline stage scores the "
        "judges on; one that is absent is noted and left out.",
    )

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


def _absent(src: Source) -> str:
    where = f"; published at {src.published}" if src.published else ""
    return f"{src.file} ({src.format}) is not there{where}"


def pick_source(manifest_path: Path, name: str, role: str, entry: _Entry) -> tuple[Source | None, str]:
    """The first of the set's sources whose file is present, and a note when it is not the first; else the
    problem."""
    missing = []
    for src in entry.candidates():
        if (manifest_path.parent / src.file).is_file():
            note = f"{role} '{name}': {'; '.join(missing)}; read from {src.file} instead" if missing else ""
            return src, note
        missing.append(_absent(src))
    if entry.file is not None:
        return None, (
            f"{manifest_path}: {role} '{name}' names file '{entry.file}', which does not exist; add the file or "
            "remove the entry"
        )
    return None, (
        f"{manifest_path}: {role} '{name}': none of its sources is present ({'; '.join(missing)}); fetch them "
        "(`refusal-atlas study fetch`), add a source that is, or remove the set"
    )


def _pin_problem(path: Path, src: Source) -> str | None:
    """The problem when ``path`` differs from the sha256 the manifest pins for it; None when it matches or is
    unpinned."""
    if src.sha256 and (found := file_sha256(path)) != src.sha256:
        return (
            f"{path}: sha256 {found}, but the manifest pins {src.sha256}; fetch the pinned file (its url) or remove "
            "the sha256 pin to study this one"
        )
    return None


def _read_source(path: Path, src: Source, name: str) -> tuple[list[PromptRecord], list[str]]:
    """The records of one source (as set ``name``), at most ``src.limit``; or the problems found."""
    if problem := _pin_problem(path, src):
        return [], [problem]
    wanted = src.category or name
    if src.format == PROMPTS_FORMAT:
        records, problems = parse_prompt_file(path, wanted)
    else:
        try:
            imported = import_file(src.format, path, wanted, kind=src.kind)[wanted]
        except ImportFormatError as err:
            return [], [str(err)]
        records = [PromptRecord(r["id"], r["text"], wanted, r["source"], r.get("note")) for r in imported]
        problems = []
    records = [PromptRecord(r.id, r.text, name, r.source, r.note) for r in records[: src.limit]]
    return records, problems


@dataclass
class PromptSets:
    """The prompt table and where each set came from (the prompts stage's manifest.json)."""

    table: pd.DataFrame
    provenance: dict


def build_prompt_table(
    manifest_path: Path, fractions: SplitFractions, min_per_category: int, max_per_set: int | None = None
) -> pd.DataFrame:
    """The prompt table of :func:`collect_prompt_sets`."""
    return collect_prompt_sets(manifest_path, fractions, min_per_category, max_per_set).table


def collect_prompt_sets(
    manifest_path: Path, fractions: SplitFractions, min_per_category: int, max_per_set: int | None = None
) -> PromptSets:
    """Validate the manifest and every prompt file; return one row per prompt (``TABLE_COLUMNS``) and each
    set's provenance: role, baseline, description, the source used (format, file, sha256), the count, and a
    note where a set fell back from its first source.

    ``max_per_set`` keeps the first that many prompts of each file (in file order) once the
    whole file is validated: a quick run on a sample of every set. None keeps them all.

    Raises ``PromptValidationError`` listing every problem with its file and line.
    """
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    problems: list[str] = []
    chosen: dict[str, Source] = {}
    provenance = {
        "manifest": str(manifest_path),
        "sha256": file_sha256(manifest_path),
        "default_baseline": manifest.default_baseline,
        "order": list(manifest.sets()),  # the manifest's order (targets, then pools): JSON keys are written sorted
        "sets": {},
        "notes": [],
    }
    for name, (role, entry) in manifest.sets().items():
        src, message = pick_source(manifest_path, name, role, entry)
        if src is None:
            problems.append(message)
            continue
        chosen[name] = src
        if message:
            provenance["notes"].append(message)
    named = {(root / src.file).resolve() for _, entry in manifest.sets().values() for src in entry.candidates()}
    for path in _listed_files(root):
        if path.resolve() not in named:
            problems.append(
                f"{path}: prompt file not listed in {manifest_path}; add it under categories or baselines, or delete it"
            )

    rows, seen = [], {}
    for name, src in chosen.items():
        role, entry = manifest.sets()[name]
        path = (root / src.file).resolve()
        records, file_problems = _read_source(path, src, name)
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
        if not file_problems:
            provenance["sets"][name] = {
                "role": role,
                **({"baseline": manifest.baseline_of(name)} if role == "target" else {}),
                "description": entry.description,
                "format": src.format,
                "file": src.file,
                "sha256": file_sha256(path),
                "n": min(len(records), max_per_set or len(records)),
            }
    if problems:
        shown = problems[:30] + ([f"... and {len(problems) - 30} more"] if len(problems) > 30 else [])
        raise PromptValidationError(f"{len(problems)} problem(s) in the prompt sets:\n" + "\n".join(shown))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS).sort_values(["role", "category", "prompt_id"], ignore_index=True)
    return PromptSets(table, provenance)


def validation_files(manifest_path: Path) -> tuple[list[tuple[Source, Path]], list[str]]:
    """The manifest's judge-validation files that are present (sha256 pins checked), and a note for each absent
    one. Raises ``PromptValidationError`` for a wrong format or a file that differs from its pin."""
    manifest, root = load_manifest(manifest_path), Path(manifest_path).parent
    present, notes, problems = [], [], []
    for src in manifest.judge_validation:
        path = root / src.file
        if src.format != VALIDATION_FORMAT:
            problems.append(f"{manifest_path}: judge_validation file {src.file} has format {src.format!r}; only "
                            f"{VALIDATION_FORMAT!r} (XSTest's completion CSV) is read")  # fmt: skip
        elif not path.is_file():
            notes.append(f"judge validation: {_absent(src)}; the judges are not scored on it")
        elif problem := _pin_problem(path, src):
            problems.append(problem)
        else:
            present.append((src, path))
    if problems:
        raise PromptValidationError("\n".join(problems))
    return present, notes


CROSSLINGUAL_COLUMNS = ["language", "role", "prompt_id", "text", "source"]


def crosslingual_table(manifest_path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Every language's harmful and harmless prompts (``CROSSLINGUAL_COLUMNS``, at most each source's ``limit``), and
    a note for each language left out because a file is absent. Raises ``PromptValidationError`` for a file that
    does not read."""
    manifest, root = load_manifest(manifest_path), Path(manifest_path).parent
    rows, notes, problems = [], [], []
    for entry in manifest.crosslingual:
        pair = {"harmful": entry.harmful, "harmless": entry.harmless}
        if absent := [_absent(src) for src in pair.values() if not (root / src.file).is_file()]:
            notes.append(f"cross-lingual '{entry.language}': {'; '.join(absent)}; the language is left out")
            continue
        for role, src in pair.items():
            records, errors = _read_source(root / src.file, src, "safety_core" if role == "harmful" else "benign")
            problems += errors
            rows += [
                {"language": entry.language, "role": role, "prompt_id": r.id, "text": r.text, "source": r.source}
                for r in records
            ]
    if problems:
        raise PromptValidationError("\n".join(problems))
    return pd.DataFrame(rows, columns=CROSSLINGUAL_COLUMNS), notes


def read_provenance(path: Path) -> tuple[dict[str, str], list[str]]:
    """From the prompts stage's manifest.json: each target's baseline pool and every set's name, in the manifest's
    order (which fixes the order of the seeded draws and of every table)."""
    found = json.loads(Path(path).read_text())
    sets, order = found["sets"], found["order"]
    return {n: sets[n]["baseline"] for n in order if sets[n]["role"] == "target"}, order


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
