"""Refusal directions from two sides of residual activations, their controls and stability.

Activations come as float32 arrays ``[n_prompts, n_rows, n_positions, d_model]`` as read from
an activation store: row ``l`` is the input of block ``l`` and, when present, row ``L`` is the
final pre-norm residual; positions are negative end-of-instruction offsets (e.g. -5..-1).
The *target* side is the category's refused prompts (HR) and the *baseline* side the
answered benign prompts (BC). Everything here is pure: arrays in, arrays and dicts out.

A direction is undefined where the two sides' means coincide exactly (for instance at row 0
on template tokens, whose embedding is the same for every prompt); there the unit vector is
all zeros and the norm 0, and the site selectors (``analysis.sites``) never choose it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from refusal_atlas.errors import RefusalAtlasError

METHODS = ("mean_diff", "pca", "probe")
PROBE_C = 1.0  # Inverse L2 strength of the probe; fixed so directions do not depend on tuning.


class DirectionError(RefusalAtlasError):
    """Too few prompts, a bad (layer, position) or an unknown method."""


# -------- Drawing the two sides --------


def draw_sides(
    target_ids: Sequence,
    baseline_ids: Sequence,
    n_per_side: int,
    rng: np.random.Generator,
    allow_fewer: bool = True,
    label: str = "",
) -> tuple[list, list]:
    """Sample ``n_per_side`` prompt ids from each side without replacement.

    If a side has fewer than ``n_per_side``, all of it is used and the other side is drawn to
    the same count (the study's rule), unless ``allow_fewer`` is False, which raises. Ids are
    sorted before sampling, so the draw depends only on the id sets and ``rng``'s state.
    Returns (target ids, baseline ids), each sorted, of equal length.
    """
    name = f"category {label!r}" if label else "this category"
    target, baseline = sorted(target_ids), sorted(baseline_ids)
    hint = "set directions.filter: label to learn from all prompts regardless of behaviour, or add prompts"
    if not target:
        raise DirectionError(f"{name} has 0 refused target prompts (HR) in the train split; {hint}.")
    if not baseline:
        raise DirectionError(f"{name} has 0 answered baseline prompts (BC) in the train split; {hint}.")
    n = min(n_per_side, len(target), len(baseline))
    if n < n_per_side and not allow_fewer:
        short = [
            f"{side} has {len(ids)}"
            for side, ids in (("refused target (HR)", target), ("answered baseline (BC)", baseline))
            if len(ids) < n_per_side
        ]
        raise DirectionError(
            f"{name}: {' and '.join(short)} prompts, fewer than directions.n_per_side={n_per_side}; "
            f"lower directions.n_per_side to {n} or set directions.allow_fewer: true."
        )
    pick = lambda ids: sorted(ids[i] for i in rng.choice(len(ids), size=n, replace=False))  # noqa: E731
    return pick(target), pick(baseline)


def lineage(sides: Mapping[str, tuple[Sequence, Sequence]]) -> dict[str, dict]:
    """Per direction name, the prompt ids each side was learnt from.

    Input: ``{name: (target ids, baseline ids)}`` as returned by ``draw_sides``. Output:
    ``{name: {"target_ids": [...], "baseline_ids": [...], "n_target": int, "n_baseline": int}}``.
    """
    return {
        name: {"target_ids": list(t), "baseline_ids": list(b), "n_target": len(t), "n_baseline": len(b)}
        for name, (t, b) in sides.items()
    }


# -------- Directions --------


def _check_sides(target: np.ndarray, baseline: np.ndarray) -> None:
    if target.ndim != 4 or baseline.ndim != 4 or target.shape[1:] != baseline.shape[1:]:
        raise DirectionError(
            f"activations must be [n_prompts, n_layers, n_positions, d_model] with matching trailing axes; "
            f"got target {target.shape} and baseline {baseline.shape}"
        )
    if len(target) == 0 or len(baseline) == 0:
        raise DirectionError(
            f"each side needs at least one prompt; got {len(target)} target and {len(baseline)} baseline"
        )


def compute_means(x: np.ndarray) -> np.ndarray:
    """Mean over prompts accumulated in float64: [n, L, P, d] -> [L, P, d] float64."""
    return np.mean(x, axis=0, dtype=np.float64)


def _unit_rows(v: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """Normalise the last axis where ``defined`` (else zeros): [..., d] -> [..., d] float64."""
    length = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(defined[..., None], v / np.where(length > 0, length, 1.0), 0.0)


def _probe_weights(target: np.ndarray, baseline: np.ndarray, defined: np.ndarray, seed: int) -> np.ndarray:
    """Logistic-regression weight per (layer, position): [L, P, d] float64 (zeros where undefined)."""
    from sklearn.linear_model import LogisticRegression

    _, n_rows, n_pos, d = target.shape
    y = np.r_[np.ones(len(target)), np.zeros(len(baseline))]
    out = np.zeros((n_rows, n_pos, d))
    for l in range(n_rows):
        for p in range(n_pos):
            if not defined[l, p]:
                continue
            x = np.concatenate([target[:, l, p], baseline[:, l, p]]).astype(np.float64)
            # Centring and one global scale leave the weight's direction meaningful while
            # keeping lbfgs well conditioned on residuals of norm ~100.
            x -= x.mean(axis=0)
            x /= np.sqrt((x**2).sum(axis=1).mean()) + 1e-12
            probe = LogisticRegression(C=PROBE_C, solver="lbfgs", max_iter=2000, random_state=seed).fit(x, y)
            out[l, p] = probe.coef_[0]
    return out


def compute_direction(
    target: np.ndarray, baseline: np.ndarray, method: str = "mean_diff", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One direction per (layer, position) from target [n_t, L, P, d] vs baseline [n_b, L, P, d].

    Returns ``(unit [L, P, d] float32, norm [L, P] float64)``, with m = mean(target) − mean(baseline)
    accumulated in float64:

    - ``mean_diff``: unit = m / |m|, norm = |m| (Arditi et al.; the study).
    - ``pca``: unit = first right singular vector of the *uncentred* paired differences
      target[i] − baseline[i], i < min(n_t, n_b) (the direction of largest mean squared
      projection, which a consistent shift dominates), sign-aligned so unit·m > 0.
    - ``probe``: unit = normalised weight of an L2 logistic regression (lbfgs, C=PROBE_C,
      ``random_state=seed``) separating the two sides, sign-aligned so unit·m > 0.

    For pca and probe, norm = unit·m, the mean difference projected on the direction, so
    ``unit * norm`` is the part of the mean shift the direction carries.
    """
    _check_sides(target, baseline)
    if method not in METHODS:
        raise DirectionError(
            f"unknown direction method {method!r}; directions.method must be one of {', '.join(METHODS)}"
        )
    mean_t, mean_b = compute_means(target), compute_means(baseline)
    diff = mean_t - mean_b  # [L, P, d]
    length = np.linalg.norm(diff, axis=-1)
    defined = length > 1e-12 * (np.linalg.norm(mean_t, axis=-1) + np.linalg.norm(mean_b, axis=-1))
    if method == "mean_diff":
        unit = _unit_rows(diff, defined)
        return unit.astype(np.float32), np.where(defined, length, 0.0)
    if method == "pca":
        m = min(len(target), len(baseline))
        raw = np.zeros_like(diff)
        for l in range(diff.shape[0]):  # one layer at a time bounds the float64 copy
            pairs = np.moveaxis(target[:m, l].astype(np.float64) - baseline[:m, l], 0, 1)  # [P, m, d]
            # Top eigenvector of the small [m, m] Gram matrix, mapped back to d: the top
            # right singular vector of the pairs, without an SVD of the [m, d] matrix.
            top = np.linalg.eigh(pairs @ pairs.transpose(0, 2, 1))[1][..., -1]  # [P, m]
            raw[l] = np.einsum("pm,pmd->pd", top, pairs)
    else:
        raw = _probe_weights(target, baseline, defined, seed)
    unit = _unit_rows(raw, defined)
    unit *= np.where(np.einsum("lpd,lpd->lp", unit, diff) < 0, -1.0, 1.0)[..., None]
    norm = np.where(defined, np.einsum("lpd,lpd->lp", unit, diff), 0.0)
    return unit.astype(np.float32), norm


def random_controls(norms_like: np.ndarray, d_model: int, n_random: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded Gaussian control directions, norm-matched to ``norms_like`` [L, P].

    Returns ``(unit [n_random, L, P, d_model] float32, norm [n_random, L, P] float64)``; each
    unit vector is uniform on the sphere and independent of every other, and ``norm[k]`` equals
    ``norms_like`` (e.g. the pooled direction's norms) so steering by ``unit * norm`` moves
    activations as far as the real direction does.
    """
    norms_like = np.asarray(norms_like, dtype=np.float64)
    g = np.random.default_rng(seed).standard_normal((n_random, *norms_like.shape, d_model))
    unit = g / np.linalg.norm(g, axis=-1, keepdims=True)
    return unit.astype(np.float32), np.broadcast_to(norms_like, (n_random, *norms_like.shape)).copy()


# -------- Stability --------


def _two_draws(pool: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two index draws of size n from range(pool), overlapping as little as possible."""
    if pool < n:  # too small: two independent bootstrap draws
        return rng.integers(0, pool, n), rng.integers(0, pool, n)
    perm = rng.permutation(pool)
    return perm[:n], perm[-n:]  # disjoint when pool >= 2n, else overlap exactly 2n - pool


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis; NaN where either vector is zero."""
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.einsum("...d,...d->...", a, b) / np.where(denom > 0, denom, 1.0), np.nan)


def stability(
    target: np.ndarray,
    baseline: np.ndarray,
    n_per_side: int,
    n_draws: int,
    seed: int,
    at: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """Within-category agreement of mean-difference directions under resampling.

    Inputs: target [n_t, L, P, d] and baseline [n_b, L, P, d] (the whole train pools), and
    ``at``: optional (row index, position index) cells to evaluate (others are NaN), for speed.

    - Resample cosine: each of ``n_draws`` rounds draws two samples of ``n_per_side`` per side;
      per side they are disjoint when the pool holds 2·n_per_side, otherwise they overlap as
      little as possible (exactly 2n − pool prompts), and if the pool is smaller than
      n_per_side each is a with-replacement draw. The cosine of the two mean differences is
      recorded; ``mean``/``sd`` (ddof=1) summarise the rounds.
    - Split-half cosine: each side is randomly halved (⌊n/2⌋ vs the rest) and the two halves'
      mean differences compared; averaged over ``n_draws`` splits (NaN if a side has < 2).

    Returns ``{"mean", "sd", "split_half", "split_half_sd": [L, P] float64, "draws":
    [n_draws, L, P], "n_per_side", "n_draws"}``.
    """
    _check_sides(target, baseline)
    if n_draws < 2:
        raise DirectionError(f"directions.n_draws={n_draws}: the stability estimate needs at least 2 draws")
    n_rows, n_pos = target.shape[1:3]
    cells = [(l, p) for l in range(n_rows) for p in range(n_pos)] if at is None else [tuple(c) for c in at]
    ls, ps = np.array([c[0] for c in cells], dtype=int), np.array([c[1] for c in cells], dtype=int)
    t, b = target[:, ls, ps], baseline[:, ls, ps]  # [n, C, d]
    rng = np.random.default_rng(seed)
    diff = lambda ti, bi: compute_means(t[ti]) - compute_means(b[bi])  # noqa: E731  [C, d]
    draws, halves = np.empty((n_draws, len(cells))), np.empty((n_draws, len(cells)))
    for k in range(n_draws):
        (t1, t2), (b1, b2) = _two_draws(len(t), n_per_side, rng), _two_draws(len(b), n_per_side, rng)
        draws[k] = cosine_rows(diff(t1, b1), diff(t2, b2))
        tp, bp, ht, hb = rng.permutation(len(t)), rng.permutation(len(b)), len(t) // 2, len(b) // 2
        halves[k] = cosine_rows(diff(tp[:ht], bp[:hb]), diff(tp[ht:], bp[hb:])) if min(ht, hb) > 0 else np.nan

    def grid(values: np.ndarray) -> np.ndarray:  # [..., C] -> [..., L, P], NaN off the cells
        out = np.full((*values.shape[:-1], n_rows, n_pos), np.nan)
        out[..., ls, ps] = values
        return out

    return {
        "mean": grid(draws.mean(0)),
        "sd": grid(draws.std(0, ddof=1)),
        "split_half": grid(halves.mean(0)),
        "split_half_sd": grid(halves.std(0, ddof=1)),
        "draws": grid(draws),
        "n_per_side": n_per_side,
        "n_draws": n_draws,
    }
