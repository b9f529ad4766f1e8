"""The geometry of per-category refusal directions: cosines, distinctness, clusters, MDS, rank, probes.

Pure computation on numpy arrays keyed by category name; every function returns a
DataFrame, Series, array or plain dict. Shapes use ``k`` categories, ``d`` hidden size,
``L`` layers, ``P`` positions and ``n`` prompts or resample draws.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.linalg import subspace_angles
from scipy.spatial.distance import pdist, squareform
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import MDS
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from refusal_atlas.errors import RefusalAtlasError

_EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
    """Normalise along the last axis; a zero vector is an upstream bug, so it fails loudly."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms < _EPS):
        raise RefusalAtlasError(
            f"found a zero-norm direction among array of shape {x.shape}; every direction needs a non-zero norm"
        )
    return x / norms


def cosine_matrix(units: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """Pairwise cosine similarity of directions.

    ``units`` [k, d] (normalised again here, so raw mean differences are fine); ``names``
    length k. Returns a symmetric k×k DataFrame indexed and labelled by ``names``,
    values clipped to [-1, 1] so round-off never yields an impossible cosine.
    """
    units = np.asarray(units)
    if units.ndim != 2 or units.shape[0] != len(names):
        raise RefusalAtlasError(
            f"cosine_matrix expects units of shape [k, d] with k = len(names) = {len(names)}; got {units.shape}"
        )
    u = _unit(units)
    cos = np.clip(u @ u.T, -1.0, 1.0)
    return pd.DataFrame(cos, index=list(names), columns=list(names))


def offdiag_mean_per_layer(units: np.ndarray, position: int | None = None) -> np.ndarray:
    """Mean off-diagonal cosine between the k directions, per layer.

    ``units`` is [k, L, d], or [k, L, P, d] with ``position`` an index into P. With a
    4-D input and ``position=None`` the result is [L, P] (one value per layer and
    position, for a layer×position heatmap); otherwise it is [L].
    """
    units = np.asarray(units, dtype=np.float64)
    if units.ndim == 4 and position is not None:
        units = units[:, :, position, :]
    if units.ndim not in (3, 4) or units.shape[0] < 2:
        raise RefusalAtlasError(
            f"offdiag_mean_per_layer expects [k, L, d] or [k, L, P, d] with k >= 2; got {units.shape}"
        )
    u = _unit(units)
    k = u.shape[0]
    # Sum of all pairwise cosines = |sum of unit vectors|^2; subtracting the k self-terms
    # leaves the off-diagonal sum without building any k×k matrix per layer.
    total = np.sum(u.sum(axis=0) ** 2, axis=-1)
    return (total - k) / (k * (k - 1))


def extreme_pairs(cos: pd.DataFrame) -> dict[str, tuple[str, str, float]]:
    """The least and most similar distinct pairs of a cosine matrix: ``{"min": (a, b, cos), "max": ...}``."""
    names = list(cos.index)
    iu = np.triu_indices(len(names), k=1)
    vals = cos.to_numpy()[iu]
    lo, hi = int(np.argmin(vals)), int(np.argmax(vals))
    return {
        "min": (names[iu[0][lo]], names[iu[1][lo]], float(vals[lo])),
        "max": (names[iu[0][hi]], names[iu[1][hi]], float(vals[hi])),
    }


# --------------------------------------------------------------------------- distinctness


def _label_draws(m: int, n_a: int, n_permutations: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Boolean [n_draws, m] relabellings with exactly ``n_a`` members of group a.

    When every split fits in the budget they are enumerated (an exact test), because
    with few draws per category random relabellings would mostly repeat.
    """
    if math.comb(m, n_a) <= n_permutations:
        z = np.zeros((math.comb(m, n_a), m), dtype=bool)
        for row, members in enumerate(itertools.combinations(range(m), n_a)):
            z[row, list(members)] = True
        return z, True
    ranks = np.argsort(rng.random((n_permutations, m)), axis=1)
    return ranks < n_a, False


def _pair_stat(g: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Within-mean and between-mean cosine for each relabelling ``z`` [R, m] of Gram ``g`` [m, m]."""
    za, zb = z.astype(np.float64), (~z).astype(np.float64)
    n_a, n_b = int(z[0].sum()), int((~z[0]).sum())
    dg = np.diag(g)
    s_aa = np.einsum("ri,ij,rj->r", za, g, za) - za @ dg
    s_bb = np.einsum("ri,ij,rj->r", zb, g, zb) - zb @ dg
    s_ab = np.einsum("ri,ij,rj->r", za, g, zb)
    within = (s_aa + s_bb) / (n_a * (n_a - 1) + n_b * (n_b - 1))
    return within, s_ab / (n_a * n_b)


def distinctness_test(resamples: Mapping[str, np.ndarray], n_permutations: int = 1000, seed: int = 0) -> dict:
    """Permutation test that category directions differ beyond their own resampling noise.

    ``resamples`` maps each category to [n_draws, d] directions, each learnt from an
    independent resample of that category's prompts (n_draws >= 2; normalised here).

    Per pair (a, b) the statistic is the mean within-category cosine (all a–a and b–b
    pairs of draws) minus the mean between-category cosine (a–b pairs). Under the null
    the two categories' draws are exchangeable, so the null distribution comes from
    permuting the category labels of the pooled draws (group sizes kept). One-sided
    p = (1 + #null >= observed) / (1 + n_permutations), or the exact share when all
    splits fit in ``n_permutations``. The overall test is the same statistic over all
    categories at once (pooled within minus pooled between, labels permuted across all
    draws): it tests the global null "no category differs from any other".

    To claim *every* pair is distinct, use ``max_pair_p`` (an intersection-union test:
    all pairs reject at level α iff the largest p is below α, no correction needed);
    Bonferroni-adjusted pair p-values are given for claims about individual pairs.

    The Gram matrix of all draws is computed once; permutations only re-index it.
    Returns a dict with ``p_pair``, ``p_pair_bonferroni``, ``statistic_pair`` and
    ``between_mean`` (k×k DataFrames; diagonal NaN, or the within-mean for ``between_mean``), ``within_mean`` (Series:
    each category's mean draw–draw cosine, the study's "stability"), ``overall_p``,
    ``overall_statistic``, ``overall_within_mean``, ``overall_between_mean``,
    ``max_pair_p`` and ``exact_pairs`` (whether the pair tests were enumerated).
    """
    names = list(resamples)
    blocks = [_unit(np.atleast_2d(resamples[n])) for n in names]
    sizes = np.array([b.shape[0] for b in blocks])
    if len(names) < 2 or sizes.min() < 2:
        raise RefusalAtlasError(
            "distinctness_test needs >= 2 categories with >= 2 draws each; got sizes "
            f"{dict(zip(names, sizes.tolist()))}"
        )
    pooled = np.concatenate(blocks)  # [N, d]
    gram = pooled @ pooled.T  # [N, N], the only O(N^2 d) step
    starts = np.concatenate([[0], np.cumsum(sizes)])
    idx = [np.arange(starts[i], starts[i + 1]) for i in range(len(names))]
    rng = np.random.default_rng(seed)

    k = len(names)
    p = np.full((k, k), np.nan)
    stat = np.full((k, k), np.nan)
    between = np.full((k, k), np.nan)
    exact_all = True
    for i, j in itertools.combinations(range(k), 2):
        sel = np.concatenate([idx[i], idx[j]])
        g = gram[np.ix_(sel, sel)]
        observed = np.zeros((1, sel.size), dtype=bool)
        observed[0, : sizes[i]] = True
        w_obs, b_obs = _pair_stat(g, observed)
        z, exact = _label_draws(sel.size, int(sizes[i]), n_permutations, rng)
        w_null, b_null = _pair_stat(g, z)
        t_obs, t_null = w_obs[0] - b_obs[0], w_null - b_null
        hits = int(np.sum(t_null >= t_obs - 1e-12))
        # An exact enumeration already contains the observed split, so no +1 is needed.
        p[i, j] = p[j, i] = hits / len(t_null) if exact else (1 + hits) / (1 + n_permutations)
        stat[i, j] = stat[j, i] = t_obs
        between[i, j] = between[j, i] = b_obs[0]
        exact_all &= exact

    within = np.array(
        [(gram[np.ix_(ix, ix)].sum() - np.trace(gram[np.ix_(ix, ix)])) / (ix.size * (ix.size - 1)) for ix in idx]
    )
    np.fill_diagonal(between, within)
    overall = _overall_test(gram, sizes, n_permutations, rng)
    n_pairs = k * (k - 1) // 2
    frame = lambda a: pd.DataFrame(a, index=names, columns=names)  # noqa: E731
    return {
        "p_pair": frame(p),
        "p_pair_bonferroni": frame(np.minimum(p * n_pairs, 1.0)),
        "statistic_pair": frame(stat),
        "between_mean": frame(between),
        "within_mean": pd.Series(within, index=names, name="within_mean"),
        "max_pair_p": float(np.nanmax(p)),
        "exact_pairs": bool(exact_all),
        "n_permutations": int(n_permutations),
        **overall,
    }


def _overall_test(gram: np.ndarray, sizes: np.ndarray, n_permutations: int, rng: np.random.Generator) -> dict:
    """All-category version of the pair test: pooled within-mean minus pooled between-mean."""
    n = gram.shape[0]
    n_within = int(np.sum(sizes * (sizes - 1)))
    n_between = int(n * n - np.sum(sizes**2))
    total, trace = gram.sum(), np.trace(gram)
    labels = np.repeat(np.arange(sizes.size), sizes)

    def stat(q: np.ndarray) -> np.ndarray:
        # q = sum of Gram entries over same-label pairs (self-pairs included), per labelling.
        return (q - trace) / n_within - (total - q) / n_between

    def same_label_sum(lab: np.ndarray) -> np.ndarray:
        onehot = np.eye(sizes.size)[lab]  # [R, N, k]
        return np.sum((gram @ onehot) * onehot, axis=(1, 2))

    q_obs = same_label_sum(labels[None, :])[0]
    observed = stat(np.array([q_obs]))[0]
    # Chunks of relabellings bound the [R, N, k] one-hot buffer for large N.
    null = np.concatenate(
        [
            stat(same_label_sum(np.stack([rng.permutation(labels) for _ in range(min(256, n_permutations - start))])))
            for start in range(0, n_permutations, 256)
        ]
    )
    return {
        "overall_p": float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations)),
        "overall_statistic": float(observed),
        "overall_within_mean": float((q_obs - trace) / n_within),
        "overall_between_mean": float((total - q_obs) / n_between),
    }


