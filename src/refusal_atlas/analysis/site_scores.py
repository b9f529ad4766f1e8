"""Arditi et al.'s candidate scores (bypass, kl, induce), computed lazily, batched and prefix-shared.

``select_arditi`` (analysis/sites.py) needs, per candidate site c = (layer, position) with unit
direction u_c and mean difference v_c = u_c · norm_c:

- bypass(c): mean first-token refusal log-odds on harmful prompts with u_c ablated everywhere;
- kl(c): mean first-token KL(unhooked || ablated) on benign prompts;
- induce(c): mean refusal log-odds on benign prompts with v_c added at the input of block l.

Only the lowest-bypass candidate that passes the filters (kl <= threshold, induce > 0) matters,
so ``search_candidates`` scores only what that choice needs, in one of two orders:

- bypass first: bypass for every candidate, then kl (and induce where kl passes) by rising
  bypass until one passes. Cheap where most candidates pass (the demo);
- filters first: kl for every candidate, induce where kl passes, bypass only where both pass.
  Cheap where most fail (SmolLM2 fails kl on about 90% of its candidates).

A screen of kl on the first ``SCREEN_PROMPTS`` benign prompts of every candidate picks the
order: filters first when it already rejects ``SCREEN_SHARE`` of them. Both orders choose
the same site as scoring everything. kl is scored prompt by prompt and stops for a candidate
once its partial sum proves kl > threshold (every prompt's KL is >= 0), so a rejected
candidate's kl is a lower bound from ``kl_prompts`` of the prompts.

The fast scores run many candidates in one forward pass (one direction per batch row:
``ablate_rows``/``add_rows``) and run the prompts' shared template prefix once per candidate
(``score_prefixed_rows``). They differ from the one-candidate-at-a-time reference
(``refusal_scores`` under ``ablate_directions``/``add_direction``) by float rounding only. So that
the chosen site is exactly the reference's, every comparison that rounding could flip is
re-decided with reference scores: bypass values within ``RESCORE_TOLERANCE`` of one another
(their order), kl within it of the threshold, induce within it of 0, and any non-finite fast score.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from refusal_atlas.model.generation import (
    encode_prefixed,
    first_token_logprobs,
    kl_rows,
    refusal_log_odds,
    refusal_scores,
    score_prefixed_rows,
)
from refusal_atlas.model.hooks import ablate_directions, ablate_rows, add_direction, add_rows

# Relative band, per model dtype, inside which a fast score is not trusted to decide a
# comparison (|a - b| <= tol · max(1, |a|, |b|)) and the reference score decides instead.
# float32 fast and reference scores differ by at most ~2e-6 relative (1e-5 absolute on
# log-odds near 4) on SmolLM2-135M and ~1e-7 on the tiny test models, so 1e-4 leaves a margin
# of 50x; half precision rounds each residual to ~3 significant digits. Every reference
# re-score also measures the gap (``tally["max_gap"]``), and a gap over half the band warns.
RESCORE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
RESCORE_TOLERANCE_HALF = 5e-2


def mean_kl(base: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over prompts of KL(base || other) from log-probabilities [n, vocab], in float64."""
    return float(kl_rows(base.double(), other.double()).mean())


