"""DVC stage `steering@<direction>`: activation addition at each alpha and directional ablation.

Evaluates one direction on the controlled set (HR/HC/BR/BC buckets of the test split,
plus every category's test prompts): responses, RR/ORR/Acc with bootstrap CIs, bucket
transitions, first-token and teacher-forced KL on benign prompts, and refusal styles.
Writes responses.parquet and metrics.json to artifacts/steering/<direction>/.
"""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.atlas import load_site
from refusal_atlas.atomic import write_json, write_parquet
from refusal_atlas.classifier import load_judge_classifier
from refusal_atlas.entry import load_stage_model, run_stage, stage_parser
from refusal_atlas.evaluation import evaluate_direction
from refusal_atlas.generation import refusal_token_ids
from refusal_atlas.models import format_prompts
from refusal_atlas.steering import build_eval_set, intervention_names
from refusal_atlas.styles import classify_styles, dominant_style, load_labelled, style_distribution, train_style_classifier

STAGE = "steering"


def main(args, params, run) -> None:
    cfg, mcfg = params.steering, params.model
    model, tokenizer, identity = load_stage_model(params, args.model)
    classifier = load_judge_classifier(params.judge, mcfg)
    site = load_site(args.site, identity["d_model"])
    unit = np.asarray(site.pop("unit"), dtype=np.float32)

    baseline = pd.read_parquet(args.baseline)
    frame, counts = build_eval_set(baseline, cfg.n_per_bucket, cfg.seed, cfg.controlled_only)
    rows = baseline.set_index("prompt_id").loc[frame.prompt_id]
    texts = pd.read_parquet(args.prompts).set_index("prompt_id").loc[frame.prompt_id, "text"].tolist()
    formatted = format_prompts(tokenizer, texts, mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
    exemplars = load_labelled(args.styles)
    clf = train_style_classifier(exemplars.text.tolist(), exemplars.label.tolist(), seed=cfg.seed)

    table, metrics = evaluate_direction(
        model, tokenizer, frame, formatted, rows.response.tolist(), rows[["refused"] + [c for c in rows.columns if c.startswith("judge_")] + ["refusal_score"]],
        intervention_names(cfg.alphas), unit, site["layer"], site["mean_resid_norm"],
        alpha_unit=cfg.alpha_unit, max_new_tokens=cfg.max_new_tokens, batch_size=mcfg.batch_size, max_prompt_tokens=mcfg.max_prompt_tokens,
        refusal_ids=refusal_token_ids(tokenizer, mcfg.refusal_tokens), judges=params.judge.method, n_bootstrap=cfg.n_bootstrap,
        seed=cfg.seed, parts_dir=args.out / ".parts", key=(identity, args.name, site, cfg.model_dump(), params.judge.model_dump()),
        classify=lambda responses, refused: classify_styles(clf, responses, refused), prompts=texts, classifier=classifier,
        progress=not args.no_progress,
    )
    # How this direction makes the model refuse: the refusals it induces under activation addition,
    # i.e. of prompts the unsteered model answered. Prompts it already refused keep their own style.
    added = table[table.intervention.str.startswith("add_") & table.refused]
    answered = set(frame.prompt_id[~rows.refused.to_numpy(dtype=bool)])
    induced = added[added.prompt_id.isin(answered)]
    dominant, purity = dominant_style(induced["style"].to_numpy())
    metrics.update({"direction": args.name, "site": site, "eval_counts": counts,
                    "style": {"distribution": style_distribution(induced["style"].to_numpy()), "dominant": dominant, "purity": purity,
                              "n_induced": len(induced), "all_refusals": style_distribution(added["style"].to_numpy())}})
    write_parquet(args.out / "responses.parquet", table)
    write_json(args.out / "metrics.json", metrics)
    shutil.rmtree(args.out / ".parts", ignore_errors=True)

    run.log_identity(identity)
    run.log_input(args.baseline)
    run.log_metrics({k: v for k, v in metrics.items() if k in ("interventions", "style", "eval_counts")})
    run.log_artifact(args.out / "metrics.json")
    last = metrics["interventions"][intervention_names(cfg.alphas)[-2]]
    print(f"steering@{args.name}: at alpha {cfg.alphas[-1]} RR {last['rr']:.2f} ORR {last['orr']:.2f}; dominant style {dominant} ({purity:.2f}) -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--name", required=True, help="direction name (a category, pooled, or random_<k>)")
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--baseline", type=Path, required=True, help="artifacts/baseline/responses.parquet")
    parser.add_argument("--site", type=Path, required=True, help="artifacts/directions/sites/<direction>.json")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--styles", type=Path, required=True, help="prompts/styles/exemplars.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/steering/<direction>")
    run_stage(STAGE, parser, main)