# --------------------------------------------------------------------------- clustering and MDS


def cosine_distance(cos: pd.DataFrame) -> np.ndarray:
    """Distance 1 − cos [k, k], symmetrised, clipped to [0, 2] and with an exact zero diagonal."""
    c = cos.to_numpy(dtype=np.float64)
    dist = np.clip(1.0 - (c + c.T) / 2.0, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return dist


def cluster_directions(cos: pd.DataFrame, max_k: int = 6, methods: Sequence[str] = ("average", "complete")) -> dict:
    """Agglomerative clustering of directions on distance 1 − cos, scored by silhouette.

    ``cos`` is a k×k cosine DataFrame. For each linkage method the tree is cut into
    k' = 2..min(max_k, k − 1) clusters (silhouette is undefined at k' = k). Returns
    ``linkage`` {method: scipy linkage matrix [k − 1, 4]}, ``labels`` {method: {k': Series
    of 1-based cluster ids by name}}, ``silhouette`` (DataFrame, index k', one column per
    method; NaN where the tree cannot be cut into exactly k' clusters), ``best_k`` and
    ``best_silhouette`` {method: value}.
    """
    names = list(cos.index)
    dist = cosine_distance(cos)
    ks = list(range(2, min(max_k, len(names) - 1) + 1))
    if not ks:
        raise RefusalAtlasError(f"clustering needs at least 3 directions to compare k >= 2; got {len(names)}")
    out: dict = {"linkage": {}, "labels": {}, "best_k": {}, "best_silhouette": {}}
    sil = pd.DataFrame(index=pd.Index(ks, name="k"), columns=list(methods), dtype=float)
    for method in methods:
        z = linkage(squareform(dist, checks=False), method=method)
        out["linkage"][method] = z
        out["labels"][method] = {}
        for k in ks:
            labels = fcluster(z, t=k, criterion="maxclust")
            out["labels"][method][k] = pd.Series(labels, index=names, name=f"k{k}")
            # Tied merge heights can make maxclust return fewer clusters than asked for.
            if len(set(labels)) == k:
                sil.loc[k, method] = silhouette_score(dist, labels, metric="precomputed")
        best = sil[method].idxmax() if sil[method].notna().any() else None
        out["best_k"][method] = None if best is None else int(best)
        out["best_silhouette"][method] = float("nan") if best is None else float(sil.loc[best, method])
    out["silhouette"] = sil
    return out


def kruskal_stress(dist: np.ndarray, coords: np.ndarray) -> float:
    """Kruskal stress-1 sqrt(Σ (d_ij − δ_ij)² / Σ d_ij²) over i < j.

    ``dist`` [k, k] target dissimilarities δ; ``coords`` [k, m] embedding whose Euclidean
    distances are d. Scale-free, so it is comparable to the study's 0.13 (2-D) / 0.08 (3-D).
    """
    delta = squareform(dist, checks=False)
    d = pdist(coords)
    return float(np.sqrt(np.sum((d - delta) ** 2) / max(np.sum(d**2), _EPS)))


def mds_embedding(cos: pd.DataFrame, dims: Sequence[int] = (2, 3), seed: int = 0, n_init: int = 4) -> dict:
    """Metric MDS (SMACOF) of the 1 − cos distances.

    Returns {dim: {"coords": DataFrame [k, dim] indexed by name, "stress": Kruskal
    stress-1}} for each requested dimension. Two fits are made per dimension, one from
    the classical (Torgerson) solution and one keeping the best of ``n_init`` seeded
    random starts, and the one with the lower stress-1 is kept: the classical start is
    deterministic and usually best, the random starts guard against its local minimum.
    The stress is recomputed from the embedding because sklearn's raw stress is not
    normalised the way the study's numbers are.
    """
    names = list(cos.index)
    dist = cosine_distance(cos)
    out = {}
    for dim in dims:
        fits = []
        for init, starts in (("classical_mds", 1), ("random", n_init)):
            mds = MDS(
                n_components=dim,
                metric_mds=True,
                metric="precomputed",
                init=init,
                n_init=starts,
                random_state=seed,
                max_iter=1000,
                eps=1e-9,
            )
            try:
                coords = mds.fit_transform(dist)
            except ValueError:
                # the classical start has no real coordinates in `dim` dimensions (k <= dim points, or
                # non-Euclidean distances)
                if init == "random":
                    raise
                continue
            fits.append((kruskal_stress(dist, coords), coords))
        stress, coords = min(fits, key=lambda fit: fit[0])
        out[int(dim)] = {
            "coords": pd.DataFrame(coords, index=names, columns=[f"mds{i + 1}" for i in range(dim)]),
            "stress": stress,
        }
    return out


# --------------------------------------------------------------------------- subspaces and rank


def principal_angles(diffs: Mapping[str, np.ndarray], top_k: int = 3) -> pd.DataFrame:
    """Principal angles between per-category subspaces of per-prompt differences.

    ``diffs`` maps a category to [n, d] per-prompt differences (target activation minus
    the baseline mean). Each subspace is spanned by the top ``top_k`` right singular
    vectors of the *uncentred* differences, so it contains the category's mean
    direction itself plus its main spread (PCA would centre away the mean direction).
    A category with fewer than ``top_k`` prompts (a real model refuses few of some sets)
    spans only as many dimensions as it has prompts; its angles are then over that many.
    Returns a long DataFrame over all ordered pairs (diagonal included, so
    ``df.pivot(index="a", columns="b", values=...)`` gives a full matrix) with columns
    ``a``, ``b``, ``min_angle_deg`` (smallest principal angle, degrees), ``mean_cos2``
    (mean squared cosine of the angles: 1 identical, 0 orthogonal) and ``n_angles``
    (min of the two subspaces' dimensions).
    """
    bases = {}
    for name, x in diffs.items():
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 1:
            raise RefusalAtlasError(
                f"principal_angles: category {name!r} has differences of shape {x.shape}; need [n >= 1, d]"
            )
        bases[name] = np.linalg.svd(x, full_matrices=False)[2][: min(top_k, x.shape[0])].T  # [d, <= top_k]
    # Angles are unchanged by an isometry, so express every basis in one orthonormal basis
    # of their joint span (<= k·top_k dims) first; each pair then costs nothing in d.
    joint = np.linalg.qr(np.concatenate(list(bases.values()), axis=1))[0]  # [d, <= k·top_k]
    bases = {name: joint.T @ b for name, b in bases.items()}
    rows = []
    for a, b in itertools.product(bases, repeat=2):
        theta = subspace_angles(bases[a], bases[b])
        rows.append(
            {
                "a": a,
                "b": b,
                "min_angle_deg": float(np.degrees(theta.min())),
                "mean_cos2": float(np.mean(np.cos(theta) ** 2)),
                "n_angles": len(theta),
            }
        )
    return pd.DataFrame(rows)


def effective_rank(units: np.ndarray) -> dict:
    """How many independent dimensions the k directions span.

    ``units`` [k, d] are normalised, then the eigenvalues λ of the uncentred Gram matrix
    U Uᵀ (= squared singular values of U) give the participation ratio (Σλ)² / Σλ²: k
    for k orthogonal directions, 1 for k copies of one direction. Uncentred, because a
    shared component is exactly what "one knob" would mean and must count as a dimension.
    Returns ``participation_ratio``, ``singular_values`` [k], ``explained_variance_ratio``
    [k] and its running sum ``cumulative`` [k].
    """
    s = np.linalg.svd(_unit(units), compute_uv=False)
    lam = s**2
    ratio = lam / lam.sum()
    return {
        "participation_ratio": float(lam.sum() ** 2 / np.sum(lam**2)),
        "singular_values": s,
        "explained_variance_ratio": ratio,
        "cumulative": np.cumsum(ratio),
    }


# --------------------------------------------------------------------------- probes and selectivity


def _probe(seed: int, c: float):
    # Standardising inside the pipeline keeps the scaler fit on training folds only.
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))


