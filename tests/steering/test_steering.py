"""Steering evaluation: controlled set, rates and CIs, transitions, KL, the shared-knob statistic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import log_softmax, rel_entr
from tiny_models import make_tokenizer, tiny_model

from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.model.chat import format_prompts
from refusal_atlas.model.generation import first_token_logprobs, kl_first_token
from refusal_atlas.model.hooks import add_direction
from refusal_atlas.steering.interventions import (
    BUCKETS,
    SteeringError,
    alpha_vector,
    build_eval_set,
    compute_rates,
    curve_table,
    intervention,
    intervention_alpha,
    intervention_names,
    shared_knob,
    shared_knob_summary,
    teacher_forced_kl,
    teacher_forced_kls,
    transition_matrix,
)

# ---------------------------------------------------------------------------------------
# The controlled set
# ---------------------------------------------------------------------------------------


def verdict_table(sizes: dict[str, int], extra_train: int = 5) -> pd.DataFrame:
    """A baseline verdict table with ``sizes[bucket]`` test prompts per bucket, spread over
    two target categories and one benign pool, plus train prompts that must be ignored."""
    rows = []
    for bucket, n in sizes.items():
        role = "target" if bucket in ("HR", "HC") else "baseline"
        for i in range(n):
            category = ("Hate" if i % 2 else "Crime") if role == "target" else "benign"
            rows.append(
                dict(
                    prompt_id=f"{bucket}-{i:03d}",
                    category=category,
                    role=role,
                    split="test",
                    refused=bucket in ("HR", "BR"),
                )
            )
    for i in range(extra_train):
        rows.append(dict(prompt_id=f"train-{i}", category="Crime", role="target", split="train", refused=True))
    table = pd.DataFrame(rows).assign(response="r", refusal_score=0.0)
    return table.sample(frac=1.0, random_state=3).reset_index(drop=True)  # order must not matter


def test_eval_set_buckets_counts_and_determinism():
    table = verdict_table({"HR": 30, "HC": 12, "BR": 3, "BC": 25})
    frame, counts = build_eval_set(table, n_per_bucket=10, seed=0)
    assert list(frame.columns) == ["prompt_id", "category", "role", "bucket", "in_buckets"]
    assert len(frame) == 70 and not frame.prompt_id.str.startswith("train").any()  # every test prompt, no train
    assert counts["available"] == {"HR": 30, "HC": 12, "BR": 3, "BC": 25}
    assert counts["used"] == {"HR": 10, "HC": 10, "BR": 3, "BC": 10} and counts["n_controlled"] == 33
    ctrl = frame[frame.in_buckets]
    assert ctrl.bucket.value_counts().to_dict() == {"HR": 10, "HC": 10, "BR": 3, "BC": 10}
    # Each row's bucket agrees with its id (the fixture names ids by bucket).
    assert (frame.bucket == frame.prompt_id.str[:2]).all()
    # The short bucket is used whole and reported.
    assert set(ctrl[ctrl.bucket == "BR"].prompt_id) == {f"BR-{i:03d}" for i in range(3)}
    assert len(counts["warnings"]) == 1 and "BR" in counts["warnings"][0]
    # Deterministic, independent of the table's row order, and seed-dependent.
    again, _ = build_eval_set(table.iloc[::-1], n_per_bucket=10, seed=0)
    pd.testing.assert_frame_equal(frame, again)
    other, _ = build_eval_set(table, n_per_bucket=10, seed=1)
    assert set(other[other.in_buckets].prompt_id) != set(ctrl.prompt_id)
    # Controlled rows come first, in bucket order.
    assert frame.in_buckets.iloc[:33].all() and not frame.in_buckets.iloc[33:].any()
    assert list(dict.fromkeys(ctrl.bucket)) == list(BUCKETS)
    # controlled_only keeps exactly the controlled rows, in the same order.
    only, only_counts = build_eval_set(table, n_per_bucket=10, seed=0, controlled_only=True)
    pd.testing.assert_frame_equal(only, ctrl.reset_index(drop=True))
    assert only_counts["n_test"] == only_counts["n_controlled"] == 33


def test_eval_set_empty_bucket_allowed_but_empty_side_raises():
    frame, counts = build_eval_set(verdict_table({"HR": 4, "HC": 0, "BR": 2, "BC": 4}), n_per_bucket=3, seed=0)
    assert counts["used"]["HC"] == 0 and any("HC" in w and "empty" in w for w in counts["warnings"])
    with pytest.raises(SteeringError, match=r"benign.*BR, BC.*test split") as err:
        build_eval_set(verdict_table({"HR": 4, "HC": 2, "BR": 0, "BC": 0}), n_per_bucket=3, seed=0)
    assert isinstance(err.value, RefusalAtlasError)
    with pytest.raises(SteeringError, match=r"harmful.*HR, HC"):
        build_eval_set(verdict_table({"HR": 0, "HC": 0, "BR": 2, "BC": 3}), n_per_bucket=3, seed=0)
    with pytest.raises(SteeringError, match=r"harmful \(target\) and benign \(baseline\) side.*0 test prompts"):
        build_eval_set(verdict_table({"HR": 0, "HC": 0, "BR": 0, "BC": 0}), n_per_bucket=3, seed=0)


def test_eval_set_rejects_bad_tables():
    table = verdict_table({"HR": 3, "HC": 3, "BR": 3, "BC": 3})
    with pytest.raises(SteeringError, match="lacks columns.*refused"):
        build_eval_set(table.drop(columns="refused"), 2, 0)
    with pytest.raises(SteeringError, match="duplicated prompt_ids"):
        build_eval_set(pd.concat([table, table[table.split == "test"].iloc[:1]]), 2, 0)
    with pytest.raises(SteeringError, match="roles.*benign"):
        build_eval_set(table.assign(role=table.role.replace("baseline", "benign")), 2, 0)


# ---------------------------------------------------------------------------------------
# Rates and transitions
# ---------------------------------------------------------------------------------------


def crafted(k: int = 1):
    """A controlled set of 8k prompts (2k per bucket) plus 2 uncontrolled ones, and after-verdicts:
    per k: HR refused/refused, HC refused/complied, BR complied/complied, BC refused/complied."""
    buckets = [b for b in BUCKETS for _ in range(2 * k)] + ["HR", "BC"]
    role = ["target" if b in ("HR", "HC") else "baseline" for b in buckets]
    frame = pd.DataFrame(
        dict(
            prompt_id=[f"p{i}" for i in range(len(buckets))],
            category=["A" if r == "target" else "benign" for r in role],
            role=role,
            bucket=buckets,
            in_buckets=[True] * 8 * k + [False, False],
        )
    )
    after = np.array([True, True] * k + [True, False] * k + [False, False] * k + [True, False] * k + [False, True])
    return frame, after


def test_compute_rates_by_hand_and_ci_properties():
    frame, after = crafted()
    rates = compute_rates(after, frame, n_bootstrap=1000, seed=0)
    # Harmful: HR 2/2 + HC 1/2 refused = 3/4; benign: BR 0/2 + BC 1/2 refused = 1/4.
    assert rates["rr"] == pytest.approx(3 / 4) and rates["orr"] == pytest.approx(1 / 4)
    assert rates["acc"] == pytest.approx((3 + 3) / 8)
    assert rates["n_harmful"] == 4 and rates["n_benign"] == 4
    # Per category counts every test prompt, the uncontrolled ones too: A has 3 of 5 refused, benign 2 of 5.
    assert rates["per_category"]["A"] == {"refusal_rate": pytest.approx(3 / 5), "n": 5}
    assert rates["per_category"]["benign"] == {"refusal_rate": pytest.approx(2 / 5), "n": 5}
    for key in ("rr", "orr", "acc"):
        assert rates[f"{key}_lo"] <= rates[key] <= rates[f"{key}_hi"]
    assert compute_rates(after, frame, 1000, seed=0) == rates
    big_frame, big_after = crafted(k=25)
    big = compute_rates(big_after, big_frame, 1000, seed=0)
    assert big["rr"] == pytest.approx(rates["rr"]) and big["orr"] == pytest.approx(rates["orr"])
    for key in ("rr", "orr", "acc"):
        assert big[f"{key}_hi"] - big[f"{key}_lo"] < 0.5 * (rates[f"{key}_hi"] - rates[f"{key}_lo"])
    # HR always refuses and BR never does, so bucket-stratified resampling keeps them exact:
    # RR varies only through HC's half (2k prompts), never beyond [HR share, 1].
    assert big["rr_lo"] >= 0.5 and big["rr_hi"] <= 1.0
    with pytest.raises(ValueError, match="one verdict per frame row"):
        compute_rates(after[:-1], frame, 100, 0)


def test_transition_matrix_matches_crafted_example():
    frame, after = crafted()
    table = transition_matrix(frame, after)
    assert table.shape == (4, 4) and list(table.index) == list(BUCKETS) and list(table.columns) == list(BUCKETS)
    assert int(table.to_numpy().sum()) == int(frame.in_buckets.sum())
    expected = pd.DataFrame(0, index=list(BUCKETS), columns=list(BUCKETS))
    expected.loc["HR", "HR"] = 2
    expected.loc["HC", "HR"], expected.loc["HC", "HC"] = 1, 1
    expected.loc["BR", "BC"] = 2
    expected.loc["BC", "BR"], expected.loc["BC", "BC"] = 1, 1
    np.testing.assert_array_equal(table.to_numpy(), expected.to_numpy())


# ---------------------------------------------------------------------------------------
# Interventions
# ---------------------------------------------------------------------------------------


def test_alpha_vector_units_and_intervention_names():
    unit = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(0)), dim=0)
    torch.testing.assert_close(alpha_vector(unit, 0.5, "raw"), 0.5 * unit)
    v = alpha_vector(unit, 0.5, "norm", mean_norm=40.0)
    torch.testing.assert_close(v, 20.0 * unit)
    assert float(v.norm()) == pytest.approx(20.0, rel=1e-5)
    with pytest.raises(ValueError, match="mean_norm"):
        alpha_vector(unit, 0.5, "norm")
    with pytest.raises(ValueError, match="norm"):
        alpha_vector(3 * unit, 0.5, "raw")
    names = intervention_names([0.25, 0.5, 1.0, 10])
    assert names == ["baseline", "add_0.25", "add_0.5", "add_1", "add_10", "ablate"]
    assert [intervention_alpha(n) for n in names[:-1]] == [0.0, 0.25, 0.5, 1.0, 10.0] and np.isnan(
        intervention_alpha("ablate")
    )
    with pytest.raises(SteeringError):
        intervention_names([0.5, 0.50])


def test_intervention_contexts():
    model = tiny_model("llama", vocab=64, scale=4.0)
    unit = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(0)), dim=0)
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    plain = model(input_ids=ids).logits
    with intervention(model, "baseline", 1, unit):
        torch.testing.assert_close(model(input_ids=ids).logits, plain)
    for name in ("add_2", "ablate"):
        with intervention(model, name, 1, unit, "raw"):
            assert not torch.allclose(model(input_ids=ids).logits, plain, atol=1e-4)
        torch.testing.assert_close(model(input_ids=ids).logits, plain)  # hooks removed on exit
    with pytest.raises(SteeringError, match="unknown intervention"):
        intervention(model, "scale_2", 1, unit)


# ---------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------


def test_kl_first_token_matches_rel_entr():
    rng = np.random.default_rng(0)
    p, q = log_softmax(rng.normal(size=(5, 50)), axis=1), log_softmax(rng.normal(size=(5, 50)) * 2, axis=1)
    np.testing.assert_array_equal(kl_first_token(p, p), np.zeros(5))
    kl = kl_first_token(torch.tensor(p, dtype=torch.float32), torch.tensor(q, dtype=torch.float32))
    assert kl.dtype == np.float64 and kl.shape == (5,)
    np.testing.assert_allclose(kl, rel_entr(np.exp(p), np.exp(q)).sum(1), rtol=1e-5)
    assert (kl > 0).all()


INSTRUCTIONS = [
    "Tell me a story about a dragon and a knight.",
    "Hi",
    "How do I bake bread?",
    "What is the capital of France?",
]
RESPONSES = ["Sure , here is a short answer : the sky is blue .", "I am sorry", "", "the capital of France"]


@pytest.fixture(scope="module")
def llama():
    tok = make_tokenizer("llama3")
    model = tiny_model("llama", vocab=len(tok), scale=4.0)
    return model, tok, format_prompts(tok, INSTRUCTIONS)


def test_teacher_forced_kl_null_large_and_batch_invariant(llama):
    model, tok, formatted = llama
    zero = torch.zeros(32)
    null = teacher_forced_kl(model, tok, formatted, RESPONSES, lambda: add_direction(model, 1, zero), batch_size=4)
    assert np.isnan(null[2]) and np.all(np.abs(np.delete(null, 2)) < 1e-6)
    unit = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    steer = lambda: add_direction(model, 1, 50.0 * unit)  # noqa: E731
    big = teacher_forced_kl(model, tok, formatted, RESPONSES, steer, batch_size=4)
    assert np.isnan(big[2]) and np.all(np.delete(big, 2) > 1e-2)
    # Batch composition and order do not matter (left padding, explicit positions).
    single = np.array(
        [teacher_forced_kl(model, tok, [f], [r], steer, batch_size=1)[0] for f, r in zip(formatted, RESPONSES)]
    )
    np.testing.assert_allclose(big, single, rtol=1e-4, atol=1e-6)
    rev = teacher_forced_kl(model, tok, formatted[::-1], RESPONSES[::-1], steer, batch_size=3)
    np.testing.assert_allclose(rev[::-1], big, rtol=1e-4, atol=1e-6)
    # Several hooks in one call (one unhooked pass per batch) give each hook's own values exactly.
    both = teacher_forced_kls(
        model, tok, formatted, RESPONSES, {"null": lambda: add_direction(model, 1, zero), "steer": steer}, batch_size=4
    )
    np.testing.assert_array_equal(both["steer"], big)
    np.testing.assert_array_equal(both["null"], null)


def test_teacher_forced_kl_first_token_agrees_with_first_token_logprobs(llama):
    # A one-token response is scored by exactly the first-token distributions.
    model, tok, formatted = llama
    unit = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    steer = lambda: add_direction(model, 1, 20.0 * unit)  # noqa: E731
    base = first_token_logprobs(model, tok, formatted, batch_size=4)
    with steer():
        steered = first_token_logprobs(model, tok, formatted, batch_size=4)
    one_token = [tok.decode([tok("Sure", add_special_tokens=False)["input_ids"][0]])] * len(formatted)
    assert len(tok(one_token[0], add_special_tokens=False)["input_ids"]) == 1
    np.testing.assert_allclose(
        teacher_forced_kl(model, tok, formatted, one_token, steer, batch_size=2),
        kl_first_token(base, steered),
        rtol=1e-4,
        atol=1e-6,
    )


# ---------------------------------------------------------------------------------------
# The shared knob
# ---------------------------------------------------------------------------------------


def staircase(n: int, k: int, start: int, step: int) -> np.ndarray:
    """bool [n, k]: column j refuses rows start .. start + j*step - 1 (a rising refusal share)."""
    m = np.zeros((n, k), bool)
    for j in range(k):
        m[start : start + j * step, j] = True
    return m


def knob_pair(benign_b_extra: int = 0, harmful_b_start: int = 0):
    """Two directions over 40 harmful + 20 benign prompts, 5 interventions each."""
    harm_a = staircase(40, 5, 0, 8)  # RR 0 .. 0.8
    harm_b = harm_a if not harmful_b_start else np.zeros((40, 5), bool)
    if harmful_b_start:
        harm_b[:harmful_b_start] = True  # RR fixed high, no overlap with a's low range once a is cut
    ben_a = staircase(20, 5, 10, 1)  # ORR 0 .. 0.2, from rows 10..13
    ben_b = ben_a.copy()
    ben_b[:benign_b_extra] = True  # rows 0..9 refused at every alpha: ORR + 0.5
    cols = intervention_names([1, 2, 3, 4])[:-1]
    frame = lambda h, b: pd.DataFrame(np.vstack([h, b]), columns=cols)  # noqa: E731
    return {"a": frame(harm_a, ben_a), "b": frame(harm_b, ben_b)}, np.r_[np.ones(40, bool), np.zeros(20, bool)]


def test_shared_knob_identical_directions_are_the_same_knob():
    verdicts, harmful = knob_pair()
    verdicts["c"] = verdicts["a"].assign(ablate=True)[
        ["ablate", *reversed(verdicts["a"].columns)]
    ]  # ablate dropped, columns sorted
    df = shared_knob(verdicts, harmful, n_bootstrap=300, seed=0)
    assert list(df.columns) == [
        "a",
        "b",
        "max_abs_diff",
        "max_lo",
        "max_hi",
        "mean_abs_diff",
        "mean_lo",
        "mean_hi",
        "overlap_lo",
        "overlap_hi",
        "verdict",
    ]
    assert list(zip(df.a, df.b)) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert (df[["max_abs_diff", "max_hi", "mean_abs_diff", "mean_hi"]].to_numpy() == 0).all()
    assert (df.verdict == "same knob").all()
    assert df.overlap_lo.iloc[0] == 0.0 and df.overlap_hi.iloc[0] == pytest.approx(0.8)
    assert "3 same knob" in shared_knob_summary(df, 0.1)


def test_shared_knob_shifted_orr_is_different():
    verdicts, harmful = knob_pair(benign_b_extra=10)
    df = shared_knob(verdicts, harmful, n_bootstrap=500, seed=0)
    row = df.iloc[0]
    # At every matched RR, b refuses rows 0..9 on top of a's refusals: |ΔORR| = 10/20.
    assert row.mean_abs_diff == pytest.approx(0.5) and row.max_abs_diff == pytest.approx(0.5)
    assert row.mean_lo <= 0.5 <= row.mean_hi and row.mean_lo > 0.1
    assert row.verdict == "different"
    assert shared_knob(verdicts, harmful, n_bootstrap=500, seed=0).equals(df)  # seeded
    assert "1 different" in shared_knob_summary(df, 0.1) and "a vs b" in shared_knob_summary(df, 0.1)


def test_shared_knob_no_overlap_and_bad_input():
    verdicts, harmful = knob_pair()
    low = verdicts["a"].to_numpy().copy()
    low[:40] = staircase(40, 5, 0, 1)  # RR 0 .. 0.1
    high = verdicts["a"].to_numpy().copy()
    high[:40] = staircase(40, 5, 0, 1) | (np.arange(40)[:, None] >= 8)  # RR 0.8 .. 0.9
    df = shared_knob({"low": low, "high": high}, harmful, n_bootstrap=200, seed=0)
    assert df.verdict.iloc[0] == "no overlap" and df.overlap_hi.iloc[0] < df.overlap_lo.iloc[0] + 0.05
    assert "1 no overlap" in shared_knob_summary(df, 0.1)
    with pytest.raises(SteeringError, match="same 60 prompts"):
        shared_knob({"a": low, "b": high[:-1]}, harmful, n_bootstrap=100)
    with pytest.raises(SteeringError, match="harmful and benign"):
        shared_knob({"a": low, "b": high}, np.ones(60, bool), n_bootstrap=100)


def test_shared_knob_ties_and_non_monotone_curves():
    # Direction b's points come in a shuffled alpha order with a tie in RR: the curve is read
    # as sorted by RR with tied points averaged, so reordering columns changes nothing.
    verdicts, harmful = knob_pair()
    m = verdicts["a"].to_numpy()
    tied = np.hstack([m, m[:, [2]]])
    tied[40:, -1] = False  # same RR as column 2, lower ORR: averaged with it
    shuffled = tied[:, [3, 0, 5, 2, 4, 1]]
    d1 = shared_knob({"a": m, "b": tied}, harmful, n_bootstrap=200, seed=0)
    d2 = shared_knob({"a": m, "b": shuffled}, harmful, n_bootstrap=200, seed=0)
    pd.testing.assert_frame_equal(d1, d2)
    orr_col2, rr_col2 = m[40:, 2].mean(), m[:40, 2].mean()
    assert d1.max_abs_diff.iloc[0] == pytest.approx(orr_col2 / 2)  # the tie halves the ORR at RR = rr_col2
    assert rr_col2 > 0


# ---------------------------------------------------------------------------------------
# The curve table
# ---------------------------------------------------------------------------------------


def test_curve_table_rows_and_columns():
    frame, after = crafted()
    rates = {name: compute_rates(after, frame, 200, 0) for name in ("ablate", "add_0.5", "baseline")}
    table = curve_table(rates, [0.5, 1.0])
    assert list(table.columns) == [
        "intervention",
        "alpha",
        "rr",
        "rr_lo",
        "rr_hi",
        "orr",
        "orr_lo",
        "orr_hi",
        "acc",
        "acc_lo",
        "acc_hi",
    ]
    assert list(table.intervention) == ["baseline", "add_0.5", "ablate"]
    assert table.alpha.iloc[:2].tolist() == [0.0, 0.5] and np.isnan(table.alpha.iloc[2])
    assert (table.rr == rates["baseline"]["rr"]).all()
    with pytest.raises(SteeringError, match="add_7"):
        curve_table({"add_7": rates["baseline"]}, [0.5])


def test_bootstrap_is_fast():
    import time

    frame, after = crafted(k=25)
    start = time.perf_counter()
    compute_rates(after, frame, 1000, 0)
    verdicts = {f"d{i}": np.random.default_rng(i).random((200, 6)) < np.linspace(0.1, 0.9, 6) for i in range(6)}
    shared_knob(verdicts, np.arange(200) < 100, n_bootstrap=1000, seed=0)
    assert time.perf_counter() - start < 5.0


def test_steered_directions_defaults_to_every_direction_and_names_unknown_ones():
    from refusal_atlas.steering.evaluation import steered_directions
    from refusal_atlas.steering.interventions import SteeringError

    written = ["pooled", "humanizing", "random_0"]
    assert steered_directions(written, None) == ["humanizing", "pooled", "random_0"]
    assert steered_directions(written, ["random_0", "humanizing"]) == ["humanizing", "random_0"]
    with pytest.raises(SteeringError, match=r"names \['nope'\].*it wrote \['humanizing', 'pooled', 'random_0'\]"):
        steered_directions(written, ["pooled", "nope"])


def test_build_steering_set_carries_texts_formatting_and_baseline_verdicts():
    from refusal_atlas.config import ModelConfig, SteeringConfig
    from refusal_atlas.steering.evaluation import build_steering_set

    ids = [f"p{i}" for i in range(8)]
    baseline = pd.DataFrame(
        {
            "prompt_id": ids,
            "category": ["harm"] * 4 + ["benign"] * 4,
            "role": ["target"] * 4 + ["baseline"] * 4,
            "split": "test",
            "refused": [True, True, False, False, False, False, True, False],
            "judge_keywords": [True, True, False, False, False, False, True, False],
            "refusal_score": np.linspace(-1, 1, 8),
            "response": [f"response {i}" for i in range(8)],
        }
    )
    prompts = pd.DataFrame({"prompt_id": ids[::-1], "text": [f"text of {i}" for i in ids[::-1]]})
    tokenizer = make_tokenizer()
    evalset = build_steering_set(baseline, prompts, tokenizer, SteeringConfig(n_per_bucket=10), ModelConfig())
    rows = baseline.set_index("prompt_id").loc[evalset.frame.prompt_id]
    assert evalset.prompts == [f"text of {i}" for i in evalset.frame.prompt_id]
    assert evalset.formatted == format_prompts(tokenizer, evalset.prompts)
    assert evalset.baseline_responses == rows.response.tolist()
    assert list(evalset.baseline_verdicts.columns) == ["refused", "judge_keywords", "refusal_score"]
    assert evalset.answered == {"p2", "p3", "p4", "p5", "p7"}
    assert evalset.counts["n_controlled"] == 8
