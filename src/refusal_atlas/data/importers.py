"""Importers that turn public refusal datasets into the project's prompt records.

Each format in :data:`FORMATS` reads one dataset file and maps its rows onto the manifest's
target categories and baseline pools. A record's id is ``<format>-<key>``, the key being the
dataset's own id where it has one and else the first 12 hex digits of the text's sha256, so
re-importing gives the same ids; ``source`` names the format, the file and the file's sha256.
Every bad input raises :class:`ImportFormatError` naming the file, the problem (with its line)
and the fix, before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from refusal_atlas.digest import file_sha256, sha256_hex
from refusal_atlas.errors import RefusalAtlasError

log = logging.getLogger(__name__)

COCONOT_CATEGORIES = {
    "Humanizing requests": "humanizing",
    "Incomplete requests": "incomplete",
    "Indeterminate requests": "indeterminate",
    "Requests with safety concerns": "safety_concerns",
    "Unsupported requests": "unsupported",
}
# SORRY-Bench's 44 fine-grained categories fall into four groups by number (paper, Table 1).
SORRY_BENCH_GROUPS = (
    (1, 5, "hate_speech"),
    (6, 24, "crime_assistance"),
    (25, 39, "inappropriate"),
    (40, 44, "unqualified_advice"),
)
_BINARY_HINTS = {b"PAR1": "a Parquet file", b"PK\x03\x04": "a zip archive", b"\x1f\x8b": "a gzip archive"}


class ImportFormatError(RefusalAtlasError, ValueError):
    """A dataset file that cannot be imported; the message names the file, the problem and the fix."""


class ImportResult(dict[str, list[dict]]):
    """category/pool → records, plus ``skipped``: reason → number of rows left out."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: Counter[str] = Counter()


@dataclass(frozen=True)
class _Row:
    """One prompt read from a dataset; ``category=None`` means the row is left out for ``note``'s reason."""

    where: str
    text: str
    category: str | None
    key: str | None = None
    note: str | None = None


Reader = Callable[[Path, str | None], Iterator[_Row]]


@dataclass(frozen=True)
class ImportFormat:
    """A dataset format: its reader, the categories it can yield and the ``kind`` values it accepts.

    ``kinds`` is empty for a format without variants and ``None`` where any string is accepted
    (SORRY-Bench's prompt styles); where ``kind`` is not given the file name or a default decides.
    """

    name: str
    read: Reader
    categories: tuple[str, ...]
    kinds: tuple[str, ...] | None
    description: str


def _fail(path: Path, problem: str, fix: str) -> ImportFormatError:
    return ImportFormatError(f"{path}: {problem}; {fix}")


