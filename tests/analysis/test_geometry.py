"""Geometry on synthetic directions planted at known angles: each analysis must recover the plant."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from refusal_atlas.analysis import geometry as geo
from refusal_atlas.errors import RefusalAtlasError

D = 64


def planted_units(gram: np.ndarray, d: int = D, seed: int = 0) -> np.ndarray:
    """Unit vectors [k, d] whose Gram matrix is exactly ``gram`` (PSD, unit diagonal).

    The eigen-factorisation (rather than Cholesky) also handles singular Grams, such as
    two categories planted at cosine 1.0.
    """
    lam, vec = np.linalg.eigh(gram)
    assert lam.min() > -1e-9, f"planted Gram is not positive semi-definite: eigenvalues {lam}"
    coords = vec * np.sqrt(np.clip(lam, 0.0, None))  # [k, k] with coords @ coords.T = gram
    basis = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, gram.shape[0])))[0]  # [d, k] orthonormal
    return coords @ basis.T


def resample_cloud(
    units: np.ndarray, names: list[str], n_draws: int = 10, sigma: float = 0.02, seed: int = 1
) -> dict[str, np.ndarray]:
    """Per-category resample directions: each planted unit plus isotropic noise, renormalised.

    sigma = 0.02 per coordinate in d = 64 gives draw-to-draw cosines near 0.97, the
    study's within-category stability.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, u in zip(names, units):
        draws = u + sigma * rng.standard_normal((n_draws, u.size))
        out[name] = draws / np.linalg.norm(draws, axis=1, keepdims=True)
    return out


