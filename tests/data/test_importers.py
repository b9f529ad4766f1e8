"""Dataset importers: format mappings on synthetic fixtures, bad inputs, and the real public files.

The synthetic fixtures in ``fixtures/importers/`` are invented rows in each dataset's layout.
The real datasets are read from ``../shared/datasets`` beside the repository and never copied
into it; those tests skip when the folder is absent.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from refusal_atlas.data.importers import FORMATS, ImportFormatError, import_file, run_import, write_import

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "importers"
REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _counts(result: dict[str, list[dict]]) -> dict[str, int]:
    return {category: len(records) for category, records in result.items()}


def _check_records(result: dict[str, list[dict]], fmt: str, path: Path) -> None:
    """Every record follows the prompt schema, carries the file's digest and has a unique id."""
    ids = []
    for category, records in result.items():
        for record in records:
            assert set(record) <= {"id", "text", "category", "source", "note"}
            assert record["category"] == category
            assert record["id"].startswith(f"{fmt}-")
            assert record["text"].strip()
            assert record["source"] == f"{fmt}:{path.name}:sha256={_sha256(path)}"
            assert isinstance(record.get("note", ""), str)
            ids.append(record["id"])
    assert len(ids) == len(set(ids))


MAPPINGS = [
    ("xstest", "xstest_prompts.csv", None, {"over_refusal_safe": 3, "over_refusal": 2}, {"blank text": 1}),
    (
        "coconot",
        "coconot_eval.jsonl",
        None,
        {"humanizing": 1, "incomplete": 2, "indeterminate": 1, "safety_concerns": 1, "unsupported": 1},
        {"blank text": 1},
    ),
    ("coconot", "coconot_contrast_eval.jsonl", None, {"coconot_contrast": 3}, {}),
    ("coconot", "coconot_eval.jsonl", "contrast", {"coconot_contrast": 6}, {"blank text": 1}),
    (
        "sorry_bench",
        "sorry_bench.jsonl",
        None,
        {"hate_speech": 1, "crime_assistance": 1, "inappropriate": 1, "unqualified_advice": 1},
        {"blank text": 1, "prompt_style uppercase": 1},
    ),
    (
        "sorry_bench",
        "sorry_bench.jsonl",
        "all",
        {"hate_speech": 2, "crime_assistance": 1, "inappropriate": 1, "unqualified_advice": 1},
        {"blank text": 1},
    ),
    (
        "wildguardmix",
        "wildguardmix.jsonl",
        None,
        {"safety_core": 1, "benign": 1},
        {"adversarial": 2, "no prompt_harm_label": 1},
    ),
    ("advbench", "advbench_harmful_behaviors.csv", None, {"safety_core": 3}, {}),
    ("jailbreakbench", "jbb_harmful-behaviors.csv", None, {"safety_core": 3}, {}),
    ("jailbreakbench", "jbb_benign-behaviors.csv", None, {"benign": 3}, {}),
    ("jailbreakbench", "jbb_harmful-behaviors.csv", "benign", {"benign": 3}, {}),
    (
        "harmbench",
        "harmbench_behaviors_text.csv",
        None,
        {"safety_core": 2},
        {"FunctionalCategory contextual": 1, "FunctionalCategory copyright": 1},
    ),
    ("harmbench", "harmbench_behaviors_text.csv", "all", {"safety_core": 4}, {}),
    ("refusal_direction", "refusal_direction_harmful_val.json", None, {"safety_core": 3}, {"duplicate": 1}),
    ("refusal_direction", "refusal_direction_harmless_val.json", None, {"benign": 2}, {"blank text": 1}),
]


@pytest.mark.parametrize(
    ("fmt", "name", "kind", "expected", "skipped"), MAPPINGS, ids=[f"{m[0]}-{m[1]}-{m[2]}" for m in MAPPINGS]
)
def test_format_maps_rows_to_categories(fmt, name, kind, expected, skipped):
    path = FIXTURES / name
    result = import_file(fmt, path, kind=kind)
    assert _counts(result) == expected
    assert dict(result.skipped) == skipped
    _check_records(result, fmt, path)
    again = import_file(fmt, path, kind=kind)
    assert again == result  # Same ids, texts and order on a second import.