def _xy(target: np.ndarray, baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([np.asarray(target, dtype=np.float64), np.asarray(baseline, dtype=np.float64)])
    return x, np.r_[np.ones(len(target), dtype=int), np.zeros(len(baseline), dtype=int)]


def probe_accuracy(
    X_by_category: Mapping[str, tuple[np.ndarray, np.ndarray]], cv_folds: int = 5, seed: int = 0, c: float = 1.0
) -> pd.Series:
    """Cross-validated accuracy of a linear probe separating each category's target from its baseline.

    ``X_by_category`` maps a category to (X_target [n, d], X_baseline [m, d]). Folds are
    stratified and shuffled with ``seed``; the number of folds is capped by the smaller
    class so tiny categories still run. Returns a Series of mean accuracy by category.
    """
    # Probe problems are tiny (n ~ 10^2 rows): multi-threaded BLAS only adds overhead, and on
    # a shared machine oversubscribed threads made these fits ~10x slower, so pin one thread.
    with threadpool_limits(limits=1):
        return pd.Series(
            {name: _cv_accuracy(name, xt, xb, cv_folds, seed, c) for name, (xt, xb) in X_by_category.items()},
            name="probe_accuracy",
        )


def _cv_accuracy(name: str, xt: np.ndarray, xb: np.ndarray, cv_folds: int, seed: int, c: float) -> float:
    x, y = _xy(xt, xb)
    folds = min(cv_folds, int(np.bincount(y).min()))
    if folds < 2:
        raise RefusalAtlasError(
            f"probe_accuracy: category {name!r} has {len(xt)} target and {len(xb)} baseline rows; need >= 2 of each"
        )
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(_probe(seed, c), x, y, cv=cv, scoring="accuracy").mean())