def two_cluster_gram(inner: float = 0.8, across: float = 0.1) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Six directions: {A, B, C} and {D, E, F} at cosine ``inner`` within, ``across`` between."""
    truth = np.array([0, 0, 0, 1, 1, 1])
    gram = np.where(truth[:, None] == truth[None, :], inner, across)
    np.fill_diagonal(gram, 1.0)
    return gram, list("ABCDEF"), truth


def test_cosine_matrix_recovers_planted_angles_from_resample_means():
    gram, names, _ = two_cluster_gram(across=-0.1)
    gram[0, 3] = gram[3, 0] = -0.3  # one negative pair, as Incomplete–OverRefusal is in the study
    units = planted_units(gram)
    np.testing.assert_allclose(geo.cosine_matrix(units, names).to_numpy(), gram, atol=1e-10)
    # Averaging 30 noisy draws leaves ~0.005 of noise on each cosine, well inside the 0.02 bound.
    cloud = resample_cloud(units, names, n_draws=30)
    means = np.stack([cloud[n].mean(axis=0) for n in names])
    cos = geo.cosine_matrix(means, names)
    assert list(cos.index) == names and list(cos.columns) == names
    np.testing.assert_allclose(cos.to_numpy(), gram, atol=0.02)
    np.testing.assert_allclose(np.diag(cos), 1.0)
    ext = geo.extreme_pairs(cos)
    assert ext["min"][:2] == ("A", "D") and ext["min"][2] == pytest.approx(-0.3, abs=0.02)


def test_cosine_matrix_rejects_mismatched_names_and_zero_vectors():
    with pytest.raises(RefusalAtlasError, match="len\\(names\\)"):
        geo.cosine_matrix(np.ones((3, 4)), ["a", "b"])
    with pytest.raises(RefusalAtlasError, match="zero-norm"):
        geo.cosine_matrix(np.zeros((2, 4)), ["a", "b"])


def test_offdiag_mean_per_layer_matches_planted_cosine_per_layer():
    planted = [0.0, 0.25, 0.5, 0.9]
    per_layer = []
    for c in planted:
        gram = np.full((4, 4), c)
        np.fill_diagonal(gram, 1.0)
        per_layer.append(planted_units(gram) * 3.0)  # scaled: the function must normalise
    units = np.stack(per_layer, axis=1)  # [k, L, d]
    np.testing.assert_allclose(geo.offdiag_mean_per_layer(units), planted, atol=1e-10)
    with_positions = np.stack([units, units[:, ::-1]], axis=2)  # [k, L, P=2, d]
    np.testing.assert_allclose(geo.offdiag_mean_per_layer(with_positions, position=1), planted[::-1], atol=1e-10)
    assert geo.offdiag_mean_per_layer(with_positions).shape == (4, 2)


def test_distinctness_small_p_for_distinct_pair_large_p_for_identical_pair():
    # X and Y planted at cosine 0.3; Z is the very same direction as X.
    gram = np.array([[1.0, 0.3, 1.0], [0.3, 1.0, 0.3], [1.0, 0.3, 1.0]])
    cloud = resample_cloud(planted_units(gram), ["X", "Y", "Z"], n_draws=10)
    res = geo.distinctness_test(cloud, n_permutations=1000, seed=0)
    p = res["p_pair"]
    assert p.loc["X", "Y"] == pytest.approx(1 / 1001) and p.loc["Y", "Z"] == pytest.approx(1 / 1001)
    assert p.loc["X", "Z"] > 0.05
    assert p.loc["X", "Y"] == p.loc["Y", "X"] and np.isnan(p.loc["X", "X"])
    assert res["max_pair_p"] == p.loc["X", "Z"] and not res["exact_pairs"]
    assert res["overall_p"] < 0.01
    # Within-draw stability sits where the study reports it, and between-means recover the plant.
    assert ((res["within_mean"] > 0.95) & (res["within_mean"] < 0.99)).all()
    assert res["between_mean"].loc["X", "Y"] == pytest.approx(0.3 * res["within_mean"].mean(), abs=0.03)
    assert res["statistic_pair"].loc["X", "Y"] > 0.6 and abs(res["statistic_pair"].loc["X", "Z"]) < 0.01
    assert (res["p_pair_bonferroni"].loc["X", "Y"]) == pytest.approx(3 / 1001)


def test_distinctness_overall_null_is_not_rejected_when_all_categories_share_one_direction():
    gram = np.ones((4, 4))
    cloud = resample_cloud(planted_units(gram), list("abcd"), n_draws=8, seed=5)
    res = geo.distinctness_test(cloud, n_permutations=500, seed=3)
    assert res["overall_p"] > 0.05
    assert res["overall_within_mean"] == pytest.approx(res["overall_between_mean"], abs=0.01)


def test_distinctness_enumerates_splits_exactly_when_draws_are_few():
    gram = np.array([[1.0, 0.3], [0.3, 1.0]])
    cloud = resample_cloud(planted_units(gram), ["a", "b"], n_draws=3)
    res = geo.distinctness_test(cloud, n_permutations=1000)
    # C(6, 3) = 20 splits; the observed one and its mirror give the same statistic.
    assert res["exact_pairs"] and res["p_pair"].loc["a", "b"] == pytest.approx(2 / 20)
    with pytest.raises(RefusalAtlasError, match=">= 2 draws"):
        geo.distinctness_test({"a": cloud["a"][:1], "b": cloud["b"]})


def test_distinctness_realistic_size_runs_fast():
    import time

    rng = np.random.default_rng(0)
    resamples = {f"c{i}": rng.standard_normal((10, 4096)) for i in range(13)}
    start = time.perf_counter()
    res = geo.distinctness_test(resamples, n_permutations=1000, seed=0)
    assert time.perf_counter() - start < 15.0
    assert res["p_pair"].shape == (13, 13) and 0 < res["overall_p"] <= 1


def test_clustering_recovers_two_planted_clusters():
    gram, names, truth = two_cluster_gram()
    cloud = resample_cloud(planted_units(gram), names)
    cos = geo.cosine_matrix(np.stack([cloud[n].mean(axis=0) for n in names]), names)
    res = geo.cluster_directions(cos, max_k=6)
    assert list(res["silhouette"].index) == [2, 3, 4, 5]
    for method in ("average", "complete"):
        assert res["best_k"][method] == 2
        assert res["best_silhouette"][method] > 0.5
        assert res["linkage"][method].shape == (5, 4)
        labels = res["labels"][method][2]
        assert list(labels.index) == names and adjusted_rand_score(truth, labels) == 1.0


def test_mds_stress_is_small_for_planar_structure_and_bounded_otherwise():
    # Points in a plane, written as "cosines" 1 − distance: a 2-D embedding can be exact.
    pts = np.random.default_rng(2).uniform(0, 0.6, size=(8, 2))
    dist = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    names = [f"p{i}" for i in range(8)]
    res = geo.mds_embedding(pd.DataFrame(1.0 - dist, index=names, columns=names), seed=0)
    assert set(res) == {2, 3}
    assert res[2]["coords"].shape == (8, 2) and list(res[2]["coords"].index) == names
    assert res[2]["stress"] < 0.02 and res[3]["stress"] < 0.02
    assert geo.kruskal_stress(dist, pts) == pytest.approx(0.0, abs=1e-12)
    # Twelve random directions in 64-D do not fit in 2-D: stress is clearly positive, still within [0, 1].
    units = np.random.default_rng(3).standard_normal((12, D))
    rand = geo.mds_embedding(geo.cosine_matrix(units, [str(i) for i in range(12)]), seed=0)
    assert 0.05 < rand[2]["stress"] <= 1.0 and 0.0 < rand[3]["stress"] < rand[2]["stress"]
    again = geo.mds_embedding(geo.cosine_matrix(units, [str(i) for i in range(12)]), dims=(2,), seed=0)
    np.testing.assert_array_equal(again[2]["coords"].to_numpy(), rand[2]["coords"].to_numpy())


def test_principal_angles_zero_for_identical_and_ninety_for_orthogonal_subspaces():
    rng = np.random.default_rng(4)
    basis = np.linalg.qr(rng.standard_normal((D, 6)))[0]
    span_1, span_2 = basis[:, :3], basis[:, 3:]
    diffs = {
        "a": rng.standard_normal((40, 3)) @ span_1.T,
        "b": rng.standard_normal((30, 3)) @ span_1.T,  # same subspace, different prompts
        "c": rng.standard_normal((40, 3)) @ span_2.T,  # orthogonal subspace
    }
    df = geo.principal_angles(diffs, top_k=3)
    assert len(df) == 9 and set(df.columns) == {"a", "b", "min_angle_deg", "mean_cos2", "n_angles"}
    assert set(df["n_angles"]) == {3}
    m = df.pivot(index="a", columns="b", values="min_angle_deg")
    c2 = df.pivot(index="a", columns="b", values="mean_cos2")
    assert m.loc["a", "b"] < 1e-3 and c2.loc["a", "b"] == pytest.approx(1.0, abs=1e-6)
    assert m.loc["a", "c"] == pytest.approx(90.0, abs=1e-3) and c2.loc["b", "c"] == pytest.approx(0.0, abs=1e-6)
    # A category with fewer prompts than top_k (few refusals on a real model) spans fewer
    # dimensions: two prompts inside span_1 give a plane inside it, at 0 degrees to "a".
    few = geo.principal_angles({"a": diffs["a"], "few": diffs["b"][:2], "c": diffs["c"]}, top_k=3)
    pair = few.set_index(["a", "b"])
    assert pair.loc[("few", "few"), "n_angles"] == 2 and pair.loc[("a", "few"), "n_angles"] == 2
    assert pair.loc[("a", "few"), "mean_cos2"] == pytest.approx(1.0, abs=1e-6)
    assert pair.loc[("few", "c"), "min_angle_deg"] == pytest.approx(90.0, abs=1e-3)
    with pytest.raises(RefusalAtlasError, match="n >= 1"):
        geo.principal_angles({"a": diffs["a"][:0]}, top_k=3)


def test_participation_ratio_counts_planted_orthogonal_directions():
    five = planted_units(np.eye(5)) * np.arange(1, 6)[:, None]  # norms differ; rank must not care
    res = geo.effective_rank(five)
    assert res["participation_ratio"] == pytest.approx(5.0)
    np.testing.assert_allclose(res["cumulative"], np.arange(1, 6) / 5)
    same = resample_cloud(planted_units(np.ones((1, 1))), ["x"], n_draws=6)["x"]
    assert geo.effective_rank(same)["participation_ratio"] == pytest.approx(1.0, abs=0.05)
    two_pairs = planted_units(np.kron(np.eye(2), np.ones((2, 2))))  # two orthogonal directions, each twice
    assert geo.effective_rank(two_pairs)["participation_ratio"] == pytest.approx(2.0, abs=1e-9)


def probe_data(seed: int = 6) -> tuple[dict, np.ndarray]:
    """Categories shifted from a shared noise baseline: a and b along one axis, c along another, n pure noise."""
    rng = np.random.default_rng(seed)
    axes = planted_units(np.eye(2), d=32, seed=seed)
    noise = lambda n: rng.standard_normal((n, 32))  # noqa: E731
    shifts = {"a": 6 * axes[0], "b": 6 * axes[0], "c": 6 * axes[1], "n": np.zeros(32)}
    return {name: (noise(40) + shift, noise(40)) for name, shift in shifts.items()}, axes


def test_probe_accuracy_near_one_for_separable_and_chance_for_noise():
    data, _ = probe_data()
    acc = geo.probe_accuracy(data, cv_folds=5, seed=0)
    assert list(acc.index) == ["a", "b", "c", "n"]
    assert (acc[["a", "b", "c"]] > 0.95).all()
    assert 0.3 < acc["n"] < 0.7
    assert geo.probe_accuracy(data, cv_folds=5, seed=0).equals(acc)  # seeded folds are reproducible


def test_probe_transfer_follows_shared_and_orthogonal_axes():
    data, _ = probe_data()
    data.pop("n")
    transfer = geo.probe_transfer(data, cv_folds=5, seed=0)
    acc = geo.probe_accuracy(data, cv_folds=5, seed=0)
    np.testing.assert_allclose(np.diag(transfer), acc.to_numpy())
    assert transfer.loc["a", "b"] > 0.9 and transfer.loc["b", "a"] > 0.9
    assert transfer.loc["a", "c"] < 0.75 and transfer.loc["c", "a"] < 0.75


def test_selectivity_is_diagonal_dominant_for_planted_data():
    rng = np.random.default_rng(7)
    axes = planted_units(np.eye(3), d=32)
    names = ["p", "q", "r"]
    baseline = rng.standard_normal((50, 32)) + 1.5  # a shared offset the baseline subtraction must cancel
    tests = {n: rng.standard_normal((30, 32)) + 1.5 + 3 * axes[i] for i, n in enumerate(names)}
    units = {n: 2.0 * axes[i] for i, n in enumerate(names)}
    sel = geo.selectivity(tests, units, baseline=baseline)
    assert sel.shape == (3, 3) and list(sel.index) == names and list(sel.columns) == names
    values = sel.to_numpy()
    np.testing.assert_allclose(np.diag(values), 3.0, atol=0.5)
    assert np.abs(values[~np.eye(3, dtype=bool)]).max() < 0.5
    raw = geo.selectivity(tests, units)
    assert (np.diag(raw.to_numpy()) > raw.to_numpy().max(axis=1) - 1e-12).all()


def test_summarize_geometry_returns_flat_finite_numbers():
    gram, names, _ = two_cluster_gram()
    cloud = resample_cloud(planted_units(gram), names)
    means = np.stack([cloud[n].mean(axis=0) for n in names])
    cos = geo.cosine_matrix(means, names)
    data, _ = probe_data()
    summary = geo.summarize_geometry(
        cos,
        clustering=geo.cluster_directions(cos),
        mds=geo.mds_embedding(cos, n_init=1),
        rank=geo.effective_rank(means),
        distinctness=geo.distinctness_test(cloud, n_permutations=200),
        probe_acc=geo.probe_accuracy(data),
        transfer=geo.probe_transfer(data),
    )
    expected = {
        "n_directions",
        "cosine_offdiag_mean",
        "cosine_min",
        "cosine_max",
        "cluster_average_best_k",
        "cluster_average_silhouette",
        "cluster_complete_best_k",
        "cluster_complete_silhouette",
        "mds_stress_2d",
        "mds_stress_3d",
        "participation_ratio",
        "distinctness_overall_p",
        "distinctness_max_pair_p",
        "within_cosine_mean",
        "probe_accuracy_mean",
        "probe_transfer_offdiag_mean",
    }
    assert set(summary) == expected
    assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in summary.values())
    off_mean = (gram.sum() - 6) / 30
    assert summary["cosine_offdiag_mean"] == pytest.approx(off_mean, abs=0.02)
    assert summary["cluster_average_best_k"] == 2


def test_mds_of_three_directions_in_three_dimensions_is_finite():
    """Three directions have no classical (Torgerson) embedding in 3 dimensions (a zero or negative
    eigenvalue); the random starts still give one. A real run with three categories hit this."""
    cos = pd.DataFrame([[1.0, 0.3, 0.5], [0.3, 1.0, 0.2], [0.5, 0.2, 1.0]], index=list("abc"), columns=list("abc"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn's sqrt of the negative eigenvalue
        out = geo.mds_embedding(cos)
    for dim in (2, 3):
        assert out[dim]["coords"].shape == (3, dim) and np.isfinite(out[dim]["coords"].to_numpy()).all()
        assert out[dim]["stress"] < 1e-3  # three points embed exactly in the plane


def test_shared_baseline_control_sees_a_pool_that_carries_category_structure():
    """Two categories share a benign pool whose mean rests on three extreme prompts: with a shared pool their pull is
    the same for both directions; split in two parts, one part holds more of them than the other (three cannot
    split evenly), so the directions and their cosine move."""
    from refusal_atlas.analysis.geometry import shared_baseline_control

    rng = np.random.default_rng(0)
    d = 64
    axes = np.eye(d)
    targets = {"a": axes[0] * 5 + rng.normal(0, 0.1, (40, d)), "b": axes[1] * 5 + rng.normal(0, 0.1, (40, d))}
    quiet = rng.normal(0, 0.1, (80, d))
    calm = shared_baseline_control(targets, {"a": "benign", "b": "benign"}, {"benign": quiet}, seed=0)
    assert calm["rows_per_part"] == 40
    assert calm["cosine_shared"].loc["a", "b"] == pytest.approx(0.0, abs=0.05)
    loud = quiet.copy()
    loud[[5, 30, 70]] += axes[2] * 100
    moved = shared_baseline_control(targets, {"a": "benign", "b": "benign"}, {"benign": loud}, seed=0)
    assert moved["mean_abs_change"] > 0.03 > 0.01 > calm["mean_abs_change"]
    assert moved["max_abs_change"] == pytest.approx(moved["mean_abs_change"])  # one pair: mean = max


def test_replicate_floor_and_random_harmful_control_on_planted_directions():
    from refusal_atlas.analysis.geometry import random_harmful_control, replicate_floor

    rng = np.random.default_rng(1)
    d = 32
    a, b = np.eye(d)[0], np.eye(d)[1]
    resamples = {"a": a + rng.normal(0, 0.05, (6, d)), "b": b + rng.normal(0, 0.05, (6, d))}
    floor = replicate_floor(resamples)
    assert floor["within"]["n"] == 2 * 15 and floor["between"]["n"] == 36
    assert floor["within"]["min"] > 0.9 and abs(floor["between"]["mean"]) < 0.1
    assert floor["between_reaching_within_min"] == 0.0
    # Random subsets of both categories point between them: cos 1/sqrt(2) with each.
    draws = (a + b) / np.sqrt(2) + rng.normal(0, 0.02, (5, d))
    control = random_harmful_control(draws, {"a": a, "b": b})
    assert control["random_vs_random"]["mean"] > 0.95
    assert control["random_vs_category"] == pytest.approx({"a": 2**-0.5, "b": 2**-0.5}, abs=0.03)
    assert control["category_vs_category"]["mean"] == pytest.approx(0.0, abs=1e-9)
