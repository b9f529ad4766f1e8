"""Refusal directions from two sides of residual activations, their controls, stability and site selection.

Activations come as float32 arrays ``[n_prompts, n_rows, n_positions, d_model]`` as read from
an activation store: row ``l`` is the input of block ``l`` and, when present, row ``L`` is the
final pre-norm residual; positions are negative end-of-instruction offsets (e.g. -5..-1).
The *target* side is the category's refused prompts (HR) and the *baseline* side the
answered benign prompts (BC). Everything here is pure: arrays in, arrays and dicts out.

A direction is undefined where the two sides' means coincide exactly (for instance at row 0
on template tokens, whose embedding is the same for every prompt); there the unit vector is
all zeros and the norm 0, and the selectors never choose it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from refusal_atlas.analysis.site_scores import CandidateScorer, search_candidates
from refusal_atlas.errors import RefusalAtlasError
from refusal_atlas.model.layout import find_layout

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


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
        draws[k] = _cosine(diff(t1, b1), diff(t2, b2))
        tp, bp, ht, hb = rng.permutation(len(t)), rng.permutation(len(b)), len(t) // 2, len(b) // 2
        halves[k] = _cosine(diff(tp[:ht], bp[:hb]), diff(tp[ht:], bp[hb:])) if min(ht, hb) > 0 else np.nan

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


# -------- Choosing (layer, position) --------


def select_fixed(layer: int | None, position: int | None, n_layers: int, offsets: Sequence[int]) -> dict:
    """Validate a hand-picked site. Returns ``{"method", "layer", "position", "position_index"}``."""
    if layer is None or position is None:
        raise DirectionError(
            "directions.select: fixed needs both directions.layer and directions.position; set them or use select: arditi."
        )
    if not 0 <= layer < n_layers:
        raise DirectionError(
            f"directions.layer={layer} is out of range for this model with {n_layers} layers (valid 0..{n_layers - 1})"
        )
    offsets = list(offsets)
    if position not in offsets:
        raise DirectionError(
            f"directions.position={position} is not an end-of-instruction position of this chat template; "
            f"the span is {offsets[0]}..{offsets[-1]} ({len(offsets)} tokens)"
        )
    return {"method": "fixed", "layer": layer, "position": position, "position_index": offsets.index(position)}


def filter_candidates(
    table: Sequence[dict], n_layers: int, max_layer_fraction: float, kl_threshold: float
) -> tuple[list[dict], dict]:
    """Annotate Arditi candidates with ``kept`` and ``reason`` (first failing rule, else None).

    Each row needs ``layer``, ``bypass``, ``induce`` and ``kl`` (NaN where not scored), and may
    say ``scored: False`` (the search never reached it: a lower-bypass candidate passed first).
    Rules, in order: ``layer`` (layer >= max_layer_fraction · n_layers), ``not_scored`` (not
    reached, with a finite bypass), ``kl`` (kl > kl_threshold), ``induce`` (induce <= 0),
    ``nan`` (a score needed to keep the row is NaN: an undefined direction, a non-finite
    score; a row rejected at kl or induce needs no further score). Returns (new rows, counts
    per reason and ``kept``).
    """
    rows, counts = [], {"layer": 0, "nan": 0, "not_scored": 0, "kl": 0, "induce": 0, "kept": 0}
    missing = lambda s: s is None or math.isnan(s)  # noqa: E731
    for row in table:
        if row["layer"] >= max_layer_fraction * n_layers:
            reason = "layer"
        elif row.get("scored") is False and not missing(row["bypass"]):
            reason = "not_scored"
        elif not missing(row["kl"]) and row["kl"] > kl_threshold:
            reason = "kl"
        elif not missing(row["induce"]) and row["induce"] <= 0:
            reason = "induce"
        elif any(missing(row[k]) for k in ("bypass", "kl", "induce")):
            reason = "nan"
        else:
            reason = None
        counts[reason or "kept"] += 1
        rows.append({**row, "kept": reason is None, "reason": reason})
    return rows, counts


def choose_candidate(rows: Sequence[dict], fallback: str = "relax_induce") -> dict:
    """The kept row with the lowest bypass. If none is kept, with ``fallback="relax_induce"``
    the filters are relaxed one at a time, induce first: the lowest bypass among the rows that
    fail only induce (they keep the model's benign behaviour, kl, but adding them does not make
    refusal likelier, as on a model that rarely refuses), else the lowest finite bypass of all;
    with ``"lowest_bypass"`` the lowest finite bypass of all.

    Returns ``{"row": dict, "fallback": bool, "fallback_reason": str | None}``; raises
    DirectionError if no row has a finite bypass score.
    """
    kept = [r for r in rows if r["kept"]]
    if kept:
        return {"row": min(kept, key=lambda r: r["bypass"]), "fallback": False, "fallback_reason": None}
    finite = [r for r in rows if r["bypass"] is not None and not math.isnan(r["bypass"])]
    if not finite:
        raise DirectionError(
            "no candidate (layer, position) could be scored (all directions undefined or NaN); check the activations"
        )
    reasons = {}
    for r in rows:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    why = (
        "no candidate passed the filters ("
        + ", ".join(f"{k}: {v}" for k, v in reasons.items())
        + "); chose the lowest bypass score among "
    )
    relaxed = [r for r in finite if r["reason"] == "induce"] if fallback == "relax_induce" else []
    if relaxed:
        return {
            "row": min(relaxed, key=lambda r: r["bypass"]),
            "fallback": True,
            "fallback_reason": why + f"the {len(relaxed)} that pass kl (the induce filter relaxed)",
        }
    return {
        "row": min(finite, key=lambda r: r["bypass"]),
        "fallback": True,
        "fallback_reason": why + "all scored candidates",
    }


def select_arditi(
    model: nn.Module,
    tokenizer,
    units: np.ndarray,
    norms: np.ndarray,
    harmful_val_formatted: list[str],
    benign_val_formatted: list[str],
    refusal_token_ids: list[int],
    batch_size: int,
    max_layer_fraction: float,
    kl_threshold: float,
    offsets: Sequence[int],
    max_prompt_tokens: int | None = None,
    progress: bool = False,
    order: str | None = None,
    fallback: str = "relax_induce",
) -> dict:
    """Arditi et al.'s output-based choice of (layer, position) among candidate directions.

    Inputs: ``units`` [L or L+1, P, d] and ``norms`` [same, P] (row L, the final residual, is
    never a candidate); validation prompts already chat-formatted; ``offsets`` the P negative
    positions. For each candidate (l < L, every position) with a defined direction and
    l < max_layer_fraction · L (later ones are not evaluated, to save time):

    - bypass = mean refusal score on harmful prompts with the unit direction ablated everywhere;
    - induce = mean refusal score on benign prompts with ``unit * norm`` (the raw mean
      difference) added at the input of block l;
    - kl = mean first-token KL(unhooked || ablated) on benign prompts (unhooked computed once).

    ``filter_candidates`` then drops rows and the kept one with the lowest bypass wins. If none
    survives (Arditi et al.'s code stops there), ``choose_candidate`` chooses by ``fallback``
    and returns its choice with ``fallback: True`` and the reason, rather than failing.

    Only the scores the choice needs are computed (``site_scores.search_candidates``; ``order``
    forces its bypass-first or filters-first order, None lets it pick): rows the search never
    reached have reason ``not_scored``, a row rejected at kl or induce may have no bypass, and
    kl stops early where it is proven over the threshold (``kl_prompts`` then counts the
    prompts behind that lower bound). The choice is the same as scoring everything; see
    site_scores for how float rounding is kept from changing it. Returns ``{"method", "layer",
    "position", "position_index", "score" (its bypass), "bypass", "induce", "kl", "fallback",
    "fallback_reason", "counts", "table", "baseline_harmful", "baseline_benign", "n_scored",
    "search_order", "n_val"}``, ``n_scored`` counting candidates scored per score, reference
    re-scorings and tokens run.
    """
    n_layers, offsets = find_layout(model).n_layers, list(offsets)
    if (
        units.shape[0] not in (n_layers, n_layers + 1)
        or units.shape[1] != len(offsets)
        or norms.shape != units.shape[:2]
    ):
        raise DirectionError(
            f"select_arditi: units {units.shape} / norms {norms.shape} do not match {n_layers} layers and positions {offsets}"
        )
    table, sites = [], []
    for l in range(n_layers):
        for p in range(len(offsets)):
            table.append(
                {
                    "layer": l,
                    "position": offsets[p],
                    "position_index": p,
                    "bypass": math.nan,
                    "induce": math.nan,
                    "kl": math.nan,
                    "kl_prompts": 0,
                    "scored": False,
                }
            )
            unit = torch.from_numpy(np.asarray(units[l, p], dtype=np.float32))
            if l < max_layer_fraction * n_layers and float(norms[l, p]) > 0 and bool(torch.isfinite(unit).all()):
                sites.append((len(table) - 1, unit, unit * float(norms[l, p])))
    scorer = CandidateScorer(
        model,
        tokenizer,
        torch.stack([u for _, u, _ in sites]) if sites else torch.zeros(0, units.shape[-1]),
        torch.stack([v for _, _, v in sites]) if sites else torch.zeros(0, units.shape[-1]),
        [table[i]["layer"] for i, _, _ in sites],
        harmful_val_formatted,
        benign_val_formatted,
        refusal_token_ids,
        batch_size,
        max_prompt_tokens,
        progress,
    )
    search = search_candidates(scorer, list(range(len(sites))), kl_threshold, order, fallback)
    for (i, _, _), score in zip(sites, search["rows"]):
        table[i].update(score)
    rows, counts = filter_candidates(table, n_layers, max_layer_fraction, kl_threshold)
    chosen = choose_candidate(rows, fallback)
    best = chosen["row"]
    return {
        "method": "arditi",
        "layer": best["layer"],
        "position": best["position"],
        "position_index": best["position_index"],
        "score": best["bypass"],
        "bypass": best["bypass"],
        "induce": best["induce"],
        "kl": best["kl"],
        "fallback": chosen["fallback"],
        "fallback_reason": chosen["fallback_reason"],
        "counts": counts,
        "table": rows,
        "baseline_harmful": scorer.baseline_harmful,
        "baseline_benign": scorer.baseline_benign,
        "n_scored": dict(scorer.tally),
        "search_order": search["order"],
        "kl_threshold": kl_threshold,
        "n_val": {"harmful": len(harmful_val_formatted), "benign": len(benign_val_formatted)},
    }


def select_cosmic(
    harmful_means: np.ndarray,
    harmless_means: np.ndarray,
    units: np.ndarray,
    max_layer_fraction: float,
    n_layers_considered: int | None = None,
    n_layers: int | None = None,
    offsets: Sequence[int] | None = None,
) -> dict:
    """COSMIC-style output-free choice of (layer, position), computed on class means alone.

    Inputs: class means H, B [R, P, d] (e.g. ``compute_means`` of harmful and harmless
    activations) and candidate ``units`` [R, P, d]; ``n_layers`` = L, the number of blocks
    (default R − 1: rows as stored, the last being the final residual); ``offsets`` the P
    positions (default -P..-1).

    1. Evaluation layers S: among rows l < min(L, max_layer_fraction · L), the
       ``n_layers_considered`` (default max(1, ⌊0.1 · L⌋)) with the lowest
       sim(l) = mean_p cos(H[l,p], B[l,p]).
    2. Each candidate c = (l, p) with l < max_layer_fraction · L and a defined direction u is
       applied to the means at every (l', p') with l' ∈ S, as if the intervention reached them
       unchanged through the residual stream: v = ((H[l,p] − B[l,p])·u) u is the candidate's
       mean shift, and
         comply(c) = mean_{l'∈S, p'} cos(H[l',p'] − (H[l',p']·u) u, B[l',p'])   (ablate from harmful)
         refuse(c) = mean_{l'∈S, p'} cos(B[l',p'] + v, H[l',p'])                (add to harmless)
         score(c)  = (comply(c) + refuse(c)) / 2.
    3. The candidate with the highest score wins.

    As in COSMIC, ablation leaves the harmless mean's own component along u, so comply is
    highest for directions along which the harmless mean barely projects. Cosines are of
    uncentred means, so scores sit close to 1 and only their ranking matters.

    Returns ``{"method", "layer", "position", "position_index", "score", "eval_layers",
    "layer_similarity" [R], "table": [{layer, position, position_index, comply, refuse, score}]}``.
    """
    if not harmful_means.shape == harmless_means.shape == units.shape:
        raise DirectionError(
            f"select_cosmic: means {harmful_means.shape}/{harmless_means.shape} and units {units.shape} must match"
        )
    rows, n_pos = units.shape[:2]
    n_layers = rows - 1 if n_layers is None else n_layers
    offsets = list(range(-n_pos, 0)) if offsets is None else list(offsets)
    h, b = harmful_means.astype(np.float64), harmless_means.astype(np.float64)
    eligible = [l for l in range(min(n_layers, rows)) if l < max_layer_fraction * n_layers]
    similarity = np.nanmean(_cosine(h, b), axis=1)  # [R]
    ranked = [l for l in sorted(eligible, key=lambda l: similarity[l]) if np.isfinite(similarity[l])]
    if not ranked:
        raise DirectionError(
            f"select_cosmic: no layer below max_layer_fraction={max_layer_fraction} of {n_layers} has defined class means"
        )
    k = n_layers_considered or max(1, int(0.1 * n_layers))
    s = sorted(ranked[:k])
    hs, bs = h[s], b[s]  # [|S|, P, d]
    table = []
    for l in eligible:
        for p in range(n_pos):
            u = units[l, p].astype(np.float64)
            if not np.linalg.norm(u) > 0:
                continue
            v = np.dot(h[l, p] - b[l, p], u) * u
            comply = float(np.nanmean(_cosine(hs - np.einsum("spd,d->sp", hs, u)[..., None] * u, bs)))
            refuse = float(np.nanmean(_cosine(bs + v, hs)))
            table.append(
                {
                    "layer": l,
                    "position": offsets[p],
                    "position_index": p,
                    "comply": comply,
                    "refuse": refuse,
                    "score": (comply + refuse) / 2,
                }
            )
    if not table:
        raise DirectionError("select_cosmic: every candidate direction is undefined (zero); check the activations")
    best = max(table, key=lambda r: r["score"])
    return {
        "method": "cosmic",
        **{k: best[k] for k in ("layer", "position", "position_index", "score")},
        "eval_layers": s,
        "layer_similarity": similarity,
        "table": table,
    }