def _read_text(path: Path, fmt: str) -> str:
    """The file as UTF-8 text; binary files and other encodings are refused with a hint."""
    data = path.read_bytes()
    kind = next((name for magic, name in _BINARY_HINTS.items() if data.startswith(magic)), None)
    if kind or b"\0" in data[:8192]:
        raise _fail(
            path,
            f"is {kind or 'a binary file'}, not the text file the '{fmt}' importer reads",
            "pass the dataset's CSV/JSON file, or convert it to text "
            f"first{' (wildguardmix reads Parquet)' if kind == 'a Parquet file' else ''}",
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise _fail(
            path, f"line {line}: bytes that are not UTF-8 (offset {err.start})", "re-save the file as UTF-8"
        ) from None


def _csv_rows(path: Path, fmt: str, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, str]]]:
    """(``line N``, row) for each data row of a CSV that has the ``required`` columns."""
    text = _read_text(path, fmt)
    if text.lstrip()[:1] in ("{", "["):
        raise _fail(
            path,
            f"looks like JSON, not the CSV the '{fmt}' importer expects (it starts with {text.lstrip()[:1]!r})",
            f"pass the CSV file with columns {', '.join(required)}, or pick the format that matches this file",
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [cell.strip() for cell in next(reader, [])]
        # pandas writes its unnamed index column with an empty header cell (refusal_direction's raw
        # jailbreakbench.csv is such a file); that column is JailbreakBench's Index.
        if header and header[0] == "" and "Index" in required:
            header[0] = "Index"
        missing = [c for c in required if c not in header]
        if missing:
            raise _fail(
                path,
                f"missing column(s) {', '.join(missing)} (found columns: {', '.join(header) or 'none'})",
                f"the '{fmt}' format needs a header row with {', '.join(required)}; check that the file and the format "
                "match",
            )
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise _fail(
                    path,
                    f"line {reader.line_num}: {len(row)} fields where the header has {len(header)}",
                    "quote fields that contain commas or newlines, or fix the row",
                )
            yield f"line {reader.line_num}", dict(zip(header, row, strict=True))
    except csv.Error as err:
        raise _fail(path, f"line {reader.line_num}: not valid CSV ({err})", "fix the quoting on that line") from None


def _check_fields(path: Path, where: str, obj: object, required: tuple[str, ...], fmt: str) -> dict:
    if not isinstance(obj, dict):
        raise _fail(
            path,
            f"{where}: expected a JSON object, got {type(obj).__name__}",
            f"each '{fmt}' record must be an object with {', '.join(required)}",
        )
    missing = [f for f in required if f not in obj]
    if missing:
        raise _fail(
            path,
            f"{where}: missing field(s) {', '.join(missing)} (found: {', '.join(map(str, obj)) or 'none'})",
            f"each '{fmt}' record needs {', '.join(required)}; check that the file and the format match",
        )
    return obj


def _jsonl_objects(path: Path, fmt: str, required: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """(``line N``, object) for each non-blank line of a JSON Lines file."""
    text = _read_text(path, fmt)
    # Split on "\n" only: str.splitlines would also break on U+2028 inside a JSON string.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == 1 and line.lstrip().startswith("["):
                fix = "the file looks like one JSON document, not JSON Lines; write one JSON object per line"
            elif lineno == 1 and "{" not in line and "," in line:
                fix = (
                    f"the file looks like CSV (first line: {line[:80]!r}); use a CSV format or convert it to JSON Lines"
                )
            else:
                fix = "each line must be one complete JSON object; fix or delete that line"
            raise _fail(path, f"line {lineno}: malformed JSON ({err.msg} at column {err.colno})", fix) from None
        yield f"line {lineno}", _check_fields(path, f"line {lineno}", obj, required, fmt)


def _text_hash(text: str) -> str:
    return sha256_hex(text)[:12]


def _kind_from_name(path: Path, kind: str | None, choices: dict[str, str]) -> str | None:
    """``kind`` if given, else the value whose marker occurs in the file name (``None`` if none does)."""
    if kind is not None:
        return kind
    name = path.name.lower()
    return next((value for marker, value in choices.items() if marker in name), None)


def _read_xstest(path: Path, kind: str | None) -> Iterator[_Row]:
    for where, row in _csv_rows(path, "xstest", ("id", "prompt", "type", "label")):
        contrast = row["type"].startswith("contrast_")
        if row["label"] not in ("safe", "unsafe") or (row["label"] == "unsafe") != contrast:
            raise _fail(
                path,
                f"{where}: label {row['label']!r} does not fit type {row['type']!r}",
                "XSTest labels are 'unsafe' exactly for the contrast_* types and 'safe' otherwise",
            )
        yield _Row(where, row["prompt"], "over_refusal" if contrast else "over_refusal_safe", row["id"], row["type"])


def _read_coconot(path: Path, kind: str | None) -> Iterator[_Row]:
    contrast = _kind_from_name(path, kind, {"contrast": "contrast"}) == "contrast"
    for where, obj in _jsonl_objects(path, "coconot", ("id", "category", "prompt")):
        category = COCONOT_CATEGORIES.get(obj["category"])
        if category is None:
            raise _fail(
                path,
                f"{where}: unknown CoCoNot category {obj['category']!r}",
                f"expected one of {', '.join(map(repr, COCONOT_CATEGORIES))}",
            )
        sub = obj.get("subcategory")
        if contrast:
            yield _Row(
                where, obj["prompt"], "coconot_contrast", str(obj["id"]), f"{category}: {sub}" if sub else category
            )
        else:
            yield _Row(where, obj["prompt"], category, str(obj["id"]), sub)


def _sorry_bench_group(path: Path, where: str, value: object) -> tuple[int, str]:
    number = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    for low, high, group in SORRY_BENCH_GROUPS:
        if number is not None and low <= number <= high:
            return number, group
    raise _fail(
        path,
        f"{where}: SORRY-Bench category {value!r} is not a number from 1 to 44",
        "SORRY-Bench categories are 1-44 (int or numeric string); check the file's category field",
    )


def _read_sorry_bench(path: Path, kind: str | None) -> Iterator[_Row]:
    style_wanted = kind or "base"
    for where, obj in _jsonl_objects(path, "sorry_bench", ("question_id", "category", "turns")):
        number, group = _sorry_bench_group(path, where, obj["category"])
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise _fail(
                path,
                f"{where}: 'turns' must be a non-empty list of strings, got {turns!r:.60}",
                "put the prompt in turns[0]",
            )
        style = str(obj.get("prompt_style") or "base")
        if style_wanted not in ("all", style):
            yield _Row(where, turns[0], None, note=f"prompt_style {style}")
            continue
        # The 21 prompt styles repeat each question_id, so non-base styles carry the style in the key.
        key = str(obj["question_id"]) if style == "base" else f"{obj['question_id']}-{style}"
        yield _Row(where, turns[0], group, key, f"category {number}, prompt_style {style}")


def _wildguardmix_objects(path: Path) -> Iterator[tuple[str, dict]]:
    required = ("prompt", "prompt_harm_label", "adversarial")
    with path.open("rb") as handle:
        is_parquet = handle.read(4) == b"PAR1"
    if not is_parquet:
        yield from _jsonl_objects(path, "wildguardmix", required)
        return
    import pyarrow.parquet as pq  # Imported here so the other formats do not need pyarrow.

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file; all mean the same here.
        raise _fail(path, f"unreadable Parquet ({err})", "re-download or re-export the file") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise _fail(
            path,
            f"missing column(s) {', '.join(missing)} (found columns: {', '.join(table.column_names)})",
            f"the 'wildguardmix' format needs columns {', '.join(required)}",
        )
    for index, obj in enumerate(table.to_pylist(), start=1):
        yield f"row {index}", obj


def _read_wildguardmix(path: Path, kind: str | None) -> Iterator[_Row]:
    for where, obj in _wildguardmix_objects(path):
        adversarial = obj["adversarial"]
        if isinstance(adversarial, str) and adversarial.lower() in ("true", "false"):
            adversarial = adversarial.lower() == "true"
        if not isinstance(adversarial, bool):
            raise _fail(path, f"{where}: 'adversarial' must be true or false, got {adversarial!r}", "fix the field")
        label, text, sub = obj["prompt_harm_label"], obj["prompt"] or "", obj.get("subcategory")
        if adversarial:
            yield _Row(where, text, None, note="adversarial")
        elif label == "harmful":
            yield _Row(where, text, "safety_core", note=sub)
        elif label == "unharmful":
            yield _Row(where, text, "benign", note=sub)
        elif label is None:
            yield _Row(where, text, None, note="no prompt_harm_label")
        else:
            raise _fail(
                path,
                f"{where}: prompt_harm_label {label!r} is neither 'harmful' nor 'unharmful'",
                "fix the label or leave it null",
            )


def _read_advbench(path: Path, kind: str | None) -> Iterator[_Row]:
    for where, row in _csv_rows(path, "advbench", ("goal", "target")):
        yield _Row(where, row["goal"], "safety_core")


def _read_jailbreakbench(path: Path, kind: str | None) -> Iterator[_Row]:
    kind = _kind_from_name(path, kind, {"benign": "benign"}) or "harmful"
    for where, row in _csv_rows(path, "jailbreakbench", ("Index", "Goal", "Behavior", "Category")):
        # Index pairs harmful row i with benign row i, so the kind keeps the two files' ids apart.
        yield _Row(
            where,
            row["Goal"],
            "benign" if kind == "benign" else "safety_core",
            f"{kind}-{row['Index']}",
            row["Category"],
        )


def _read_harmbench(path: Path, kind: str | None) -> Iterator[_Row]:
    wanted = kind or "standard"
    for where, row in _csv_rows(
        path, "harmbench", ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID")
    ):
        functional = row["FunctionalCategory"]
        if wanted not in ("all", functional):
            yield _Row(where, row["Behavior"], None, note=f"FunctionalCategory {functional}")
            continue
        text = row["Behavior"]
        if row.get("ContextString", "").strip():
            # HarmBench puts the context passage before a contextual behaviour in the same way.
            text = f"{row['ContextString']}\n\n---\n\n{text}"
        yield _Row(where, text, "safety_core", row["BehaviorID"], row["SemanticCategory"])


def _read_refusal_direction(path: Path, kind: str | None, fmt: str = "refusal_direction") -> Iterator[_Row]:
    """A refusal_direction split; PolyRefuse's translations of them (``fmt`` polyrefuse) share the layout, the text
    being ``instruction_translated`` where a file has it (its test splits) and ``instruction`` otherwise."""
    kind = _kind_from_name(path, kind, {"harmless": "harmless", "harmful": "harmful"})
    if kind is None:
        raise _fail(
            path,
            "cannot tell whether this split is harmful or harmless from its name",
            "name the file harmful_*.json / harmless_*.json or pass kind='harmful' or kind='harmless'",
        )
    try:
        items = json.loads(_read_text(path, fmt))
    except json.JSONDecodeError as err:
        fix = (
            "it looks like JSON Lines; the splits are one JSON list"
            if err.msg == "Extra data"
            else "fix the JSON there"
        )
        raise _fail(path, f"line {err.lineno}: malformed JSON ({err.msg} at column {err.colno})", fix) from None
    if not isinstance(items, list):
        raise _fail(
            path,
            f"expected a JSON list of {{instruction, category}} objects, got a {type(items).__name__}",
            "pass a split file such as harmful_val.json",
        )
    for index, obj in enumerate(items, start=1):
        obj = _check_fields(path, f"item {index}", obj, ("instruction",), fmt)
        yield _Row(
            f"item {index}",
            obj.get("instruction_translated", obj["instruction"]) or "",
            "benign" if kind == "harmless" else "safety_core",
            note=obj.get("category"),
        )


def _read_polyrefuse(path: Path, kind: str | None) -> Iterator[_Row]:
    return _read_refusal_direction(path, kind, "polyrefuse")


FORMATS: dict[str, ImportFormat] = {
    f.name: f
    for f in (
        ImportFormat(
            "xstest", _read_xstest, ("over_refusal_safe", "over_refusal"), (), "XSTest CSV (id, prompt, type, label)"
        ),
        ImportFormat(
            "coconot",
            _read_coconot,
            (*COCONOT_CATEGORIES.values(), "coconot_contrast"),
            ("eval", "contrast"),
            "CoCoNot JSONL (id, category, subcategory, prompt); a file named *contrast* goes to coconot_contrast",
        ),
        ImportFormat(
            "sorry_bench",
            _read_sorry_bench,
            tuple(g for _, _, g in SORRY_BENCH_GROUPS),
            None,
            "SORRY-Bench JSONL (question_id, category 1-44, turns, prompt_style); kind = style to keep (default base, "
            "or all)",
        ),
        ImportFormat(
            "wildguardmix",
            _read_wildguardmix,
            ("safety_core", "benign"),
            (),
            "WildGuardMix JSONL or Parquet (prompt, prompt_harm_label, adversarial); adversarial rows are skipped",
        ),
        ImportFormat("advbench", _read_advbench, ("safety_core",), (), "AdvBench CSV (goal, target)"),
        ImportFormat(
            "jailbreakbench",
            _read_jailbreakbench,
            ("safety_core", "benign"),
            ("harmful", "benign"),
            "JBB-Behaviors CSV (Index, Goal, Target, Behavior, Category, Source); a file named *benign* is benign",
        ),
        ImportFormat(
            "harmbench",
            _read_harmbench,
            ("safety_core",),
            ("standard", "contextual", "copyright", "all"),
            "HarmBench behaviours CSV (Behavior, FunctionalCategory, SemanticCategory, BehaviorID); kind default "
            "standard",
        ),
        ImportFormat(
            "polyrefuse",
            _read_polyrefuse,
            ("safety_core", "benign"),
            ("harmful", "harmless"),
            "PolyRefuse translated split JSON ({instruction, instruction_translated, category}); harmless_* → benign, "
            "harmful_* → safety_core",
        ),
        ImportFormat(
            "refusal_direction",
            _read_refusal_direction,
            ("safety_core", "benign"),
            ("harmful", "harmless"),
            "refusal_direction split JSON list of {instruction, category}; harmless_* → benign, harmful_* → "
            "safety_core",
        ),
    )
}


def _select_format(fmt: str, kind: str | None, path: Path) -> ImportFormat:
    if fmt not in FORMATS:
        raise ImportFormatError(f"{path}: unknown format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}")
    spec = FORMATS[fmt]
    if kind is not None and spec.kinds is not None and kind not in spec.kinds:
        accepted = ", ".join(spec.kinds) if spec.kinds else "no kind"
        raise ImportFormatError(f"{path}: format {fmt!r} does not take kind {kind!r}; it accepts {accepted}")
    return spec


def import_file(fmt: str, path: Path, category: str | None = None, *, kind: str | None = None) -> ImportResult:
    """Read one dataset file into prompt records grouped by category.

    ``fmt`` is a key of :data:`FORMATS`; ``category`` keeps only that category (an error if the
    file has none of it); ``kind`` picks a variant where the format has them (see ``FORMATS``).
    Returns category/pool → records in file order, with ``.skipped`` counting the rows left out
    (blank text, duplicates, rows the format filters). Raises :class:`ImportFormatError`.
    """
    path = Path(path)
    spec = _select_format(fmt, kind, path)
    if not path.is_file():
        raise ImportFormatError(
            f"{path}: file not found (or not a regular file); check the path (relative paths start at the repository "
            "root)"
        )
    if category is not None and category not in spec.categories:
        raise ImportFormatError(
            f"{path}: format {fmt!r} yields no category {category!r}; it yields {', '.join(spec.categories)}"
        )
    source = f"{fmt}:{path.name}:sha256={file_sha256(path)}"
    result, seen = ImportResult(), {}
    for row in spec.read(path, kind):
        if row.category is None:
            result.skipped[row.note or "filtered"] += 1
            continue
        if not row.text.strip():
            result.skipped["blank text"] += 1
            continue
        record_id = f"{fmt}-{row.key if row.key is not None else _text_hash(row.text)}"
        if record_id in seen:
            first_where, first_text = seen[record_id]
            if first_text != row.text:
                raise _fail(
                    path,
                    f"{row.where}: id {record_id!r} repeats {first_where} with a different prompt",
                    "dataset ids must be unique; fix the duplicated id",
                )
            result.skipped["duplicate"] += 1
            continue
        seen[record_id] = (row.where, row.text)
        if category is not None and row.category != category:
            result.skipped[f"category {row.category}"] += 1
            continue
        record = {"id": record_id, "text": row.text, "category": row.category, "source": source}
        if row.note:
            record["note"] = str(row.note)
        result.setdefault(row.category, []).append(record)
    if not result:
        wanted = f" of category {category!r}" if category else ""
        left_out = ", ".join(f"{n} {reason}" for reason, n in result.skipped.items()) or "the file has no rows"
        raise _fail(path, f"no prompts{wanted} imported ({left_out})", "check the format, kind and category options")
    log.info("%s: %s; skipped %s", path, {c: len(r) for c, r in result.items()}, dict(result.skipped))
    return result


def write_import(records_by_category: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """Write ``<category>.jsonl`` per category into ``out_dir``, each atomically; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for category, records in records_by_category.items():
        target = out_dir / f"{category}.jsonl"
        handle = tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=out_dir, prefix=f".{category}.", suffix=".tmp", delete=False
        )
        try:
            with handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, target)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise
        written.append(target)
    return written


def run_import(
    fmt: str,
    file: Path,
    category: str | None = None,
    out: Path | None = None,
    allow_outside: bool = False,
    repo_root: Path | None = None,
    *,
    kind: str | None = None,
) -> list[Path]:
    """Import ``file`` and write it under ``out`` (default ``<repo_root>/prompts/imported/<fmt>/``).

    Relative ``file`` and ``out`` paths start at ``repo_root`` (default: the working directory).
    ``out`` must lie inside ``repo_root`` unless ``allow_outside``. Returns the written paths;
    raises :class:`ImportFormatError` before writing anything when an input is wrong.
    """
    root = Path.cwd() if repo_root is None else Path(repo_root)
    file = root / file
    _select_format(fmt, kind, file)
    out_dir = (root / out) if out is not None else root / "prompts" / "imported" / fmt
    if not allow_outside and not out_dir.resolve().is_relative_to(root.resolve()):
        raise ImportFormatError(
            f"{file}: output folder {out} resolves to {out_dir.resolve()}, outside the repository {root.resolve()}; "
            f"write under the repository (default prompts/imported/{fmt}/) or allow writing outside it explicitly"
        )
    return write_import(import_file(fmt, file, category, kind=kind), out_dir)
