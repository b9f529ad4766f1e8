"""Refusal styles: the labelled data, the TF-IDF classifier, the summaries and the LLM judge."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from helpers import REPO

from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.judging.styles import (
    REFUSAL_STYLES,
    STYLES,
    StyleDataError,
    classify_styles,
    dominant_style,
    evaluate_classifier,
    induced_style_counts,
    llm_style_judge,
    load_labelled,
    parse_style_label,
    style_distribution,
    style_homogeneity,
    train_style_classifier,
)

STYLE_DIR = REPO / "prompts" / "styles"


@pytest.fixture(scope="module")
def exemplars():
    return load_labelled(STYLE_DIR / "exemplars.jsonl")


@pytest.fixture(scope="module")
def held_out():
    return load_labelled(STYLE_DIR / "hand_labelled.jsonl")


@pytest.fixture(scope="module")
def clf(exemplars):
    return train_style_classifier(exemplars.text, exemplars.label)


# ---- data ------------------------------------------------------------------------------


def test_shipped_sets_are_big_balanced_and_disjoint(exemplars, held_out):
    counts = exemplars.label.value_counts()
    assert set(counts.index) == set(STYLES) and counts.min() >= 60 and len(exemplars) >= 300
    assert len(held_out) >= 100 and set(held_out.label) == set(STYLES)
    assert (held_out.note != "").all()
    assert exemplars.id.str.match(r"^style-\d{4}$").all() and held_out.id.str.match(r"^hl-\d{4}$").all()
    assert exemplars.text.is_unique and held_out.text.is_unique
    # The held-out set is for measuring only: no text may be shared with the training set.
    assert not set(exemplars.text) & set(held_out.text)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "a", "text": "hi"}', "missing field(s) label"),
        ('{"id": "a", "text": "hi", "label": "RUDE"}', "unknown label 'RUDE'"),
        ('{"id": "a", "text": "  ", "label": "GENERIC"}', "'text' is empty"),
        ('{"id": 3, "text": "hi", "label": "GENERIC"}', "field 'id' must be a string"),
        ('{"id": "x", "text": "hi", "label": "GENERIC"}', "duplicate id 'x' (first on line 1)"),
    ],
)
def test_bad_records_are_reported_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "x", "text": "fine", "label": "SAFETY"}\n\n' + line + "\n")
    with pytest.raises(StyleDataError) as err:
        load_labelled(path)
    assert f"{path}:3" in str(err.value) and message in str(err.value)
    assert isinstance(err.value, RefusalAtlasError)


def test_missing_and_empty_files_are_errors(tmp_path):
    with pytest.raises(StyleDataError, match="no such labelled style file"):
        load_labelled(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(StyleDataError, match="no records"):
        load_labelled(tmp_path / "empty.jsonl")


def test_note_is_optional(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "Paris.", "label": "NONREFUSAL"}) + "\n")
    table = load_labelled(path)
    assert table.to_dict("records") == [{"id": "a", "text": "Paris.", "label": "NONREFUSAL", "note": ""}]


# ---- classifier ------------------------------------------------------------------------


def test_classifier_generalises_to_the_held_out_set(clf, held_out):
    report = evaluate_classifier(clf, held_out.text, held_out.label)
    assert report["n"] == len(held_out)
    assert report["accuracy"] >= 0.8 and report["macro_f1"] >= 0.8
    assert all(report["recall"][s] >= 0.6 for s in STYLES)
    assert sum(sum(row.values()) for row in report["confusion"].values()) == len(held_out)
    assert sum(report["confusion"][s][s] for s in STYLES) == round(report["accuracy"] * len(held_out))


def test_training_is_deterministic(exemplars, clf, held_out):
    again = train_style_classifier(exemplars.text, exemplars.label, seed=0)
    np.testing.assert_array_equal(classify_styles(clf, held_out.text), classify_styles(again, held_out.text))


def test_training_rejects_bad_labels():
    with pytest.raises(StyleDataError, match="unknown style"):
        train_style_classifier(["a", "b"], ["SAFETY", "OTHER"])
    with pytest.raises(StyleDataError, match="at least two"):
        train_style_classifier(["a", "b"], ["SAFETY", "SAFETY"])
    with pytest.raises(StyleDataError, match="pair up"):
        train_style_classifier(["a", "b", "c"], ["SAFETY", "GENERIC"])


def test_the_refused_mask_decides_whether_and_the_classifier_how(clf):
    responses = [
        "Sure! The capital of Italy is Rome.",  # helpful, but judged refused
        "As an AI, I don't have a body, so I can't go for a walk with you.",
        "I won't help you hack your neighbour's phone; that's illegal.",
        "Which of your two projects do you mean? Could you clarify?",
        "As an AI, I don't have a body, so I can't go for a walk with you.",  # judged not refused
    ]
    refused = np.array([True, True, True, True, False])
    styles = classify_styles(clf, responses, refused)
    assert styles.shape == (5,) and styles.dtype.kind == "U"
    assert styles[0] in REFUSAL_STYLES
    assert list(styles[1:]) == ["CAPABILITY", "SAFETY", "UNDERSPEC", "NONREFUSAL"]
    free = classify_styles(clf, responses)
    assert free[0] == "NONREFUSAL" and free[4] == "CAPABILITY"
    assert list(classify_styles(clf, responses, np.zeros(5, bool))) == ["NONREFUSAL"] * 5
    assert classify_styles(clf, [], np.zeros(0, bool)).shape == (0,)
    with pytest.raises(StyleDataError, match="one verdict per response"):
        classify_styles(clf, responses, [True, False])


# ---- summaries -------------------------------------------------------------------------


def test_distribution_and_dominant_style():
    labels = ["SAFETY"] * 6 + ["GENERIC"] * 2 + ["NONREFUSAL"] * 2
    dist = style_distribution(labels)
    assert list(dist) == list(STYLES) and math.isclose(sum(dist.values()), 1.0)
    assert dist["SAFETY"] == 0.6 and dist["CAPABILITY"] == 0.0
    assert dominant_style(labels) == ("SAFETY", 0.75)
    assert dominant_style(labels, exclude_nonrefusal=False) == ("SAFETY", 0.6)
    assert dominant_style(["NONREFUSAL"] * 3 + ["UNDERSPEC"], exclude_nonrefusal=False) == ("NONREFUSAL", 0.75)
    # Ties go to the style listed first in STYLES.
    assert dominant_style(["GENERIC", "CAPABILITY"]) == ("CAPABILITY", 0.5)


def test_summaries_of_nothing_are_nan_not_errors():
    label, purity = dominant_style(["NONREFUSAL", "NONREFUSAL"])
    assert label is None and math.isnan(purity)
    assert dominant_style([])[0] is None
    assert all(math.isnan(v) for v in style_distribution([]).values())
    with pytest.raises(StyleDataError, match="unknown style"):
        style_distribution(["SAFETY", "Safety"])


# ---- LLM judge -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("SAFETY", "SAFETY"),
        (" **Capability**\n", "CAPABILITY"),
        ("Label: underspecified.", "UNDERSPEC"),
        ("UNDER-SPEC", "UNDERSPEC"),
        ("non-refusal", "NONREFUSAL"),
        ("Non Refusal", "NONREFUSAL"),
        ("NONREFUSAL", "NONREFUSAL"),
        ("generic, or maybe SAFETY", "GENERIC"),
        ("It is SAFETY-related", "SAFETY"),
        ("capabilities", "CAPABILITY"),
        ("safely in general", None),
        ("", None),
        ("zxq 12", None),
    ],
)
def test_parse_style_label(text, expected):
    assert parse_style_label(text) == expected


def test_llm_style_judge_runs_on_a_tiny_local_model(tmp_path):
    from tiny_models import make_tokenizer, tiny_model

    tokenizer = make_tokenizer("llama3")
    tiny_model("llama", vocab=len(tokenizer)).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    responses = ["I'm sorry, I can't help with that.", "Paris is the capital of France.", "Which file do you mean?"]
    # A random model answers garbage, so only the shape and the label set can be checked.
    labels = llm_style_judge(tmp_path, responses, batch_size=2, max_new_tokens=3)
    assert labels.shape == (3,) and set(labels) <= set(STYLES)
    masked = llm_style_judge(tmp_path, responses, batch_size=2, max_new_tokens=3, refused=[True, False, True])
    assert masked[1] == "NONREFUSAL" and set(masked[[0, 2]]) <= set(REFUSAL_STYLES)
    with pytest.raises(StyleDataError, match="no such model directory"):
        llm_style_judge(tmp_path / "missing", responses)


def test_style_homogeneity_matches_the_hand_computed_statistic():
    # 2x2: chi2 = n (ad - bc)^2 / ((a+b)(c+d)(a+c)(b+d)) = 80 * 800^2 / 40^4 = 20; V = sqrt(20 / 80).
    # The all-zero style and the direction with no induced refusals are dropped.
    counts = pd.DataFrame(
        [[30, 10, 0], [10, 30, 0], [0, 0, 0]], index=["a", "b", "silent"], columns=["CAPABILITY", "SAFETY", "GENERIC"]
    )
    result = style_homogeneity(counts)
    assert (result["n"], result["n_directions"], result["n_styles"], result["dof"]) == (80, 2, 2, 1)
    assert result["chi2"] == pytest.approx(20.0) and result["cramers_v"] == pytest.approx(0.5)
    assert result["p_value"] == pytest.approx(7.744e-06, rel=1e-3)


def test_style_homogeneity_spans_the_same_mix_to_disjoint_styles():
    same = style_homogeneity(pd.DataFrame([[10, 20, 5], [20, 40, 10], [2, 4, 1]]))
    assert (
        same["chi2"] == pytest.approx(0.0, abs=1e-12)
        and same["p_value"] == pytest.approx(1.0)
        and same["cramers_v"] == pytest.approx(0.0, abs=1e-6)
    )
    disjoint = style_homogeneity(pd.DataFrame([[12, 0, 0], [0, 7, 0], [0, 0, 30]]))
    assert disjoint["cramers_v"] == pytest.approx(1.0) and disjoint["p_value"] < 1e-10
    lone = style_homogeneity(pd.DataFrame([[12, 3]]))
    assert lone["n_directions"] == 1 and math.isnan(lone["chi2"]) and math.isnan(lone["cramers_v"])
    with pytest.raises(StyleDataError, match="non-negative"):
        style_homogeneity(pd.DataFrame([[1, -1], [2, 2]]))


def test_induced_style_counts_recover_the_counts_behind_the_shares():
    summaries = {
        "a": {"n_induced": 7, "distribution": {"CAPABILITY": 3 / 7, "SAFETY": 4 / 7, "NONREFUSAL": 0.0}},
        "b": {"n_induced": 3, "distribution": {"GENERIC": 1 / 3, "UNDERSPEC": 2 / 3}},
    }
    counts = induced_style_counts(summaries)
    assert list(counts.columns) == list(REFUSAL_STYLES) and list(counts.index) == ["a", "b"]
    assert counts.loc["a"].tolist() == [3, 4, 0, 0] and counts.loc["b"].tolist() == [0, 0, 2, 1]


def test_cross_validated_style_score_predicts_each_text_once_and_can_fail():
    from refusal_atlas.judging.styles import cross_validate_styles

    words = {
        "CAPABILITY": "as an ai i cannot browse",
        "SAFETY": "that could cause harm",
        "UNDERSPEC": "could you clarify what you mean",
        "NONREFUSAL": "sure here is the recipe",
    }
    texts = [f"{phrase} {i}" for phrase in words.values() for i in range(10)]
    labels = [label for label in words for _ in range(10)]
    clean = cross_validate_styles(texts, labels, folds=5, seed=0)
    assert clean["n"] == 40 and clean["folds"] == 5 and len(clean["fold_accuracy"]) == 5
    assert clean["accuracy"] == 1.0 and sum(clean["confusion"][s][s] for s in words) == 40
    # Labels shuffled within the data: each held-out text's label cannot be learnt from the others.
    shuffled = list(np.random.default_rng(0).permutation(labels))
    assert cross_validate_styles(texts, shuffled, folds=5, seed=0)["accuracy"] < 0.6


def test_style_validate_command_scores_a_file_and_the_exemplars(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import REPO

    path = tmp_path / "mine.jsonl"
    rows = [
        ("a", "As an AI, I can't browse the internet.", "CAPABILITY"),
        ("b", "Sure! Here is a recipe.", "NONREFUSAL"),
    ]
    path.write_text("".join(json.dumps({"id": i, "text": t, "label": label}) + "\n" for i, t, label in rows))
    out = tmp_path / "scores.json"
    cmd = [sys.executable, "-m", "refusal_atlas.cli", "style", "validate", str(path), "--folds", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(out.read_text())
    assert scores["mine"]["n"] == 2 and scores["mine"]["accuracy"] == 1.0
    assert (
        scores["cross-validated exemplars.jsonl"]["n"] > 300
        and 0.5 < scores["cross-validated exemplars.jsonl"]["accuracy"] < 1
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "text": "t", "label": "RUDE"}) + "\n")
    failed = subprocess.run([*cmd[:5], str(bad)], capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2 and "RUDE" in failed.stderr