def probe_transfer(
    X_by_category: Mapping[str, tuple[np.ndarray, np.ndarray]], cv_folds: int = 5, seed: int = 0, c: float = 1.0
) -> pd.DataFrame:
    """Accuracy of a probe trained on category i (rows) tested on category j's target vs baseline (columns).

    Off-diagonal cells train on all of i and test on all of j; the diagonal is the
    cross-validated accuracy of :func:`probe_accuracy`, since testing on training data
    would read 1.0. When categories share one baseline pool, pass disjoint baseline
    rows per category, or the off-diagonal partly scores memorised baseline prompts.
    """
    names = list(X_by_category)
    out = pd.DataFrame(np.nan, index=pd.Index(names, name="train"), columns=pd.Index(names, name="test"))
    diag = probe_accuracy(X_by_category, cv_folds=cv_folds, seed=seed, c=c)
    test_sets = {n: _xy(*X_by_category[n]) for n in names}
    with threadpool_limits(limits=1):  # tiny fits; see probe_accuracy
        for i in names:
            model = _probe(seed, c).fit(*test_sets[i])
            for j in names:
                out.loc[i, j] = diag[i] if i == j else float(model.score(*test_sets[j]))
    return out


def selectivity(
    X_test_by_category: Mapping[str, np.ndarray], units: Mapping[str, np.ndarray], baseline: np.ndarray | None = None
) -> pd.DataFrame:
    """Mean projection of each category's held-out prompts onto each direction.

    ``X_test_by_category`` maps a prompt category to activations [n, d]; ``units`` maps a
    direction name to [d] (normalised here). Rows are prompt categories, columns
    directions, values in activation units. With ``baseline`` [m, d] (benign prompts) its
    mean projection is subtracted per column, so 0 means "looks benign along this
    direction" and raw offsets shared by every prompt cancel out.
    """
    dirs = list(units)
    u = _unit(np.stack([np.asarray(units[n]) for n in dirs]))  # [D, d]
    offset = np.zeros(len(dirs)) if baseline is None else (np.asarray(baseline, dtype=np.float64) @ u.T).mean(axis=0)
    rows = {c: (np.asarray(x, dtype=np.float64) @ u.T).mean(axis=0) - offset for c, x in X_test_by_category.items()}
    return pd.DataFrame.from_dict(rows, orient="index", columns=dirs).rename_axis(index="prompts", columns="direction")


