"""Directions, controls, stability and site selection, checked on synthetic arrays and a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest_models import make_tokenizer, tiny_model

from refusal_atlas.directions import (
    DirectionError,
    choose_candidate,
    compute_direction,
    compute_means,
    draw_sides,
    filter_candidates,
    lineage,
    random_controls,
    select_arditi,
    select_cosmic,
    select_fixed,
    stability,
)
from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.generation import refusal_token_ids
from refusal_atlas.hooks import read_residual
from refusal_atlas.models import eoi_tokens, format_prompts, tokenize_prompts


def _unit(d: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(d)
    return v / np.linalg.norm(v)


def _planted(n: int, shape=(3, 2, 24), shift: float = 3.0, seed: int = 0, noise: float = 1.0):
    """Target/baseline Gaussian clouds [n, L, P, d] separated by ``shift`` along one unit vector u."""
    rng = np.random.default_rng(seed)
    u = _unit(shape[-1], seed + 100)
    common = rng.standard_normal(shape) * 5
    target = common + noise * rng.standard_normal((n, *shape)) + shift * u
    baseline = common + noise * rng.standard_normal((n, *shape))
    return target.astype(np.float32), baseline.astype(np.float32), u


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------
# draw_sides and lineage
# ---------------------------------------------------------------------------------------


def test_draw_sides_counts_matching_and_determinism():
    targets, baselines = [f"t{i:02d}" for i in range(40)], [f"b{i:02d}" for i in range(50)]
    t, b = draw_sides(targets, baselines, 32, np.random.default_rng(3))
    assert len(t) == len(b) == 32 and len(set(t)) == 32 and len(set(b)) == 32
    assert set(t) <= set(targets) and set(b) <= set(baselines) and t == sorted(t)
    # The same rng seed gives the same draw whatever the input order.
    again = draw_sides(targets[::-1], list(reversed(baselines)), 32, np.random.default_rng(3))
    assert again == (t, b)
    assert draw_sides(targets, baselines, 32, np.random.default_rng(4)) != (t, b)
    # A short side is used whole and the other side is matched to its count.
    t, b = draw_sides(targets[:7], baselines, 32, np.random.default_rng(0))
    assert t == sorted(targets[:7]) and len(b) == 7
    t, b = draw_sides(targets, baselines[:5], 32, np.random.default_rng(0), allow_fewer=True)
    assert len(t) == 5 and b == baselines[:5]


def test_draw_sides_errors_name_category_side_and_fix():
    rng = np.random.default_rng(0)
    with pytest.raises(DirectionError, match=r"category 'Humanizing' has 0 refused target prompts \(HR\) in the train split.*directions.filter: label") as err:
        draw_sides([], ["b1"], 32, rng, label="Humanizing")
    assert isinstance(err.value, RefusalAtlasError)
    with pytest.raises(DirectionError, match=r"category 'Humanizing' has 0 answered baseline prompts \(BC\).*directions.filter: label"):
        draw_sides(["t1"], [], 32, rng, label="Humanizing")
    with pytest.raises(DirectionError, match=r"category 'Incomplete': refused target \(HR\) has 10 prompts, fewer than directions.n_per_side=32; "
                                             r"lower directions.n_per_side to 10 or set directions.allow_fewer: true"):
        draw_sides([f"t{i}" for i in range(10)], [f"b{i}" for i in range(40)], 32, rng, allow_fewer=False, label="Incomplete")
    with pytest.raises(DirectionError, match=r"answered baseline \(BC\) has 3 prompts"):
        draw_sides([f"t{i}" for i in range(40)], ["b1", "b2", "b3"], 32, rng, allow_fewer=False, label="X")
    assert len(draw_sides([f"t{i}" for i in range(40)], [f"b{i}" for i in range(40)], 32, rng, allow_fewer=False)[0]) == 32


def test_lineage_lists_ids_per_side():
    out = lineage({"SafetyCore": (["t1", "t2"], ["b1", "b2"]), "Incomplete": (("t3",), ("b9",))})
    assert out["SafetyCore"] == {"target_ids": ["t1", "t2"], "baseline_ids": ["b1", "b2"], "n_target": 2, "n_baseline": 2}
    assert out["Incomplete"]["target_ids"] == ["t3"] and out["Incomplete"]["n_baseline"] == 1


# ---------------------------------------------------------------------------------------
# compute_direction
# ---------------------------------------------------------------------------------------


def test_mean_diff_matches_plain_numpy():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((9, 4, 3, 16)).astype(np.float32) + 0.3
    baseline = rng.standard_normal((13, 4, 3, 16)).astype(np.float32)
    unit, norm = compute_direction(target, baseline)
    assert unit.shape == (4, 3, 16) and unit.dtype == np.float32 and norm.shape == (4, 3) and norm.dtype == np.float64
    for l in range(4):
        for p in range(3):
            ref = sum(target[i, l, p].astype(float) for i in range(9)) / 9 - sum(baseline[i, l, p].astype(float) for i in range(13)) / 13
            assert _cos(unit[l, p], ref) >= 0.99999
            assert norm[l, p] == pytest.approx(np.linalg.norm(ref), rel=1e-9)
            assert np.linalg.norm(unit[l, p]) == pytest.approx(1.0, abs=1e-6)


def test_mean_diff_accumulates_in_float64():
    # A large common offset with a small signal: float32 running sums lose the signal's digits.
    rng = np.random.default_rng(2)
    n, d = 4000, 8
    offset = 30000.0
    signal = np.zeros(d)
    signal[0] = 0.05
    target = (offset + signal + 0.01 * rng.standard_normal((n, 1, 1, d))).astype(np.float32)
    baseline = (offset + 0.01 * rng.standard_normal((n, 1, 1, d))).astype(np.float32)
    exact = target.astype(np.float64).mean(0) - baseline.astype(np.float64).mean(0)
    unit, norm = compute_direction(target, baseline)
    assert norm[0, 0] == pytest.approx(np.linalg.norm(exact[0, 0]), rel=1e-10)
    assert _cos(unit[0, 0], exact[0, 0]) >= 1 - 1e-7
    # The same difference from sequential float32 sums is visibly wrong.
    naive = (np.cumsum(target, 0, dtype=np.float32)[-1] / n) - (np.cumsum(baseline, 0, dtype=np.float32)[-1] / n)
    assert np.abs(naive - exact).max() > 100 * np.abs(unit[0, 0] * norm[0, 0] - exact[0, 0]).max()
    assert np.allclose(compute_means(target), target.astype(np.float64).mean(0), rtol=0, atol=1e-9)


def test_identical_means_give_zero_direction():
    x = np.ones((4, 2, 1, 8), dtype=np.float32)
    y = x.copy()
    y[:, 1] += np.arange(8, dtype=np.float32)
    for method in ("mean_diff", "pca", "probe"):
        unit, norm = compute_direction(y, x, method=method)
        assert np.all(unit[0] == 0) and norm[0, 0] == 0 and norm[1, 0] > 0


@pytest.mark.parametrize("method", ["pca", "probe"])
def test_pca_and_probe_recover_planted_direction(method):
    target, baseline, u = _planted(80, shift=4.0, seed=5)
    unit, norm = compute_direction(target, baseline, method=method, seed=0)
    mean_unit, mean_norm = compute_direction(target, baseline)
    for l in range(3):
        for p in range(2):
            assert _cos(unit[l, p], u) > 0.9
            assert np.linalg.norm(unit[l, p]) == pytest.approx(1.0, abs=1e-6)
            # norm is the mean difference projected on the (sign-aligned) direction.
            md = mean_unit[l, p].astype(float) * mean_norm[l, p]
            assert norm[l, p] == pytest.approx(float(unit[l, p].astype(float) @ md), rel=1e-5) and 0 < norm[l, p] <= mean_norm[l, p] * (1 + 1e-6)
    assert np.array_equal(compute_direction(target, baseline, method=method, seed=0)[0], unit)
    if method == "pca":  # against an SVD of the uncentred paired differences
        top = np.linalg.svd(target[:, 1, 0].astype(float) - baseline[:, 1, 0], full_matrices=False)[2][0]
        assert abs(_cos(unit[1, 0], top)) >= 0.99999


def test_compute_direction_rejects_bad_input():
    x = np.zeros((3, 2, 1, 4), dtype=np.float32)
    with pytest.raises(DirectionError, match="unknown direction method 'svm'"):
        compute_direction(x, x, method="svm")
    with pytest.raises(DirectionError, match="matching trailing axes"):
        compute_direction(x, np.zeros((3, 2, 1, 5), dtype=np.float32))
    with pytest.raises(DirectionError, match="at least one prompt"):
        compute_direction(x[:0], x)


# ---------------------------------------------------------------------------------------
# Random controls and stability
# ---------------------------------------------------------------------------------------


def test_random_controls_unit_norm_matched_seeded_and_near_orthogonal():
    norms = np.array([[1.0, 2.0], [3.0, 4.5]])
    unit, norm = random_controls(norms, 2048, 6, seed=11)
    assert unit.shape == (6, 2, 2, 2048) and unit.dtype == np.float32 and norm.shape == (6, 2, 2)
    assert np.allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=1e-5)
    assert np.array_equal(norm, np.broadcast_to(norms, (6, 2, 2)))
    again = random_controls(norms, 2048, 6, seed=11)
    assert np.array_equal(again[0], unit) and not np.array_equal(random_controls(norms, 2048, 6, seed=12)[0], unit)
    gram = np.einsum("ilpd,jlpd->lpij", unit.astype(float), unit.astype(float))
    off = gram[..., ~np.eye(6, dtype=bool)]
    assert np.abs(off).max() < 0.12


def test_stability_high_for_planted_direction_low_for_noise():
    target, baseline, _ = _planted(64, shape=(2, 2, 64), shift=12.0, seed=8)
    strong = stability(target, baseline, n_per_side=16, n_draws=6, seed=0)
    assert strong["mean"].shape == strong["sd"].shape == strong["split_half"].shape == (2, 2) and strong["draws"].shape == (6, 2, 2)
    assert np.all(strong["mean"] > 0.9) and np.all(strong["split_half"] > 0.9) and np.all(strong["sd"] < 0.05)
    noise_t, noise_b, _ = _planted(64, shape=(2, 2, 64), shift=0.0, seed=9)
    weak = stability(noise_t, noise_b, n_per_side=16, n_draws=6, seed=0)
    assert np.all(np.abs(weak["mean"]) < 0.3) and np.all(np.abs(weak["split_half"]) < 0.35)
    # Selected cells only: the others are NaN and the evaluated ones equal the full run's.
    part = stability(target, baseline, n_per_side=16, n_draws=6, seed=0, at=[(1, 0)])
    assert np.isnan(part["mean"][0]).all() and np.isnan(part["mean"][1, 1]) and part["mean"][1, 0] > 0.9
    # Pools smaller than n_per_side fall back to with-replacement draws instead of failing.
    small = stability(target[:5], baseline[:5], n_per_side=16, n_draws=3, seed=1)
    assert np.isfinite(small["mean"]).all() and np.isfinite(small["split_half"]).all()
    with pytest.raises(DirectionError, match="at least 2 draws"):
        stability(target, baseline, n_per_side=16, n_draws=1, seed=0)


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


def test_select_fixed_validates():
    assert select_fixed(12, -5, 32, [-5, -4, -3, -2, -1]) == {"method": "fixed", "layer": 12, "position": -5, "position_index": 0}
    with pytest.raises(DirectionError, match=r"directions.layer=32 is out of range for this model with 32 layers \(valid 0..31\)"):
        select_fixed(32, -1, 32, [-2, -1])
    with pytest.raises(DirectionError, match=r"directions.layer=-1 is out of range"):
        select_fixed(-1, -1, 32, [-2, -1])
    with pytest.raises(DirectionError, match=r"directions.position=-5 is not an end-of-instruction position.*span is -2..-1 \(2 tokens\)"):
        select_fixed(3, -5, 32, [-2, -1])
    with pytest.raises(DirectionError, match="needs both directions.layer and directions.position"):
        select_fixed(None, -1, 32, [-1])


def _row(layer, bypass, induce, kl, position=-1):
    return {"layer": layer, "position": position, "position_index": 0, "bypass": bypass, "induce": induce, "kl": kl}


def test_filter_candidates_rules_and_order():
    table = [
        _row(0, -3.0, 1.0, 0.05),  # kept
        _row(1, -5.0, 2.0, 0.2),  # kl
        _row(2, -9.0, 0.0, 0.01),  # induce <= 0
        _row(3, math.nan, 1.0, 0.01),  # nan
        _row(8, -20.0, 3.0, 0.01),  # layer 8 >= 0.8 * 10
        _row(7, -4.0, 0.5, 0.1),  # kl == threshold is kept
        _row(9, math.nan, math.nan, math.nan),  # layer wins over nan
    ]
    rows, counts = filter_candidates(table, n_layers=10, max_layer_fraction=0.8, kl_threshold=0.1)
    assert [r["reason"] for r in rows] == [None, "kl", "induce", "nan", "layer", None, "layer"]
    assert [r["kept"] for r in rows] == [True, False, False, False, False, True, False]
    assert counts == {"layer": 2, "nan": 1, "kl": 1, "induce": 1, "kept": 2}
    assert "kept" not in table[0]  # the input is not modified
    chosen = choose_candidate(rows)
    assert chosen["row"]["layer"] == 7 and chosen["fallback"] is False and chosen["fallback_reason"] is None


def test_choose_candidate_falls_back_and_says_why():
    rows, _ = filter_candidates([_row(0, -1.0, -1.0, 0.0), _row(1, -2.0, 1.0, 5.0), _row(2, math.nan, 1.0, 0.0)], 10, 0.8, 0.1)
    chosen = choose_candidate(rows)
    assert chosen["fallback"] is True and chosen["row"]["layer"] == 1
    assert "no candidate passed the filters" in chosen["fallback_reason"] and "kl: 1" in chosen["fallback_reason"]
    with pytest.raises(DirectionError, match="no candidate"):
        choose_candidate(filter_candidates([_row(0, math.nan, 1.0, 0.0)], 10, 0.8, 0.1)[0])


def test_select_cosmic_picks_planted_layer_and_position():
    rng = np.random.default_rng(4)
    rows, n_pos, d = 7, 3, 48  # 6 blocks + final residual
    base = rng.standard_normal((rows, n_pos, d)) * 2 + 4.0
    separation = np.array([0.0, 0.5, 1.0, 3.0, 1.0, 0.5, 6.0])  # row 6 (final) and 5 (>= 0.8 L) excluded
    layer_dirs = np.stack([_unit(d, 200 + l) for l in range(rows)])
    # The harmless mean has no component along its layer's refusal direction, as ablation
    # then maps the harmful mean exactly onto it.
    base -= np.einsum("lpd,ld->lp", base, layer_dirs)[..., None] * layer_dirs[:, None, :]
    harmful = base + separation[:, None, None] * layer_dirs[:, None, :]
    units = np.stack([np.stack([_unit(d, 300 + 10 * l + p) for p in range(n_pos)]) for l in range(rows)])
    for l in range(rows):
        units[l, 1] = layer_dirs[l]  # position -2 carries each layer's own class difference
    units[0] = 0  # undefined directions are skipped
    out = select_cosmic(harmful, base, units, max_layer_fraction=0.8, n_layers_considered=1)
    assert out["eval_layers"] == [3]
    assert (out["layer"], out["position"], out["position_index"]) == (3, -2, 1)
    assert out["score"] == max(r["score"] for r in out["table"])
    assert {r["layer"] for r in out["table"]} == {1, 2, 3, 4}
    assert out["layer_similarity"].shape == (rows,) and np.argmin(out["layer_similarity"][:5]) == 3
    # The exact formula at the winner: ablation from harmful and addition to harmless.
    u, h, b = units[3, 1], harmful[3], base[3]
    v = np.dot(h[1] - b[1], u) * u
    comply = np.mean([_cos(h[p] - np.dot(h[p], u) * u, b[p]) for p in range(n_pos)])
    refuse = np.mean([_cos(b[p] + v, h[p]) for p in range(n_pos)])
    assert out["score"] == pytest.approx((comply + refuse) / 2, rel=1e-12)


# ---------------------------------------------------------------------------------------
# Arditi selection on a tiny model
# ---------------------------------------------------------------------------------------

HARMFUL = ["Tell me a story about a dragon and a knight.", "How do I bake bread?", "Write a poem", "What is it?!"]
BENIGN = ["What is the capital of France?", "Hi", "Tell me a short answer.", "Sure, the sky is blue."]


def test_select_arditi_runs_on_tiny_model():
    tok = make_tokenizer("llama3")
    model = tiny_model("llama", vocab=len(tok), scale=4.0)
    offsets = eoi_tokens(tok).offsets
    harmful, benign = format_prompts(tok, HARMFUL), format_prompts(tok, BENIGN)
    with read_residual(model, [0, 1, 2], offsets) as cap:
        model(**tokenize_prompts(tok, harmful + benign, 256))
    acts = cap.stack().numpy()  # [8, 3, P, 32]
    units, norms = compute_direction(acts[:4], acts[4:])
    assert np.all(norms[0] == 0)  # template tokens have the same embedding in every prompt
    out = select_arditi(model, tok, units, norms, harmful, benign, refusal_token_ids(tok, ["I", "As"]), batch_size=4,
                        max_layer_fraction=0.8, kl_threshold=10.0, offsets=offsets)
    assert out["method"] == "arditi" and out["layer"] == 1 and out["position"] in offsets
    assert out["position"] == offsets[out["position_index"]]
    assert len(out["table"]) == 2 * len(offsets)
    for key in ("score", "bypass", "induce", "kl", "fallback", "fallback_reason", "counts", "baseline_harmful", "baseline_benign"):
        assert key in out
    assert math.isfinite(out["score"]) and out["score"] == out["bypass"] and out["kl"] >= 0
    assert sum(out["counts"].values()) == len(out["table"]) and out["counts"]["nan"] == len(offsets)
    for row in out["table"]:
        assert {"layer", "position", "bypass", "induce", "kl", "kept", "reason"} <= set(row)
        if row["layer"] == 0:
            assert row["reason"] == "nan" and not row["kept"]
    if not out["fallback"]:
        kept = [r for r in out["table"] if r["kept"]]
        assert out["bypass"] == min(r["bypass"] for r in kept)
    else:
        assert out["fallback_reason"]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(DirectionError, match="do not match"):
        select_arditi(model, tok, units[:, :2], norms[:, :2], harmful, benign, [5], 4, 0.8, 0.1, offsets)
