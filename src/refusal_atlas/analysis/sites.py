"""Choosing where a direction acts, (layer, position): a fixed site, COSMIC, or Arditi et al.'s search.

Inputs are a direction's unit vectors and norms at every layer and position (as
``analysis.directions.compute_direction`` returns them); ``select_arditi`` scores candidates
with the model (``analysis.site_scores``), the others need only activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from refusal_atlas.analysis.directions import DirectionError, cosine_rows
from refusal_atlas.analysis.site_scores import CandidateScorer, search_candidates
from refusal_atlas.model.layout import find_layout

# -------- Choosing (layer, position) --------


def select_fixed(layer: int | None, position: int | None, n_layers: int, offsets: Sequence[int]) -> dict:
    """Validate a hand-picked site. Returns ``{"method", "layer", "position", "position_index"}``."""
    if layer is None or position is None:
        raise DirectionError(
            "directions.select: fixed needs both directions.layer and directions.position; set them or use select: "
            "arditi."
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
            f"select_arditi: units {units.shape} / norms {norms.shape} do not match {n_layers} layers and positions "
            f"{offsets}"
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
    similarity = np.nanmean(cosine_rows(h, b), axis=1)  # [R]
    ranked = [l for l in sorted(eligible, key=lambda l: similarity[l]) if np.isfinite(similarity[l])]
    if not ranked:
        raise DirectionError(
            f"select_cosmic: no layer below max_layer_fraction={max_layer_fraction} of {n_layers} has defined class "
            "means"
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
            comply = float(np.nanmean(cosine_rows(hs - np.einsum("spd,d->sp", hs, u)[..., None] * u, bs)))
            refuse = float(np.nanmean(cosine_rows(bs + v, hs)))
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
