"""One direction's steering evaluation: every intervention, judged, styled, with KL cost.

The 'baseline' intervention is the unsteered behaviour already measured by the baseline
stage (its verdicts define the buckets), so it is not generated again here. Every other
intervention (activation addition at each alpha, directional ablation) generates
greedily under its hook context, chunk by chunk, resumably.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from refusal_atlas.judging.behaviour import fingerprint, generate_scored_resumable, judge_table
from refusal_atlas.judging.judges import ClassifierJudge
from refusal_atlas.judging.styles import dominant_style, style_distribution
from refusal_atlas.model.generation import first_token_logprobs
from refusal_atlas.steering.interventions import (
    compute_rates,
    intervention,
    intervention_alpha,
    teacher_forced_kls,
    transition_matrix,
)


def evaluate_direction(
    model,
    tokenizer,
    frame: pd.DataFrame,
    formatted: Sequence[str],
    baseline_responses: Sequence[str],
    baseline_verdicts: pd.DataFrame,
    names: Sequence[str],
    unit: np.ndarray,
    layer: int,
    mean_norm: float,
    *,
    alpha_unit: str,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int,
    refusal_ids: Sequence[int],
    judges: Sequence[str],
    n_bootstrap: int,
    seed: int,
    parts_dir: Path,
    key: object,
    classify: Callable[[Sequence[str], np.ndarray], np.ndarray],
    prompts: Sequence[str] | None = None,
    classifier: ClassifierJudge | None = None,
    progress: bool = True,
    label: str = "",
) -> tuple[pd.DataFrame, dict]:
    """Run every intervention in ``names`` on the eval ``frame`` (one row per prompt, with ``formatted``).

    ``prompts`` (the raw user prompts behind ``formatted``) and ``classifier`` are needed
    only when ``judges`` includes ``classifier``; the judge model then sees each prompt
    with its steered response.

    Returns the long response table (prompt_id, intervention, alpha, response, refused,
    each judge's verdict, refusal_score, style) and the metrics: rates with CIs per
    intervention, bucket transitions, first-token and teacher-forced KL on benign prompts.
    """
    direction = torch.from_numpy(np.asarray(unit, dtype=np.float32))
    benign = (frame.role == "baseline").to_numpy()
    benign_prompts = [f for f, b in zip(formatted, benign) if b]
    benign_responses = [r for r, b in zip(baseline_responses, benign) if b]
    with torch.inference_mode():
        base_logprobs = first_token_logprobs(model, tokenizer, benign_prompts, batch_size, max_prompt_tokens)
    base_of = dict(
        zip(np.flatnonzero(benign).tolist(), base_logprobs)
    )  # row in formatted -> unsteered first-token log-probs

    rows, metrics, hooks_of = [], {"interventions": {}}, {}
    for name in names:
        kl = None
        if name == "baseline":
            responses = list(baseline_responses)
            judged = baseline_verdicts.reset_index(drop=True)
        else:
            hooks = hooks_of[name] = partial(intervention, model, name, layer, direction, alpha_unit, mean_norm)

            # The generation's prefill gives every prompt's refusal score and the benign prompts' first-token KL.
            responses, scores, kl = generate_scored_resumable(
                model,
                tokenizer,
                formatted,
                refusal_ids,
                max_new_tokens,
                batch_size,
                max_prompt_tokens,
                parts_dir,
                fingerprint(key, name),
                4 * batch_size,
                hooks=hooks,
                base_logprobs=base_of,
                desc=f"{label} {name}".strip(),
                progress=progress,
            )
            judged = judge_table(responses, scores, judges, classifier=classifier, prompts=prompts)
        refused = judged["refused"].to_numpy()
        styles = classify(responses, refused)
        entry = {**compute_rates(refused, frame, n_bootstrap, seed), "alpha": intervention_alpha(name)}
        entry["transitions"] = transition_matrix(frame, refused).to_dict()
        if kl is not None:
            entry["kl_first_token"] = float(np.nanmean(kl)) if len(kl) else float("nan")
        metrics["interventions"][name] = entry
        rows.append(
            pd.DataFrame(
                {
                    "prompt_id": frame.prompt_id.to_numpy(),
                    "category": frame.category.to_numpy(),
                    "bucket": frame.bucket.to_numpy(),
                    "in_buckets": frame.in_buckets.to_numpy(),
                    "intervention": name,
                    "alpha": entry["alpha"],
                    "response": responses,
                    **{c: judged[c].to_numpy() for c in judged.columns},
                    "style": styles,
                }
            )
        )
    # Teacher-forced KL on the unsteered benign responses: one unhooked pass per batch for all interventions.
    for name, kl in teacher_forced_kls(
        model, tokenizer, benign_prompts, benign_responses, hooks_of, batch_size, max_prompt_tokens
    ).items():
        metrics["interventions"][name]["kl_teacher_forced"] = float(np.nanmean(kl))
    return pd.concat(rows, ignore_index=True), metrics


def induced_style(table: pd.DataFrame, answered: set) -> dict:
    """How a direction makes the model refuse: the styles of the refusals activation addition induces.

    ``table``: ``evaluate_direction``'s response table; ``answered``: ids of the prompts the
    unsteered model answered (only their refusals were induced; a prompt it already refused
    keeps its own style). Returns ``{"distribution", "dominant", "purity", "n_induced",
    "all_refusals"}``, the last the style distribution of every refusal under addition.
    """
    added = table[table.intervention.str.startswith("add_") & table.refused]
    induced = added[added.prompt_id.isin(answered)]
    dominant, purity = dominant_style(induced["style"].to_numpy())
    return {
        "distribution": style_distribution(induced["style"].to_numpy()),
        "dominant": dominant,
        "purity": purity,
        "n_induced": len(induced),
        "all_refusals": style_distribution(added["style"].to_numpy()),
    }
