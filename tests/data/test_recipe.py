"""Manifest sets read from dataset files (``sources``), their fallbacks and pins, and fetching them with DVC.

Synthetic dataset files (``fixtures/importers``) always run; the study recipe against the real
files in ``../shared/datasets`` skips when that folder is absent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run, shared_datasets

from refusal_atlas.config import SplitFractions
from refusal_atlas.data.prompts import PromptValidationError, collect_prompt_sets
from refusal_atlas.data.recipe import FetchError, fallbacks, fetch_sources

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "importers"
DVC = str(Path(sys.executable).with_name("dvc"))
STUDY = REPO / "prompts" / "study" / "manifest.yaml"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path, sets: dict) -> Path:
    """A manifest whose sets come from dataset files: over_refusal against its safe twins, from XSTest."""
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"default_baseline": "over_refusal_safe", **sets}, sort_keys=False))
    return path


def _xstest_sets(xstest_sources: list[dict]) -> dict:
    return {
        "categories": {"over_refusal": {"sources": xstest_sources}},
        "baselines": {"over_refusal_safe": {"sources": xstest_sources}},
    }


def _raw(folder: Path) -> Path:
    raw = folder / "raw" / "xstest"
    raw.mkdir(parents=True)
    shutil.copy(FIXTURES / "xstest_prompts.csv", raw / "xstest_prompts.csv")
    return raw / "xstest_prompts.csv"


def test_a_set_falls_back_to_its_next_source_and_says_so(tmp_path):
    csv = _raw(tmp_path)
    gated = {"format": "wildguardmix", "file": "raw/wgm/test.parquet", "published": "https://example.org/wgm (gated)"}
    xstest = {"format": "xstest", "file": "raw/xstest/xstest_prompts.csv", "sha256": _sha(csv)}
    manifest = _manifest(tmp_path, _xstest_sets([gated, xstest]))

    sets = collect_prompt_sets(manifest, SplitFractions(), 1)
    assert sets.table.groupby("category").size().to_dict() == {"over_refusal": 2, "over_refusal_safe": 3}
    assert set(sets.table.source) == {f"xstest:xstest_prompts.csv:sha256={_sha(csv)}"}
    target = sets.provenance["sets"]["over_refusal"]
    assert target == {
        "role": "target",
        "baseline": "over_refusal_safe",
        "description": None,
        "format": "xstest",
        "file": "raw/xstest/xstest_prompts.csv",
        "sha256": _sha(csv),
        "n": 2,
    }
    note = sets.provenance["notes"][0]
    for part in (
        "target 'over_refusal'",
        "raw/wgm/test.parquet",
        "https://example.org/wgm (gated)",
        "read from raw/xstest",
    ):
        assert part in note
    assert fallbacks(manifest) == sets.provenance["notes"]


def test_limit_keeps_the_first_prompts_of_a_source(tmp_path):
    _raw(tmp_path)
    source = {"format": "xstest", "file": "raw/xstest/xstest_prompts.csv", "limit": 2}
    table = collect_prompt_sets(_manifest(tmp_path, _xstest_sets([source])), SplitFractions(), 1).table
    assert table.groupby("category").size().to_dict() == {"over_refusal": 2, "over_refusal_safe": 2}
    assert sorted(table[table.category == "over_refusal_safe"].prompt_id) == ["xstest-1", "xstest-2"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda s: {**s, "sha256": "0" * 64},
            ["xstest_prompts.csv: sha256 ", "the manifest pins 0000", "remove the sha256 pin"],
        ),
        (
            lambda s: {**s, "file": "raw/xstest/absent.csv", "published": "https://example.org/xstest"},
            [
                "'over_refusal': none of its sources is present",
                "raw/xstest/absent.csv (xstest)",
                "published at https://example.org/xstest",
                "refusal-atlas study fetch",
            ],
        ),  # fmt: skip
        (lambda s: {**s, "format": "nope"}, ["unknown format 'nope'", "known formats"]),
        (lambda s: {**s, "file": None}, ["sources.0.file"]),
    ],
)
def test_bad_sources_are_named_with_a_fix(tmp_path, edit, expected):
    _raw(tmp_path)
    source = edit({"format": "xstest", "file": "raw/xstest/xstest_prompts.csv"})
    with pytest.raises(PromptValidationError) as err:
        collect_prompt_sets(_manifest(tmp_path, _xstest_sets([source])), SplitFractions(), 1)
    for part in expected:
        assert part in str(err.value)


def test_a_set_names_a_file_or_sources_not_both(tmp_path):
    _raw(tmp_path)
    source = {"format": "xstest", "file": "raw/xstest/xstest_prompts.csv"}
    sets = _xstest_sets([source])
    sets["categories"]["over_refusal"]["file"] = "over_refusal.jsonl"
    with pytest.raises(PromptValidationError, match="give either file .* or sources"):
        collect_prompt_sets(_manifest(tmp_path, sets), SplitFractions(), 1)


def _dvc_repo(path: Path) -> Path:
    path.mkdir()
    run(["git", "init", "-q"], path)
    run(["dvc", "init", "-q"], path)
    run(["git", "-c", "user.email=t@example.com", "-c", "user.name=test", "commit", "-qm", "dvc init"], path)
    return path


def _staged(repo: Path) -> list[str]:
    return run(["git", "diff", "--cached", "--name-only"], repo).stdout.split()


def test_fetch_imports_each_file_with_dvc_and_stages_it(tmp_path, monkeypatch):
    repo = _dvc_repo(tmp_path / "repo")
    local = tmp_path / "datasets"
    (local / "xstest").mkdir(parents=True)  # a copy of the datasets, laid out as the paths after raw/
    csv = Path(shutil.copy(FIXTURES / "xstest_prompts.csv", local / "xstest" / "xstest_prompts.csv"))
    recipe = repo / "recipe"
    recipe.mkdir()
    gated = {"format": "wildguardmix", "file": "raw/wgm/test.parquet", "published": "https://example.org/wgm"}
    xstest = {"format": "xstest", "file": "raw/xstest/xstest_prompts.csv", "sha256": _sha(csv)}
    manifest = _manifest(recipe, _xstest_sets([gated, xstest]))
    monkeypatch.chdir(repo)

    items = {i.file: i for i in fetch_sources(manifest.relative_to(repo), local, DVC)}
    assert items["raw/wgm/test.parquet"].status.startswith(f"not fetched (not in {local}); published at https://")
    assert items["raw/xstest/xstest_prompts.csv"].status == f"imported from {local / 'xstest' / 'xstest_prompts.csv'}"
    assert items["raw/xstest/xstest_prompts.csv"].sets == ["over_refusal", "over_refusal_safe"]
    imported = recipe / "raw" / "xstest" / "xstest_prompts.csv"
    assert _sha(imported) == _sha(csv)
    record = yaml.safe_load(imported.with_name("xstest_prompts.csv.dvc").read_text())
    assert record["frozen"] is True and record["deps"][0]["path"] == str(local / "xstest" / "xstest_prompts.csv")
    assert _staged(repo) == ["recipe/raw/xstest/.gitignore", "recipe/raw/xstest/xstest_prompts.csv.dvc"]
    assert "xstest_prompts.csv" in (imported.parent / ".gitignore").read_text()
    assert run(["dvc", "status", "recipe/raw/xstest/xstest_prompts.csv.dvc"], repo).returncode == 0
    # A second fetch keeps the file (it has the pinned sha256).
    again = {i.file: i for i in fetch_sources(manifest.relative_to(repo), local, DVC)}
    assert again["raw/xstest/xstest_prompts.csv"].status == "present"


def test_fetch_refuses_a_file_that_differs_from_its_pin_and_leaves_nothing(tmp_path, monkeypatch):
    repo = _dvc_repo(tmp_path / "repo")
    local = tmp_path / "datasets"
    (local / "xstest").mkdir(parents=True)
    shutil.copy(FIXTURES / "xstest_prompts.csv", local / "xstest" / "xstest_prompts.csv")
    source = {"format": "xstest", "file": "raw/xstest/xstest_prompts.csv", "sha256": "f" * 64}
    manifest = _manifest(repo, _xstest_sets([source]))
    monkeypatch.chdir(repo)
    with pytest.raises(FetchError) as err:
        fetch_sources(Path("manifest.yaml"), local, DVC)
    assert "but the recipe pins ffff" in str(err.value) and "fetch the pinned revision" in str(err.value)
    assert not (repo / "raw" / "xstest" / "xstest_prompts.csv").exists()
    assert not (repo / "raw" / "xstest" / "xstest_prompts.csv.dvc").exists()
    assert _staged(repo) == []
    with pytest.raises(FetchError, match="'over_refusal': none of its sources is present"):
        fallbacks(manifest)


def test_the_study_recipe_reads_every_public_dataset_as_pinned(tmp_path):
    """The study manifest against ../shared/datasets: each set from its dataset, the gated ones falling back."""
    datasets = shared_datasets()
    recipe = tmp_path / "study"
    shutil.copytree(STUDY.parent, recipe, ignore=shutil.ignore_patterns("raw"))
    for name in ("hate_speech", "crime_assistance", "inappropriate", "unqualified_advice"):
        shutil.copy(REPO / "prompts" / f"{name}.jsonl", tmp_path / f"{name}.jsonl")
    manifest = yaml.safe_load(STUDY.read_text())
    for entry in [*manifest["categories"].values(), *manifest["baselines"].values()]:
        for src in entry["sources"]:
            origin = datasets / Path(*Path(src["file"]).parts[1:])
            if src["format"] != "prompts" and origin.is_file():
                (recipe / src["file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, recipe / src["file"])
    sets = collect_prompt_sets(recipe / "manifest.yaml", SplitFractions(), 48)
    sums = dict(line.split()[::-1] for line in (datasets / "SHA256SUMS.txt").read_text().splitlines())
    provenance = sets.provenance["sets"]
    for name, info in provenance.items():
        if info["format"] != "prompts":
            assert sums["./" + str(Path(*Path(info["file"]).parts[1:]))] == info["sha256"], name
    counts = {n: (info["format"], info["n"]) for n, info in provenance.items()}
    assert counts == {
        "safety_core": ("harmbench", 200),
        "over_refusal": ("xstest", 200),
        "humanizing": ("coconot", 82),
        "incomplete": ("coconot", 225),
        "indeterminate": ("coconot", 142),
        "safety_concerns": ("coconot", 395),
        "unsupported": ("coconot", 157),
        "hate_speech": ("prompts", 64),
        "crime_assistance": ("prompts", 64),
        "inappropriate": ("prompts", 64),
        "unqualified_advice": ("prompts", 64),
        "benign": ("refusal_direction", 300),
        "over_refusal_safe": ("xstest", 250),
    }
    notes = "\n".join(sets.provenance["notes"])
    assert notes.count("huggingface.co/datasets/sorry-bench") == 4 and notes.count("allenai/wildguardmix") == 2
    assert json.loads(json.dumps(sets.provenance)) == sets.provenance  # what the prompts stage writes


def test_judge_validation_files_are_checked_and_an_absent_one_is_noted(tmp_path):
    from refusal_atlas.data.prompts import validation_files

    (tmp_path / "raw").mkdir()
    labelled = tmp_path / "raw" / "done.csv"
    labelled.write_text("prompt,completion,final_label\nHi,Hello!,1_full_compliance\n")
    files = [
        {"format": "xstest_completions", "file": "raw/done.csv", "sha256": _sha(labelled)},
        {"format": "xstest_completions", "file": "raw/absent.csv", "published": "https://example.org/labels"},
    ]
    manifest = _manifest(tmp_path, {"categories": {}, "baselines": {}, "judge_validation": files})
    present, notes = validation_files(manifest)
    assert [path for _, path in present] == [labelled]
    assert notes == [
        "judge validation: raw/absent.csv (xstest_completions) is not there; published at https://example.org/labels; "
        "the judges are not scored on it"
    ]
    files[0]["sha256"] = "1" * 64
    with pytest.raises(PromptValidationError, match="the manifest pins 1111"):
        validation_files(_manifest(tmp_path, {"categories": {}, "baselines": {}, "judge_validation": files}))
    files[0] = {"format": "xstest", "file": "raw/done.csv"}
    with pytest.raises(PromptValidationError, match="only 'xstest_completions'"):
        validation_files(_manifest(tmp_path, {"categories": {}, "baselines": {}, "judge_validation": files}))


def test_later_stages_read_the_sets_in_the_manifests_order(tmp_path):
    """manifest.json is written with sorted keys; the seeded draws of the directions stage follow the manifest's
    order, so read_provenance must give that order back, not the alphabetical one."""
    from refusal_atlas.data.atomic import write_json
    from refusal_atlas.data.prompts import read_provenance

    manifest = REPO / "prompts" / "manifest.yaml"
    sets = collect_prompt_sets(manifest, SplitFractions(), 48)
    write_json(tmp_path / "manifest.json", sets.provenance)
    baseline_of, names = read_provenance(tmp_path / "manifest.json")
    listed = yaml.safe_load(manifest.read_text())
    assert names == [*listed["categories"], *listed["baselines"]] != sorted(names)
    assert list(baseline_of) == list(listed["categories"])
    assert baseline_of["over_refusal"] == "over_refusal_safe" and baseline_of["safety_core"] == "benign"
