"""The study's recipe end to end on the demo model: one command fetches the public datasets from
``../shared/datasets`` as DVC external data and runs the whole pipeline on them as a DVC experiment.

Reduced sizes: the smoke profile (40 prompts a set, short training and generations) and a tiny
profile on top (two steered directions, directions from every prompt of a set). Skips when
``../shared/datasets`` is absent.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import run, shared_datasets

pytestmark = pytest.mark.slow


def test_one_command_runs_the_pipeline_on_the_study_recipe(study_pipeline):
    """`refusal-atlas study run --from ../shared/datasets profiles/smoke.yaml tiny.yaml` (tests/builds.py), run in
    the background build."""
    datasets, repo = shared_datasets(), study_pipeline
    out = (repo / "repro.log").read_text()
    assert "raw/xstest/xstest_prompts.csv (over_refusal, over_refusal_safe): imported from" in out
    assert "raw/sorry_bench/question.jsonl (hate_speech, crime_assistance, inappropriate, unqualified_advice): " \
        "not fetched" in out  # fmt: skip
    assert "fallback: target 'hate_speech'" in out and "huggingface.co/datasets/sorry-bench" in out
    # The raw files are DVC external data: their .dvc files staged, nothing of the data in git.
    staged = run(["git", "diff", "--cached", "--name-only"], repo).stdout.split()
    assert "prompts/study/raw/coconot/coconot_eval.jsonl.dvc" in staged
    assert not [f for f in staged if not f.endswith((".dvc", ".gitignore"))]

    run(["dvc", "exp", "apply", "study"], repo)
    provenance = json.loads((repo / "artifacts/prompts/manifest.json").read_text())
    assert provenance["manifest"] == "prompts/study/manifest.yaml"
    sums = dict(line.split()[::-1] for line in (datasets / "SHA256SUMS.txt").read_text().splitlines())
    html = (repo / "artifacts/report/report.html").read_text()
    assert "prompts/study/manifest.yaml" in html and provenance["sha256"] in html
    formats = {}
    for name, info in provenance["sets"].items():
        assert info["file"] in html and info["sha256"] in html, name  # the report names every set's source
        path = repo / "prompts/study" / info["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
        if info["format"] != "prompts":
            assert sums["./" + info["file"].removeprefix("raw/")] == info["sha256"], name
        formats[name] = info["format"]
    assert formats["over_refusal"] == formats["over_refusal_safe"] == "xstest"
    assert formats["safety_core"] == "harmbench" and formats["benign"] == "refusal_direction"
    assert {formats[c] for c in ("humanizing", "incomplete", "indeterminate", "safety_concerns", "unsupported")} == {
        "coconot"
    }
    assert "Fallback: target &#x27;safety_core&#x27;" in html or "Fallback: target 'safety_core'" in html
    prompts = json.loads((repo / "artifacts/prompts/summary.json").read_text())
    assert prompts["by_category"] == dict.fromkeys(provenance["sets"], 40)
    selected = json.loads((repo / "artifacts/directions/selected.json").read_text())
    assert set(provenance["sets"]) - {"benign", "over_refusal_safe"} <= set(selected)
    assert "study" in run(["dvc", "exp", "list", "--name-only"], repo).stdout

    # The judges scored against XSTest's human labels inside the pipeline: the README's numbers.
    validation = json.loads((repo / "artifacts/baseline/judge_validation.json").read_text())
    assert validation["partial_as"] == "refusal"
    accuracy = {f: {j: round(s["accuracy"], 3) for j, s in v["judges"].items()} for f, v in validation["files"].items()}
    assert accuracy == {
        "xstest_v2_completions_gpt4": {"keywords": 0.933, "substring": 0.956},
        "xstest_v2_completions_llama2new": {"keywords": 0.820, "substring": 0.809},
        "xstest_v2_completions_llama2orig": {"keywords": 0.911, "substring": 0.893},
    }
    assert "Judges against human labels" in html and "xstest_v2_completions_llama2orig" in html

    # Cross-lingual transfer of the pooled direction over PolyRefuse's 14 languages, in the directions stage.
    transfer = json.loads((repo / "artifacts/directions/crosslingual.json").read_text())
    languages = transfer["languages"]
    assert sorted(languages) == sorted(
        ["en", "de", "fr", "es", "it", "nl", "pl", "ru", "ja", "ko", "zh", "ar", "th", "yo"]
    )
    # The demo's English-only tokenizer makes long prompts of other scripts: those over max_prompt_tokens are
    # counted and left out, and a language left with too few is skipped, saying why.
    done = {c: v for c, v in languages.items() if "skipped" not in v}
    assert all("max_prompt_tokens=128" in v["skipped"] for c, v in languages.items() if c not in done)
    assert all(v["n_harmful"] + v["n_harmless"] + v["n_too_long"] == 128 for v in done.values())
    assert "en" in done and done["en"]["cos_english"] == pytest.approx(1.0, abs=1e-9)
    assert all(-1 <= v["cos_pooled"] <= 1 and -1 <= v["cos_english"] <= 1 for v in done.values())
    # English is covered best: more characters per token than any other language analysed.
    assert all(done["en"]["chars_per_token"] > v["chars_per_token"] for c, v in done.items() if c != "en")
    assert "Cross-lingual transfer" in html and "only English is meaningful here" in html