def test_registry_lists_every_format():
    assert set(FORMATS) == {
        "xstest",
        "coconot",
        "sorry_bench",
        "wildguardmix",
        "advbench",
        "jailbreakbench",
        "harmbench",
        "refusal_direction",
        "polyrefuse",
    }


def test_ids_use_the_datasets_own_keys_or_a_text_hash():
    xstest = import_file("xstest", FIXTURES / "xstest_prompts.csv")
    assert [r["id"] for r in xstest["over_refusal"]] == ["xstest-5", "xstest-6"]
    assert xstest["over_refusal_safe"][0]["note"] == "homonyms"
    coconot = import_file("coconot", FIXTURES / "coconot_eval.jsonl")
    assert coconot["humanizing"][0] == {
        "id": "coconot-syn0001",
        "text": "What did you eat for breakfast this morning?",
        "category": "humanizing",
        "source": f"coconot:coconot_eval.jsonl:sha256={_sha256(FIXTURES / 'coconot_eval.jsonl')}",
        "note": "personal inquiry",
    }
    contrast = import_file("coconot", FIXTURES / "coconot_contrast_eval.jsonl")
    assert contrast["coconot_contrast"][0]["note"] == "safety_concerns: dangerous or sensitive topics"
    sorry = import_file("sorry_bench", FIXTURES / "sorry_bench.jsonl", kind="all")
    assert [r["id"] for r in sorry["hate_speech"]] == ["sorry_bench-1", "sorry_bench-1-uppercase"]
    assert sorry["unqualified_advice"][0]["note"] == "category 44, prompt_style base"
    harmful = import_file("jailbreakbench", FIXTURES / "jbb_harmful-behaviors.csv")
    benign = import_file("jailbreakbench", FIXTURES / "jbb_benign-behaviors.csv")
    assert harmful["safety_core"][0]["id"] == "jailbreakbench-harmful-0"
    assert benign["benign"][0]["id"] == "jailbreakbench-benign-0"
    harmbench = import_file("harmbench", FIXTURES / "harmbench_behaviors_text.csv", kind="contextual")
    (contextual,) = harmbench["safety_core"]
    assert contextual["id"] == "harmbench-persuasive_rewrite_fictional"
    assert contextual["note"] == "misinformation_disinformation"
    assert contextual["text"].startswith("An invented passage") and contextual["text"].endswith("more persuasive")
    advbench = import_file("advbench", FIXTURES / "advbench_harmful_behaviors.csv")
    first = advbench["safety_core"][0]
    assert first["id"] == "advbench-" + hashlib.sha256(first["text"].encode()).hexdigest()[:12]


def test_wildguardmix_reads_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [json.loads(line) for line in (FIXTURES / "wildguardmix.jsonl").read_text().splitlines()]
    parquet = tmp_path / "wildguardmix_train.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    from_parquet = import_file("wildguardmix", parquet)
    from_jsonl = import_file("wildguardmix", FIXTURES / "wildguardmix.jsonl")
    assert _counts(from_parquet) == {"safety_core": 1, "benign": 1}
    assert [r["id"] for r in from_parquet["safety_core"]] == [r["id"] for r in from_jsonl["safety_core"]]
    assert from_parquet["safety_core"][0]["note"] == "fraud"


def test_category_option_restricts_output():
    result = import_file("xstest", FIXTURES / "xstest_prompts.csv", category="over_refusal")
    assert _counts(result) == {"over_refusal": 2}
    with pytest.raises(
        ImportFormatError, match=r"yields no category 'benign'; it yields over_refusal_safe, over_refusal"
    ):
        import_file("xstest", FIXTURES / "xstest_prompts.csv", category="benign")
    with pytest.raises(
        ImportFormatError, match=r"coconot_contrast_eval.jsonl: no prompts of category 'humanizing' imported"
    ):
        import_file("coconot", FIXTURES / "coconot_contrast_eval.jsonl", category="humanizing")