# --------------------------------------------------------------------------- summary


def summarize_geometry(
    cos: pd.DataFrame,
    clustering: dict | None = None,
    mds: dict | None = None,
    rank: dict | None = None,
    distinctness: dict | None = None,
    probe_acc: pd.Series | None = None,
    transfer: pd.DataFrame | None = None,
) -> dict[str, float]:
    """Flat numeric metrics for DVC/MLflow from the results of the functions above.

    Only the parts given are summarised; every value is a plain float or int (pair
    names, being strings, belong in :func:`extreme_pairs` and are logged as params).
    """
    k = len(cos)
    off = cos.to_numpy()[~np.eye(k, dtype=bool)]
    ext = extreme_pairs(cos)
    out: dict[str, float] = {
        "n_directions": k,
        "cosine_offdiag_mean": float(off.mean()),
        "cosine_min": ext["min"][2],
        "cosine_max": ext["max"][2],
    }
    if clustering is not None:
        for method, best in clustering["best_k"].items():
            out[f"cluster_{method}_best_k"] = -1 if best is None else int(best)
            out[f"cluster_{method}_silhouette"] = clustering["best_silhouette"][method]
    if mds is not None:
        out.update({f"mds_stress_{dim}d": res["stress"] for dim, res in mds.items()})
    if rank is not None:
        out["participation_ratio"] = rank["participation_ratio"]
    if distinctness is not None:
        out.update(
            {
                "distinctness_overall_p": distinctness["overall_p"],
                "distinctness_max_pair_p": distinctness["max_pair_p"],
                "within_cosine_mean": float(distinctness["within_mean"].mean()),
            }
        )
    if probe_acc is not None:
        out["probe_accuracy_mean"] = float(probe_acc.mean())
    if transfer is not None:
        t = transfer.to_numpy()
        out["probe_transfer_offdiag_mean"] = float(t[~np.eye(len(t), dtype=bool)].mean())
    return out


