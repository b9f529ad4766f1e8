"""DVC stage `steering`: activation addition at each alpha and directional ablation, for every direction.

Loads the model, the judges and the style classifier once, then evaluates each direction
whose site the directions stage wrote (artifacts/directions/sites/<direction>.json) on the
controlled set (HR/HC/BR/BC buckets of the test split, plus every category's test prompts
unless steering.controlled_only): responses, RR/ORR/Acc with bootstrap CIs, bucket
transitions, first-token and teacher-forced KL on benign prompts, and refusal styles.
Writes artifacts/steering/<direction>/responses.parquet and metrics.json. Each metrics.json
carries the fingerprint of its inputs (model, site, settings, judges): a direction whose
inputs did not change is not evaluated again, and one cut short resumes at its last chunk.
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.analysis.atlas import load_site
from refusal_atlas.data.atomic import write_json, write_parquet
from refusal_atlas.judging.behaviour import fingerprint
from refusal_atlas.judging.classifier import load_judge_classifier
from refusal_atlas.judging.styles import classify_styles, load_labelled, train_style_classifier
from refusal_atlas.model.chat import format_prompts
from refusal_atlas.model.generation import refusal_token_ids
from refusal_atlas.model.load import load_stage_model
from refusal_atlas.pipeline.harness import run_stage, stage_parser
from refusal_atlas.steering.evaluation import evaluate_direction, induced_style
from refusal_atlas.steering.interventions import SteeringError, build_eval_set, intervention_names

STAGE = "steering"


def main(args, params, run) -> None:
    cfg, mcfg = params.steering, params.model
    model, tokenizer, identity = load_stage_model(params.model, args.model, run)
    classifier = load_judge_classifier(params.judge, mcfg)
    baseline = pd.read_parquet(args.baseline)
    frame, counts = build_eval_set(baseline, cfg.n_per_bucket, cfg.seed, cfg.controlled_only)
    rows = baseline.set_index("prompt_id").loc[frame.prompt_id]
    texts = pd.read_parquet(args.prompts).set_index("prompt_id").loc[frame.prompt_id, "text"].tolist()
    formatted = format_prompts(tokenizer, texts, mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
    exemplars = load_labelled(args.styles)
    clf = train_style_classifier(exemplars.text.tolist(), exemplars.label.tolist(), seed=cfg.seed)
    answered = set(frame.prompt_id[~rows.refused.to_numpy(dtype=bool)])
    names = sorted(p.stem for p in args.sites.glob("*.json"))
    if cfg.directions is not None:
        if unknown := sorted(set(cfg.directions) - set(names)):
            raise SteeringError(
                f"steering.directions names {unknown}, which the directions stage did not write; it wrote {names}. "
                "Fix steering.directions in params.yaml (null steers every direction)."
            )
        names = [n for n in names if n in cfg.directions]
    evaluated, summary = [], {}
    for name in names:
        site = load_site(args.sites / f"{name}.json", identity["d_model"])
        unit = np.asarray(site.pop("unit"), dtype=np.float32)
        out = args.out / name
        key = fingerprint(identity, name, site, cfg.model_dump(exclude={"directions"}), params.judge.model_dump())
        metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
        if not (metrics and metrics.get("inputs_fingerprint") == key and (out / "responses.parquet").is_file()):
            table, metrics = evaluate_direction(
                model,
                tokenizer,
                frame,
                formatted,
                rows.response.tolist(),
                rows[["refused"] + [c for c in rows.columns if c.startswith("judge_")] + ["refusal_score"]],
                intervention_names(cfg.alphas),
                unit,
                site["layer"],
                site["mean_resid_norm"],
                alpha_unit=cfg.alpha_unit,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=mcfg.batch_size,
                max_prompt_tokens=mcfg.max_prompt_tokens,
                refusal_ids=refusal_token_ids(tokenizer, mcfg.refusal_tokens),
                judges=params.judge.method,
                n_bootstrap=cfg.n_bootstrap,
                seed=cfg.seed,
                parts_dir=out / ".parts",
                key=key,
                classify=lambda responses, refused: classify_styles(clf, responses, refused),
                prompts=texts,
                classifier=classifier,
                progress=not args.no_progress,
                label=name,
            )
            metrics.update(
                {
                    "direction": name,
                    "site": site,
                    "eval_counts": counts,
                    "style": induced_style(table, answered),
                    "inputs_fingerprint": key,
                }
            )
            write_parquet(out / "responses.parquet", table)
            write_json(out / "metrics.json", metrics)
            shutil.rmtree(out / ".parts", ignore_errors=True)
            evaluated.append(name)
        summary[name] = {k: v for k, v in metrics.items() if k in ("interventions", "style", "eval_counts")}
    for stale in (
        sorted(p for p in args.out.iterdir() if p.is_dir() and p.name not in names) if args.out.is_dir() else []
    ):
        shutil.rmtree(stale)

    run.log_identity(identity)
    run.log_input(args.baseline)
    run.log_metrics({"n_directions_evaluated": len(evaluated), "directions": summary})
    last = intervention_names(cfg.alphas)[-2]
    for name in names:
        m = summary[name]["interventions"][last]
        print(
            f"steering {name}: at alpha {cfg.alphas[-1]} RR {m['rr']:.2f} ORR {m['orr']:.2f}; dominant style {summary[name]['style']['dominant']} "
            f"({summary[name]['style']['purity']:.2f}){'' if name in evaluated else ' (up to date)'}"
        )
    print(f"steering: {len(names)} directions ({len(evaluated)} evaluated, the rest up to date) -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--baseline", type=Path, required=True, help="artifacts/baseline/responses.parquet")
    parser.add_argument(
        "--sites", type=Path, required=True, help="artifacts/directions/sites (one <direction>.json per direction)"
    )
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--styles", type=Path, required=True, help="prompts/styles/exemplars.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/steering (one <direction>/ per direction)")
    run_stage(STAGE, parser, main)