def test_refusal_direction_needs_a_kind_when_the_name_does_not_say(tmp_path):
    neutral = tmp_path / "split.json"
    neutral.write_bytes((FIXTURES / "refusal_direction_harmless_val.json").read_bytes())
    with pytest.raises(
        ImportFormatError, match=r"split.json: cannot tell whether .* kind='harmful' or kind='harmless'"
    ):
        import_file("refusal_direction", neutral)
    assert _counts(import_file("refusal_direction", neutral, kind="harmless")) == {"benign": 2}
    with pytest.raises(ImportFormatError, match=r"does not take kind 'evil'; it accepts harmful, harmless"):
        import_file("refusal_direction", neutral, kind="evil")


def test_run_import_writes_one_jsonl_per_category_reproducibly(tmp_path):
    paths = run_import("xstest", FIXTURES / "xstest_prompts.csv", repo_root=tmp_path)
    out_dir = tmp_path / "prompts" / "imported" / "xstest"
    assert sorted(paths) == [out_dir / "over_refusal.jsonl", out_dir / "over_refusal_safe.jsonl"]
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "over_refusal.jsonl",
        "over_refusal_safe.jsonl",
    ]  # no temp files left
    first = {p.name: p.read_bytes() for p in paths}
    records = [json.loads(line) for line in first["over_refusal.jsonl"].decode().splitlines()]
    assert [r["id"] for r in records] == ["xstest-5", "xstest-6"]
    run_import("xstest", FIXTURES / "xstest_prompts.csv", repo_root=tmp_path)
    assert {p.name: p.read_bytes() for p in paths} == first

    custom = run_import(
        "advbench", FIXTURES / "advbench_harmful_behaviors.csv", out=Path("prompts/custom"), repo_root=tmp_path
    )
    assert custom == [tmp_path / "prompts" / "custom" / "safety_core.jsonl"]


def test_write_import_leaves_no_partial_file(tmp_path):
    good = {"id": "x-1", "text": "An invented prompt.", "category": "benign", "source": "x"}
    write_import({"benign": [good]}, tmp_path)
    before = (tmp_path / "benign.jsonl").read_bytes()
    with pytest.raises(TypeError):
        write_import({"benign": [good, {**good, "id": object()}]}, tmp_path)
    assert (tmp_path / "benign.jsonl").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["benign.jsonl"]


def _binary(tmp_path: Path) -> Path:
    path = tmp_path / "blob.csv"
    path.write_bytes(b"id,prompt\x00\x01\x02\xff\xfe" * 10)
    return path


def _parquet(tmp_path: Path) -> Path:
    pd = pytest.importorskip("pandas")
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": [1], "prompt": ["An invented prompt."]}).to_parquet(path)
    return path


BAD_INPUTS = [
    (
        "no_such_format",
        lambda tmp: FIXTURES / "xstest_prompts.csv",
        [
            "unknown format 'no_such_format'",
            "known formats: advbench, coconot, harmbench, jailbreakbench, polyrefuse, refusal_direction",
        ],
    ),
    ("xstest", lambda tmp: tmp / "missing.csv", ["missing.csv: file not found", "check the path"]),
    (
        "advbench",
        lambda tmp: FIXTURES / "coconot_eval.jsonl",
        ["coconot_eval.jsonl: looks like JSON, not the CSV", "goal, target"],
    ),
    ("xstest", _binary, ["blob.csv: is a binary file", "CSV/JSON"]),
    ("xstest", _parquet, ["prompts.parquet: is a Parquet file", "wildguardmix reads Parquet"]),
    (
        "coconot",
        lambda tmp: FIXTURES / "xstest_prompts.csv",
        ["xstest_prompts.csv: line 1: malformed JSON", "looks like CSV", "use a CSV format"],
    ),
    (
        "refusal_direction",
        lambda tmp: FIXTURES / "coconot_eval.jsonl",
        ["cannot tell whether this split is harmful or harmless"],
    ),
    (
        "xstest",
        lambda tmp: FIXTURES / "missing_columns.csv",
        [
            "missing_columns.csv: missing column(s) prompt, type, label",
            "found columns: id, question, kind",
            "needs a header row with id, prompt, type, label",
        ],
    ),
    (
        "coconot",
        lambda tmp: FIXTURES / "malformed.jsonl",
        ["malformed.jsonl: line 3: malformed JSON", "fix or delete that line"],
    ),
    (
        "sorry_bench",
        lambda tmp: FIXTURES / "sorry_bench_bad_category.jsonl",
        ["sorry_bench_bad_category.jsonl: line 2: SORRY-Bench category 45 is not a number from 1 to 44"],
    ),
    ("coconot", lambda tmp: FIXTURES / "advbench_harmful_behaviors.csv", ["line 1: malformed JSON", "looks like CSV"]),
]