def _near(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


class CandidateScorer:
    """Fast (batched) and reference (one at a time) scores of candidate sites.

    Inputs: ``units`` [C, d] float32 unit directions, ``vectors`` [C, d] float32 (unit · norm,
    what induce adds) and ``layers`` [C], one per candidate; harmful and benign prompts already
    chat-formatted. Each prompt set is tokenised once. ``tally`` counts forward work:
    ``tokens``/``padded_tokens`` run by the fast path and ``bypass``/``kl``/``induce``
    candidates scored fast, ``rescored`` reference scores, and ``max_gap``, the widest relative
    gap seen between a fast score and its reference re-score.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        units: torch.Tensor,
        vectors: torch.Tensor,
        layers: Sequence[int],
        harmful: list[str],
        benign: list[str],
        token_ids: list[int],
        batch_size: int,
        max_prompt_tokens: int | None,
        progress: bool = False,
    ):
        self.progress = progress
        self.model, self.tokenizer, self.token_ids = model, tokenizer, list(token_ids)
        self.units, self.vectors, self.layers = units, vectors, list(layers)
        self.harmful_text, self.benign_text = harmful, benign
        self.batch_size, self.max_prompt_tokens = batch_size, max_prompt_tokens
        self.harmful, self.benign = (
            encode_prefixed(tokenizer, harmful, max_prompt_tokens),
            encode_prefixed(tokenizer, benign, max_prompt_tokens),
        )
        # The unhooked scores come from the reference path, so the baselines are today's numbers exactly.
        self.base_benign = first_token_logprobs(
            model, tokenizer, benign, batch_size, max_prompt_tokens
        )  # [n_benign, vocab]
        self.baseline_harmful = float(
            np.mean(refusal_scores(model, tokenizer, harmful, self.token_ids, batch_size, max_prompt_tokens))
        )
        self.baseline_benign = float(np.mean(refusal_log_odds(self.base_benign, self.token_ids).numpy()))
        dtype = next(model.parameters()).dtype
        self.tolerance = RESCORE_TOLERANCE.get(dtype, RESCORE_TOLERANCE_HALF)
        self.tally = {"tokens": 0, "padded_tokens": 0, "bypass": 0, "kl": 0, "induce": 0, "rescored": 0, "max_gap": 0.0}
        # kl runs prompt by prompt in this order (longest suffix first), keeping each candidate's
        # partial sum and how many prompts it covers; a candidate proven over the threshold stops.
        n = len(self.benign.suffixes)
        self.kl_order = sorted(range(n), key=lambda i: (-len(self.benign.suffixes[i]), i))
        self.kl_sum: dict[int, float] = {}
        self.kl_done: dict[int, int] = {}
        self.kl_stopped: set[int] = set()

    # -------- fast: many candidates per forward pass --------

    def _rows_per_pass(self, prompts) -> int:
        # Suffixes are shorter than whole prompts, so as many rows fit in the memory that
        # batch_size whole prompts take (tokens per pass, and attention rows x keys).
        full, suffix = max(prompts.lengths), max(len(s) for s in prompts.suffixes)
        return max(1, self.batch_size * full // suffix)

    def _fast(self, what: str, candidates: Sequence[int], prompts, intervene, reduce) -> np.ndarray:
        """Mean over prompts of ``reduce`` per candidate: float64 [len(candidates)]."""
        if not candidates:
            return np.empty(0)
        n, rows_per_pass = len(prompts.suffixes), self._rows_per_pass(prompts)
        order = sorted(range(n), key=lambda i: (-len(prompts.suffixes[i]), i))  # longest suffixes first
        # Rows go prompt by prompt, each prompt under every candidate, so a pass holds one or
        # two suffix lengths (almost no padding); score_prefixed_rows runs each candidate's
        # prefix once for all passes.
        row_prompt = [i for i in order for _ in candidates]
        row_group = [c for _ in order for c in candidates]
        with tqdm(
            total=len(row_prompt),
            desc=f"select directions: {what} of {len(candidates)}",
            unit="row",
            disable=not self.progress,
            leave=False,
        ) as bar:
            values = score_prefixed_rows(
                self.model, prompts, row_prompt, row_group, intervene, reduce, rows_per_pass, self.tally, bar.update
            )
        sums = {c: 0.0 for c in candidates}
        for c, value in zip(row_group, values):
            sums[c] += value
        return np.array([sums[c] / n for c in candidates])

    def fast_bypass(self, candidates: Sequence[int]) -> np.ndarray:
        self.tally["bypass"] += len(candidates)
        return self._fast(
            "bypass",
            candidates,
            self.harmful,
            lambda g: ablate_rows(self.model, self.units[g]),
            lambda logp, idx: refusal_log_odds(logp, self.token_ids),
        )

    def advance_kl(self, candidates: Sequence[int], upto: int, threshold: float) -> None:
        """Score kl of ``candidates`` on benign prompts ``kl_order[kl_done[c]:upto]``, stopping a
        candidate as soon as its partial sum proves kl > ``threshold`` (beyond the rounding band)."""
        n = len(self.kl_order)
        upto = min(upto, n)
        live = [c for c in candidates if c not in self.kl_stopped and self.kl_done.get(c, 0) < upto]
        if not live:
            return
        self.tally["kl"] += sum(c not in self.kl_done for c in live)
        # Prompt-major rows: each pass covers the next prompt(s) of every live candidate, so a
        # candidate that fails on its first prompts never runs the rest.
        row_prompt, row_group = [], []
        for j in range(min(self.kl_done.get(c, 0) for c in live), upto):
            for c in live:
                if self.kl_done.get(c, 0) <= j:
                    row_prompt.append(self.kl_order[j])
                    row_group.append(c)

        def on_values(rows, values):
            for r, value in zip(rows, values):
                c = row_group[r]
                self.kl_sum[c] = self.kl_sum.get(c, 0.0) + float(value)
                self.kl_done[c] = self.kl_done.get(c, 0) + 1
                bound = self.kl_sum[c] / n  # a lower bound of kl until every prompt is in
                if self.kl_done[c] < n and bound > threshold and not _near(bound, threshold, self.tolerance):
                    self.kl_stopped.add(c)

        with tqdm(
            total=len(row_prompt),
            desc=f"select directions: kl of {len(live)}",
            unit="row",
            disable=not self.progress,
            leave=False,
        ) as bar:
            score_prefixed_rows(
                self.model,
                self.benign,
                row_prompt,
                row_group,
                lambda g: ablate_rows(self.model, self.units[g]),
                lambda logp, idx: kl_rows(self.base_benign[idx].to(logp.device).double(), logp.double()),
                self._rows_per_pass(self.benign),
                self.tally,
                bar.update,
                skip=lambda r: row_group[r] in self.kl_stopped,
                on_values=on_values,
            )

    def kl(self, c: int) -> tuple[float, int]:
        """(kl, number of benign prompts behind it): the mean when all are in, else a lower bound."""
        return self.kl_sum.get(c, math.nan) / len(self.kl_order), self.kl_done.get(c, 0)

    def fast_induce(self, candidates: Sequence[int]) -> np.ndarray:
        self.tally["induce"] += len(candidates)
        return self._fast(
            "induce",
            candidates,
            self.benign,
            lambda g: add_rows(self.model, [self.layers[c] for c in g], self.vectors[g]),
            lambda logp, idx: refusal_log_odds(logp, self.token_ids),
        )

    # -------- reference: today's path, one candidate at a time --------

    def _score(self, formatted: list[str]) -> float:
        return float(
            np.mean(
                refusal_scores(
                    self.model, self.tokenizer, formatted, self.token_ids, self.batch_size, self.max_prompt_tokens
                )
            )
        )

    def reference_bypass(self, c: int) -> float:
        self.tally["rescored"] += 1
        with ablate_directions(self.model, self.units[c][None]):
            return self._score(self.harmful_text)

    def reference_kl(self, c: int) -> float:
        self.tally["rescored"] += 1
        with ablate_directions(self.model, self.units[c][None]):
            return mean_kl(
                self.base_benign,
                first_token_logprobs(
                    self.model, self.tokenizer, self.benign_text, self.batch_size, self.max_prompt_tokens
                ),
            )

    def reference_induce(self, c: int) -> float:
        self.tally["rescored"] += 1
        with add_direction(self.model, self.layers[c], self.vectors[c]):
            return self._score(self.benign_text)


def _checked(scorer: CandidateScorer, fast: float, reference: float, what: str) -> float:
    """``reference``, after recording its gap to the finite ``fast`` score and warning if it is too wide for the
    band."""
    if math.isfinite(fast) and math.isfinite(reference):
        gap = abs(fast - reference) / max(1.0, abs(fast), abs(reference))
        scorer.tally["max_gap"] = max(scorer.tally["max_gap"], gap)
        if gap > scorer.tolerance / 2:
            warnings.warn(
                f"select_arditi: a fast {what} score differs from the reference by {gap:.2g} (relative), more than "
                f"half the re-scoring band {scorer.tolerance:g}; the chosen site may differ from a one-at-a-time scan. "
                "Raise site_scores.RESCORE_TOLERANCE for this dtype.",
                stacklevel=3,
            )
    return reference


def _clusters(values: dict[int, float], tol: float) -> list[list[int]]:
    """Candidates sorted by (value, index), cut where neighbours are further apart than ``tol``."""
    ordered = sorted(values, key=lambda c: (values[c], c))
    out: list[list[int]] = []
    for c in ordered:
        if out and _near(values[out[-1][-1]], values[c], tol):
            out[-1].append(c)
        else:
            out.append([c])
    return out


SCREEN_PROMPTS = 2
SCREEN_SHARE = 1 / 3


def search_candidates(
    scorer: CandidateScorer,
    candidates: Sequence[int],
    kl_threshold: float,
    order: str | None = None,
    fallback: str = "relax_induce",
) -> dict:
    """Scores of candidates ``0..C-1`` (``scorer``'s indices) as the Arditi search leaves them.

    ``order``: ``"bypass_first"``, ``"filters_first"`` or None (the kl screen picks; see the
    module docstring). Returns ``{"order", "rows"}``, ``rows`` holding per candidate
    ``{"bypass", "kl", "induce": float (NaN where not scored), "kl_prompts": int (benign prompts
    behind kl; fewer than all where kl stopped early, its value then a lower bound),
    "scored": bool}``, ``scored`` being whether the search reached it. Every candidate that
    could change the choice is reached; where none passes the filters, every candidate that
    the fallback (``sites.choose_candidate``, by ``fallback``) chooses among gets bypass.
    """
    out = [
        {"bypass": math.nan, "kl": math.nan, "induce": math.nan, "kl_prompts": 0, "scored": False}
        for _ in range(len(scorer.layers))
    ]
    candidates = list(candidates)
    if order is None:
        scorer.advance_kl(candidates, SCREEN_PROMPTS, kl_threshold)
        stopped = sum(c in scorer.kl_stopped for c in candidates)
        order = "filters_first" if candidates and stopped >= SCREEN_SHARE * len(candidates) else "bypass_first"
    if order == "filters_first":
        _filters_first(scorer, candidates, kl_threshold, out, relax_induce=fallback == "relax_induce")
    else:
        _bypass_first(scorer, candidates, kl_threshold, out)
    return {"order": order, "rows": out}


def _decide_kl(scorer: CandidateScorer, c: int, row: dict, kl_threshold: float) -> bool:
    """Record kl of a candidate whose kl is scored (or stopped); return whether it passes."""
    row["scored"] = True
    row["kl"], row["kl_prompts"] = scorer.kl(c)
    if row["kl_prompts"] == len(scorer.kl_order) and (
        not math.isfinite(row["kl"]) or _near(row["kl"], kl_threshold, scorer.tolerance)
    ):
        row["kl"] = _checked(scorer, row["kl"], scorer.reference_kl(c), "kl")
    return row["kl"] <= kl_threshold  # False for NaN


def _decide_induce(scorer: CandidateScorer, c: int, row: dict, fast: float) -> bool:
    row["induce"] = float(fast)
    if not math.isfinite(row["induce"]) or _near(row["induce"], 0.0, scorer.tolerance):
        row["induce"] = _checked(scorer, row["induce"], scorer.reference_induce(c), "induce")
    return row["induce"] > 0


def _score_bypass(scorer: CandidateScorer, candidates: list[int], out: list[dict]) -> list[list[int]]:
    """Bypass of ``candidates`` (reference where the fast score is not finite), as clusters of
    near-equal values by rising bypass; the lowest cluster is ordered by reference scores."""
    for c, value in zip(candidates, scorer.fast_bypass(candidates)):
        out[c]["bypass"] = float(value) if math.isfinite(value) else scorer.reference_bypass(c)
    clusters = _clusters({c: out[c]["bypass"] for c in candidates if math.isfinite(out[c]["bypass"])}, scorer.tolerance)
    for c in candidates:
        out[c]["scored"] = out[c]["scored"] or not math.isfinite(out[c]["bypass"])  # rejected as NaN
    return clusters


def _settle(scorer: CandidateScorer, group: list[int], out: list[dict]) -> list[int]:
    """A cluster of near-equal bypass values in the order of their reference scores."""
    if len(group) > 1:
        for c in group:
            out[c]["bypass"] = _checked(scorer, out[c]["bypass"], scorer.reference_bypass(c), "bypass")
        group.sort(key=lambda c: (out[c]["bypass"], c))
    return group


def _filters_first(
    scorer: CandidateScorer, candidates: list[int], kl_threshold: float, out: list[dict], relax_induce: bool
) -> None:
    scorer.advance_kl(candidates, len(scorer.kl_order), kl_threshold)
    kl_ok = [c for c in candidates if _decide_kl(scorer, c, out[c], kl_threshold)]
    passed = [c for c, value in zip(kl_ok, scorer.fast_induce(kl_ok)) if _decide_induce(scorer, c, out[c], value)]
    clusters = _score_bypass(scorer, passed, out)
    if clusters:  # the winner is the lowest bypass among the candidates that pass
        _settle(scorer, clusters[0], out)
        return
    # Nothing passes: the fallback (as choose_candidate) is the lowest bypass among those that
    # fail only induce, else (or with relax_induce False) among all.
    relaxed = [c for c in kl_ok if math.isfinite(out[c]["induce"])] if relax_induce else []
    for group in (relaxed, [c for c in candidates if c not in relaxed]):
        clusters = _score_bypass(scorer, group, out)
        if clusters:
            _settle(scorer, clusters[0], out)
            return


def _bypass_first(scorer: CandidateScorer, candidates: list[int], kl_threshold: float, out: list[dict]) -> None:
    n = len(scorer.kl_order)
    clusters = _score_bypass(scorer, candidates, out)
    pending: list[int] = []
    # Candidates are visited in chunks that start at one pass's worth of rows and double up to
    # eight passes: on a model where many candidates fail kl or induce, one candidate at a time
    # would run half-empty, padded passes. Scores past the winner in its chunk are dropped, so
    # the result does not depend on the chunk size.
    chunk = max(1, scorer._rows_per_pass(scorer.benign) // n)
    cap = 8 * chunk
    while pending or clusters:
        # Fill the next chunk in visiting order. A cluster of near-equal bypass values is
        # ordered by reference bypass before any of it is visited; a chunk stops before a
        # cluster that would need that, unless the chunk is still empty.
        while clusters and len(pending) < chunk and (not pending or len(clusters[0]) == 1):
            pending.extend(_settle(scorer, clusters.pop(0), out))
        visit, pending = pending[:chunk], pending[chunk:]
        scorer.advance_kl(visit, n, kl_threshold)
        maybe = [c for c in visit if _decide_kl(scorer, c, out[c], kl_threshold)]
        fast_induce = dict(zip(maybe, scorer.fast_induce(maybe)))
        for k, c in enumerate(visit):
            if c in fast_induce and _decide_induce(scorer, c, out[c], fast_induce[c]):
                for later in visit[k + 1 :]:  # the winner: what the chunk scored beyond it is dropped
                    out[later].update(kl=math.nan, induce=math.nan, kl_prompts=0, scored=False)
                return
        chunk = min(2 * chunk, cap)
