"""Prompt sets: the shipped sets, splits, and every bad input through the real `prompts` stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, run

from refusal_atlas.config import PromptsConfig, SplitFractions
from refusal_atlas.data.prompts import PromptValidationError, assign_split, build_prompt_table, parse_prompt_file

TARGETS = [
    "safety_core",
    "over_refusal",
    "humanizing",
    "incomplete",
    "indeterminate",
    "safety_concerns",
    "unsupported",
    "hate_speech",
    "crime_assistance",
    "inappropriate",
    "unqualified_advice",
]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return build_prompt_table(REPO / "prompts" / "manifest.yaml", SplitFractions(), 48)


def test_shipped_sets_meet_the_minimums(table):
    counts = table.groupby("category").size()
    assert sorted(table.loc[table.role == "target", "category"].unique()) == sorted(TARGETS)
    assert all(counts[c] >= 64 for c in TARGETS)
    assert counts["benign"] >= 300 and counts["over_refusal_safe"] >= 64
    assert table.prompt_id.is_unique and table.text.is_unique
    assert set(table.split) == {"train", "val", "test"}
    assert (table.sha256.str.len() == 64).all()


def test_max_per_set_keeps_the_first_prompts_of_every_set_after_validating_all(tmp_path, table):
    sample = build_prompt_table(REPO / "prompts" / "manifest.yaml", SplitFractions(), 24, max_per_set=24)
    assert sample.groupby("category").size().to_dict() == dict.fromkeys(TARGETS + ["benign", "over_refusal_safe"], 24)
    first = {
        name: [r.id for r in parse_prompt_file(REPO / f"prompts/{name}.jsonl", name)[0][:24]]
        for name in ["benign", "humanizing"]
    }
    for name, ids in first.items():
        assert sorted(sample.prompt_id[sample.category == name]) == sorted(ids)
    # Rows are the full table's rows, splits included.
    assert sample.merge(table, on=list(table.columns)).shape[0] == len(sample)
    # A bad line past the sample still fails: the whole file is validated.
    prompts = _copy_prompts(tmp_path)
    with (prompts / "benign.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(PromptValidationError, match="benign.jsonl"):
        build_prompt_table(prompts / "manifest.yaml", SplitFractions(), 24, max_per_set=24)
    with pytest.raises(ValueError, match="prompts.max_per_set=8 is below prompts.min_per_category=24"):
        PromptsConfig(min_per_category=24, max_per_set=8)


def test_over_refusal_twins_share_their_trigger_word():
    unsafe = {r.id: r for r in parse_prompt_file(REPO / "prompts/over_refusal.jsonl", "over_refusal")[0]}
    safe = {r.id: r for r in parse_prompt_file(REPO / "prompts/over_refusal_safe.jsonl", "over_refusal_safe")[0]}
    assert len(safe) >= 64
    for rec in safe.values():
        fields = dict(part.strip().split("=", 1) for part in rec.note.split(";"))
        twin = unsafe[fields["twin"]]
        assert fields["trigger"].lower() in rec.text.lower() and fields["trigger"].lower() in twin.text.lower()


def test_split_fractions_are_respected(table):
    share = table.split.value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.55, abs=0.05)
    assert share["test"] == pytest.approx(0.30, abs=0.05)


def test_adding_or_removing_prompts_never_moves_another(tmp_path, table):
    fractions = SplitFractions()
    before = dict(zip(table.prompt_id, table.split))
    ids = [f"new-{i:04d}" for i in range(500)]
    kept = list(before)[::2]
    after = {i: assign_split(i, fractions) for i in kept + ids}
    assert all(after[i] == before[i] for i in kept)
    # And the table as a whole: drop a file's first ten records, add ten, rebuild.
    prompts = _copy_prompts(tmp_path)
    path = prompts / "benign.jsonl"
    lines = path.read_text().splitlines()
    extra = [
        json.dumps(
            {"id": f"benign-new-{i}", "text": f"Explain topic number {i}.", "category": "benign", "source": "test"}
        )
        for i in range(10)
    ]
    path.write_text("\n".join(lines[10:] + extra) + "\n")
    rebuilt = build_prompt_table(prompts / "manifest.yaml", fractions, 48)
    merged = rebuilt.merge(table, on="prompt_id", suffixes=("_new", "_old"))
    assert len(merged) == len(table) - 10
    assert (merged.split_new == merged.split_old).all()


def _copy_prompts(tmp_path: Path) -> Path:
    dest = tmp_path / "prompts"
    dest.mkdir()
    for src in (REPO / "prompts").glob("*"):
        if src.is_file():
            (dest / src.name).write_bytes(src.read_bytes())
    return dest


def _edit_line(path: Path, lineno: int, new: bytes | None) -> None:
    lines = path.read_bytes().split(b"\n")
    if new is None:
        del lines[lineno - 1]
    else:
        lines[lineno - 1] = new
    path.write_bytes(b"\n".join(lines))


def _bad_malformed(p):
    _edit_line(p / "humanizing.jsonl", 3, b'{"id": "humanizing-0003", "text": "oops"')
    return "humanizing.jsonl:3", "malformed JSON"


def _bad_missing_field(p):
    _edit_line(p / "humanizing.jsonl", 5, b'{"id": "humanizing-0005", "category": "humanizing", "source": "x"}')
    return "humanizing.jsonl:5", "missing field(s) text"


def _bad_duplicate(p):
    _edit_line(
        p / "humanizing.jsonl",
        7,
        b'{"id": "humanizing-0001", "text": "Another text.", "category": "humanizing", "source": "x"}',
    )
    return "humanizing.jsonl", "duplicate id 'humanizing-0001'"


def _bad_empty_text(p):
    _edit_line(
        p / "incomplete.jsonl", 2, b'{"id": "incomplete-0002", "text": "   ", "category": "incomplete", "source": "x"}'
    )
    return "incomplete.jsonl:2", "empty text"


def _bad_not_utf8(p):
    _edit_line(
        p / "benign.jsonl", 9, b'{"id": "benign-0009", "text": "caf\xe9 au lait", "category": "benign", "source": "x"}'
    )
    return "benign.jsonl:9", "not UTF-8"


def _bad_category_without_file(p):
    (p / "unsupported.jsonl").unlink()
    return "manifest.yaml", "'unsupported' names file 'unsupported.jsonl', which does not exist"


def _bad_file_not_in_manifest(p):
    (p / "extra.jsonl").write_text('{"id": "extra-1", "text": "hi", "category": "extra", "source": "x"}\n')
    return "extra.jsonl", "not listed in"


def _bad_too_few(p):
    path = p / "indeterminate.jsonl"
    path.write_text("\n".join(path.read_text().splitlines()[:20]) + "\n")
    return "indeterminate.jsonl", "has 20 prompts, fewer than prompts.min_per_category=48"


BAD_INPUTS = [
    _bad_malformed,
    _bad_missing_field,
    _bad_duplicate,
    _bad_empty_text,
    _bad_not_utf8,
    _bad_category_without_file,
    _bad_file_not_in_manifest,
    _bad_too_few,
]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=[f.__name__[5:] for f in BAD_INPUTS])
def test_bad_prompt_input_fails_the_stage_cleanly(tmp_path, make_bad):
    prompts = _copy_prompts(tmp_path)
    where, what = make_bad(prompts)
    out = tmp_path / "out"
    params = tmp_path / "params.yaml"
    params.write_text(
        f"prompts:\n  manifest: {prompts / 'manifest.yaml'}\ntracking:\n  uri: sqlite:///{tmp_path / 'mlflow.db'}\n"
    )
    proc = run(
        [sys.executable, str(REPO / "stages/prompts.py"), "--params", str(params), "--out", str(out)],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert where in proc.stderr and what in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir()), "the failing stage left output behind"
