"""One direction's steering evaluation: every intervention, judged, styled, with KL cost.

The 'baseline' intervention is the unsteered behaviour already measured by the baseline
stage (its verdicts define the buckets), so it is not generated again here. Every other
intervention (activation addition at each alpha, directional ablation) generates
greedily under its hook context, chunk by chunk, resumably.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from refusal_atlas.config import ModelConfig, SteeringConfig
from refusal_atlas.data.atomic import write_json, write_parquet
from refusal_atlas.judging.behaviour import fingerprint, generate_scored_resumable, judge_table
from refusal_atlas.judging.judges import ClassifierJudge
from refusal_atlas.judging.styles import dominant_style, style_distribution
from refusal_atlas.model.chat import format_prompts
from refusal_atlas.model.generation import first_token_logprobs
from refusal_atlas.steering.interventions import (
    SteeringError,
    build_eval_set,
    compute_rates,
    intervention,
    intervention_alpha,
    intervention_names,
    teacher_forced_kls,
    transition_matrix,
)


@dataclass
class EvalSet:
    """The prompts every direction is evaluated on, with their unsteered behaviour (``build_steering_set``)."""

    frame: pd.DataFrame  # build_eval_set's rows: prompt_id, category, role, bucket, in_buckets
    counts: dict  # build_eval_set's counts
    prompts: list[str]  # the raw user prompts (the classifier judge reads them)
    formatted: list[str]  # the same, chat-formatted
    baseline_responses: list[str]
    baseline_verdicts: pd.DataFrame  # refused, judge_* and refusal_score of the baseline stage
    answered: set  # ids the unsteered model answered (their refusals under steering are induced)


@dataclass
class Judging:
    """How steered responses are judged: refused or not, the refusal score, and the style."""

    judges: Sequence[str]  # judge.method
    refusal_ids: Sequence[int]  # first tokens of model.refusal_tokens
    classify: Callable[[Sequence[str], np.ndarray], np.ndarray]  # style of each response
    classifier: ClassifierJudge | None = None  # the model judge, when judge.method names it


def build_steering_set(
    baseline: pd.DataFrame, prompts: pd.DataFrame, tokenizer, cfg: SteeringConfig, mcfg: ModelConfig
) -> EvalSet:
    """The eval set (``build_eval_set``) with its texts, formatted prompts and baseline verdicts.

    ``baseline``: the baseline stage's responses table; ``prompts``: the prompt table.
    """
    frame, counts = build_eval_set(baseline, cfg.n_per_bucket, cfg.seed, cfg.controlled_only)
    rows = baseline.set_index("prompt_id").loc[frame.prompt_id]
    texts = prompts.set_index("prompt_id").loc[frame.prompt_id, "text"].tolist()
    formatted = format_prompts(tokenizer, texts, mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
    verdicts = rows[["refused"] + [c for c in rows.columns if c.startswith("judge_")] + ["refusal_score"]]
    answered = set(frame.prompt_id[~rows.refused.to_numpy(dtype=bool)])
    return EvalSet(frame, counts, texts, formatted, rows.response.tolist(), verdicts, answered)


def site_files(folders: Sequence[Path]) -> dict[str, Path]:
    """Direction name -> its site record, over the site folders (the directions stage's, the sae stage's); a name
    in two folders is an error."""
    files: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")):
            if path.stem in files:
                raise SteeringError(
                    f"direction '{path.stem}' has a site record in both {files[path.stem].parent} and {folder}; "
                    "each name must come from one stage"
                )
            files[path.stem] = path
    return files


def steered_directions(available: Sequence[str], chosen: Sequence[str] | None) -> list[str]:
    """The directions to steer: every one the directions stage wrote, or ``steering.directions`` of them."""
    names = sorted(available)
    if chosen is None:
        return names
    if unknown := sorted(set(chosen) - set(names)):
        raise SteeringError(
            f"steering.directions names {unknown}, which the directions stage did not write; it wrote {names}. "
            "Fix steering.directions in params.yaml (null steers every direction)."
        )
    return [n for n in names if n in chosen]


def evaluate_directions(
    model, tokenizer, evalset: EvalSet, judging: Judging, sites: Mapping[str, dict], identity: dict,
    cfg: SteeringConfig, mcfg: ModelConfig, judge_settings: dict, out: Path, progress: bool = True,
) -> tuple[dict, list[str]]:  # fmt: skip
    """Evaluate every direction in ``sites`` (name -> ``load_site`` record) into ``out/<name>/``.

    Each ``metrics.json`` carries the fingerprint of its inputs (model identity, site, steering
    and judge settings): a direction whose inputs did not change is not evaluated again, and one
    cut short resumes at its last chunk (``out/<name>/.parts``). Folders of directions no longer
    steered are removed. Returns (summary per direction: interventions, style, eval_counts;
    the names evaluated now).
    """
    evaluated, summary = [], {}
    for name, record in sites.items():
        site = {k: v for k, v in record.items() if k != "unit"}
        folder = out / name
        key = fingerprint(identity, name, site, cfg.model_dump(exclude={"directions"}), judge_settings)
        metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else None
        if not (metrics and metrics.get("inputs_fingerprint") == key and (folder / "responses.parquet").is_file()):
            table, metrics = evaluate_direction(
                model, tokenizer, evalset, judging, record["unit"], site, cfg, mcfg,
                folder / ".parts", key, progress, name
            )  # fmt: skip
            style = induced_style(table, evalset.answered)
            metrics.update(
                {
                    "direction": name,
                    "site": site,
                    "eval_counts": evalset.counts,
                    "style": style,
                    "inputs_fingerprint": key,
                }
            )
            write_parquet(folder / "responses.parquet", table)
            write_json(folder / "metrics.json", metrics)
            shutil.rmtree(folder / ".parts", ignore_errors=True)
            evaluated.append(name)
        summary[name] = {k: v for k, v in metrics.items() if k in ("interventions", "style", "eval_counts")}
    for stale in sorted(p for p in out.iterdir() if p.is_dir() and p.name not in sites) if out.is_dir() else []:
        shutil.rmtree(stale)
    return summary, evaluated


def evaluate_direction(
    model, tokenizer, evalset: EvalSet, judging: Judging, unit: np.ndarray, site: dict,
    cfg: SteeringConfig, mcfg: ModelConfig, parts_dir: Path, key: object, progress: bool = True, label: str = "",
) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Run every intervention (``intervention_names(cfg.alphas)``) of one direction on the eval set.

    ``unit``: the direction at the site's layer; ``site``: its record (``layer``,
    ``mean_resid_norm``). Generation resumes from ``parts_dir`` chunks keyed by ``key``.

    Returns the long response table (prompt_id, intervention, alpha, response, refused,
    each judge's verdict, refusal_score, style) and the metrics: rates with CIs per
    intervention, bucket transitions, first-token and teacher-forced KL on benign prompts.
    """
    frame, formatted, baseline_responses = evalset.frame, evalset.formatted, evalset.baseline_responses
    layer, mean_norm, alpha_unit = site["layer"], site["mean_resid_norm"], cfg.alpha_unit
    batch_size, max_prompt_tokens, max_new_tokens = mcfg.batch_size, mcfg.max_prompt_tokens, cfg.max_new_tokens
    refusal_ids, judges, classifier, classify = (
        judging.refusal_ids,
        judging.judges,
        judging.classifier,
        judging.classify,
    )
    names, n_bootstrap, seed, prompts = intervention_names(cfg.alphas), cfg.n_bootstrap, cfg.seed, evalset.prompts
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
            judged = evalset.baseline_verdicts.reset_index(drop=True)
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
