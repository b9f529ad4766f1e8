"""DVC stage `steering`: activation addition at each alpha and directional ablation, for every direction.

Loads the model, the judges and the style classifier once, then evaluates each direction
whose site the directions stage wrote (artifacts/directions/sites/<direction>.json), and each
SAE direction of the sae stage (artifacts/sae/sites/sae_<direction>.json), on the
controlled set (HR/HC/BR/BC buckets of the test split, plus every category's test prompts
unless steering.controlled_only): responses, RR/ORR/Acc with bootstrap CIs, bucket
transitions, first-token and teacher-forced KL on benign prompts, and refusal styles.
Writes artifacts/steering/<direction>/responses.parquet and metrics.json. Each metrics.json
carries the fingerprint of its inputs (model, site, settings, judges): a direction whose
inputs did not change is not evaluated again, and one cut short resumes at its last chunk.
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

from pathlib import Path

import pandas as pd

from refusal_atlas.analysis.atlas import load_site
from refusal_atlas.judging.classifier import load_judge_classifier
from refusal_atlas.judging.styles import classify_styles, load_labelled, train_style_classifier
from refusal_atlas.model.generation import refusal_token_ids
from refusal_atlas.model.load import load_stage_model
from refusal_atlas.pipeline.harness import run_stage, stage_parser
from refusal_atlas.steering.evaluation import (
    Judging,
    build_steering_set,
    evaluate_directions,
    site_files,
    steered_directions,
)
from refusal_atlas.steering.interventions import intervention_names

STAGE = "steering"


def main(args, params, run) -> None:
    cfg, mcfg = params.steering, params.model
    model, tokenizer, identity = load_stage_model(mcfg, args.model, run)
    evalset = build_steering_set(pd.read_parquet(args.baseline), pd.read_parquet(args.prompts), tokenizer, cfg, mcfg)
    exemplars = load_labelled(args.styles)
    clf = train_style_classifier(exemplars.text.tolist(), exemplars.label.tolist(), seed=cfg.seed)
    judging = Judging(
        params.judge.method,
        refusal_token_ids(tokenizer, mcfg.refusal_tokens),
        classify=lambda responses, refused: classify_styles(clf, responses, refused),
        classifier=load_judge_classifier(params.judge, mcfg),
    )
    files = site_files(args.sites)
    sites = {n: load_site(files[n], identity["d_model"]) for n in steered_directions(list(files), cfg.directions)}
    summary, evaluated = evaluate_directions(
        model, tokenizer, evalset, judging, sites, identity, cfg, mcfg, params.judge.model_dump(), args.out,
        progress=not args.no_progress,
    )  # fmt: skip

    run.log_identity(identity)
    run.log_input(args.baseline)
    run.log_metrics({"n_directions_evaluated": len(evaluated), "directions": summary})
    last = intervention_names(cfg.alphas)[-2]
    for name, s in summary.items():
        m, style = s["interventions"][last], s["style"]
        print(f"steering {name}: at alpha {cfg.alphas[-1]} RR {m['rr']:.2f} ORR {m['orr']:.2f}; dominant style "
              f"{style['dominant']} ({style['purity']:.2f}){'' if name in evaluated else ' (up to date)'}")  # fmt: skip
    print(f"steering: {len(sites)} directions ({len(evaluated)} evaluated, the rest up to date) -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--baseline", type=Path, required=True, help="artifacts/baseline/responses.parquet")
    parser.add_argument(
        "--sites", type=Path, nargs="+", required=True,
        help="folders of <direction>.json site records: artifacts/directions/sites artifacts/sae/sites",
    )  # fmt: skip
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--styles", type=Path, required=True, help="prompts/styles/exemplars.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/steering (one <direction>/ per direction)")
    run_stage(STAGE, parser, main)