@pytest.mark.parametrize(
    ("fmt", "make_path", "expected"), BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_refused_clearly_and_writes_nothing(tmp_path, fmt, make_path, expected):
    path = make_path(tmp_path)
    with pytest.raises(ImportFormatError) as info:
        run_import(fmt, path, repo_root=tmp_path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in expected:
        assert fragment in message
    assert not (tmp_path / "prompts").exists()


def test_out_outside_the_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    outside = tmp_path / "elsewhere"
    for out in (outside, Path("../elsewhere"), Path("prompts/../../elsewhere")):
        with pytest.raises(ImportFormatError, match=r"outside the repository .*allow writing outside it explicitly"):
            run_import("advbench", FIXTURES / "advbench_harmful_behaviors.csv", out=out, repo_root=repo)
        assert not outside.exists()
    assert run_import(
        "advbench", FIXTURES / "advbench_harmful_behaviors.csv", out=outside, allow_outside=True, repo_root=repo
    )
    assert (outside / "safety_core.jsonl").is_file()


def _real(relative: str) -> Path:
    path = DATASETS / relative
    if not path.is_file():
        pytest.skip(f"../shared/datasets not present: {path} is missing (the real datasets live beside the repository)")
    return path


def test_real_xstest():
    path = _real("xstest/xstest_prompts.csv")
    result = import_file("xstest", path)
    assert _counts(result) == {"over_refusal_safe": 250, "over_refusal": 200}
    _check_records(result, "xstest", path)


def test_real_coconot():
    path = _real("coconot/coconot_eval.jsonl")
    result = import_file("coconot", path)
    assert _counts(result) == {
        "humanizing": 82,
        "incomplete": 225,
        "indeterminate": 142,
        "safety_concerns": 395,
        "unsupported": 157,
    }
    _check_records(result, "coconot", path)
    contrast = import_file("coconot", _real("coconot/coconot_contrast_eval.jsonl"))
    assert _counts(contrast) == {"coconot_contrast": 379}


def test_real_advbench_and_jailbreakbench():
    assert _counts(import_file("advbench", _real("advbench/harmful_behaviors.csv"))) == {"safety_core": 520}
    harmful = import_file("jailbreakbench", _real("jailbreakbench/harmful-behaviors.csv"))
    benign = import_file("jailbreakbench", _real("jailbreakbench/benign-behaviors.csv"))
    assert _counts(harmful) == {"safety_core": 100} and _counts(benign) == {"benign": 100}
    # refusal_direction's copy has an empty first header cell instead of "Index"; ids must still match.
    raw = import_file("jailbreakbench", _real("refusal_direction/raw/jailbreakbench.csv"))
    assert [r["id"] for r in raw["safety_core"]] == [r["id"] for r in harmful["safety_core"]]


def test_real_harmbench():
    path = _real("harmbench/harmbench_behaviors_text_all.csv")
    result = import_file("harmbench", path)
    assert _counts(result) == {"safety_core": 200}
    assert dict(result.skipped) == {"FunctionalCategory contextual": 100, "FunctionalCategory copyright": 100}
    assert {r["note"] for r in result["safety_core"]} == {
        "chemical_biological",
        "cybercrime_intrusion",
        "illegal",
        "misinformation_disinformation",
        "harassment_bullying",
        "harmful",
    }
    _check_records(result, "harmbench", path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("harmful_val.json", {"safety_core": 39}),
        ("harmful_test.json", {"safety_core": 562}),  # 572 rows, 10 prompts listed twice under two taxonomies
        ("harmless_val.json", {"benign": 6264}),
        ("harmless_test.json", {"benign": 6266}),
    ],
)
def test_real_refusal_direction_splits(name, expected):
    result = import_file("refusal_direction", _real(f"refusal_direction/splits/{name}"))
    assert _counts(result) == expected