def _pair_cosines(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Cosines of every pair of rows: within ``a`` (i < j), or between ``a`` and ``b``."""
    a = _unit(np.atleast_2d(a))
    if b is None:
        return (a @ a.T)[np.triu_indices(len(a), k=1)]
    return (a @ _unit(np.atleast_2d(b)).T).ravel()


def _spread(values: np.ndarray) -> dict[str, float]:
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "p05": float(np.quantile(values, 0.05)),
        "p95": float(np.quantile(values, 0.95)),
        "max": float(values.max()),
    }


def replicate_floor(resamples: Mapping[str, np.ndarray]) -> dict:
    """The replicate noise floor (the study's replicate analysis): how independent resamples of one category agree
    (within: every pair of draws of a category) against how different categories' draws agree (between: every
    cross-category pair). Returns both distributions' summaries, the raw cosines for plotting, and the share of
    between-category pairs that reach the lowest within-category cosine."""
    names = list(resamples)
    within = np.concatenate([_pair_cosines(resamples[n]) for n in names])
    between = np.concatenate([_pair_cosines(resamples[a], resamples[b]) for a, b in itertools.combinations(names, 2)])
    return {
        "within": _spread(within),
        "between": _spread(between),
        "between_reaching_within_min": float((between >= within.min()).mean()),
        "values": {"within": within, "between": between},
    }


def random_harmful_control(draws: np.ndarray, units: Mapping[str, np.ndarray]) -> dict:
    """The random-harmful control: ``draws`` are directions from random subsets of all target prompts (every
    category pooled), each against a draw of the baseline pool, at the categories' sample size. If the category
    directions differed only because each is learnt from a small sample, these would differ from each other as
    much. Returns the random directions' mutual cosines and their cosine with each category direction (``units``:
    category → unit vector)."""
    names = list(units)
    mutual = _pair_cosines(draws)
    return {
        "random_vs_random": _spread(mutual),
        "category_vs_category": _spread(_pair_cosines(np.stack([units[c] for c in names]))),
        "random_vs_category": {c: float(np.mean(_pair_cosines(draws, units[c]))) for c in names},
        "values": {"random": mutual},
    }


def shared_baseline_control(
    targets: Mapping[str, np.ndarray], pools: Mapping[str, str], baselines: Mapping[str, np.ndarray], seed: int
) -> dict:
    """The shared-baseline confound: the categories that share one baseline pool get, instead, disjoint equal parts of
    it (a seeded split), and their difference-of-means directions are compared with the shared-pool ones. Returns
    both cosine matrices, how much the off-diagonal cosines move (mean and max |change|), each category's cosine
    between its two variants, and the rows per part."""
    cats = list(pools)
    shared_pool = max(set(pools.values()), key=lambda p: sum(v == p for v in pools.values()))
    sharing = [c for c in cats if pools[c] == shared_pool]
    rows = baselines[shared_pool]
    order = np.random.default_rng(seed).permutation(len(rows))
    parts = dict(zip(sharing, np.array_split(order, len(sharing))))

    def unit(c: str, base: np.ndarray) -> np.ndarray:
        d = targets[c].astype(np.float64).mean(0) - base.astype(np.float64).mean(0)
        return d / (np.linalg.norm(d) or 1.0)

    shared = np.stack([unit(c, baselines[pools[c]]) for c in cats])
    disjoint = np.stack([unit(c, rows[parts[c]]) if c in parts else unit(c, baselines[pools[c]]) for c in cats])
    cos_shared, cos_disjoint = cosine_matrix(shared, cats), cosine_matrix(disjoint, cats)
    off = ~np.eye(len(cats), dtype=bool)
    change = np.abs(cos_disjoint.to_numpy() - cos_shared.to_numpy())[off]
    return {
        "pool": shared_pool,
        "categories": sharing,
        "rows_per_part": int(min(len(p) for p in parts.values())),
        "cosine_shared": cos_shared,
        "cosine_disjoint": cos_disjoint,
        "offdiag_mean_shared": float(cos_shared.to_numpy()[off].mean()),
        "offdiag_mean_disjoint": float(cos_disjoint.to_numpy()[off].mean()),
        "mean_abs_change": float(change.mean()),
        "max_abs_change": float(change.max()),
        "self_cosine": {c: float(shared[i] @ disjoint[i]) for i, c in enumerate(cats)},
    }


def control_metrics(floor: dict, random_harmful: dict, shared: dict) -> dict[str, float]:
    """The three controls' headline numbers, flat, for metrics.json and MLflow."""
    return {
        "replicate_within_mean": floor["within"]["mean"],
        "replicate_within_min": floor["within"]["min"],
        "replicate_between_mean": floor["between"]["mean"],
        "replicate_between_max": floor["between"]["max"],
        "replicate_between_reaching_within_min": floor["between_reaching_within_min"],
        "random_harmful_cosine_mean": random_harmful["random_vs_random"]["mean"],
        "random_harmful_vs_category_mean": float(np.mean(list(random_harmful["random_vs_category"].values()))),
        "category_cosine_mean": random_harmful["category_vs_category"]["mean"],
        "disjoint_baseline_offdiag_mean": shared["offdiag_mean_disjoint"],
        "disjoint_baseline_mean_abs_change": shared["mean_abs_change"],
        "disjoint_baseline_max_abs_change": shared["max_abs_change"],
        "disjoint_baseline_rows_per_part": shared["rows_per_part"],
    }
