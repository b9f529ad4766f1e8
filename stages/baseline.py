"""DVC stage `baseline`: unsteered greedy responses to every prompt, judged for refusal.

Writes responses.parquet (prompt_id, response, refused, each judge's verdict,
refusal_score), one verdict table per prompt set under sets/ (so adding a set reruns
only its own activations), and metrics.json with refusal rates per category, role and
split. Finished generation chunks are kept under .parts/ until the stage completes, so
a killed run resumes where it stopped. judge_validation.json scores the text judges against
the human labels of the prompts stage's judge_validation.parquet (accuracy, precision,
recall, Cohen's kappa per file and judge; baseline.partial_as says how partial refusals count).
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import shutil
from pathlib import Path

import pandas as pd

from refusal_atlas.data.atomic import write_json, write_parquet
from refusal_atlas.judging.behaviour import baseline_behaviour, refusal_rates
from refusal_atlas.judging.classifier import load_judge_classifier
from refusal_atlas.judging.validation import COMPLETION_JUDGES, validate_files, validation_metrics
from refusal_atlas.model.load import load_stage_model
from refusal_atlas.pipeline.harness import run_stage, stage_parser

STAGE = "baseline"


def main(args, params, run) -> None:
    table = pd.read_parquet(args.prompts)
    model, tokenizer, identity = load_stage_model(params.model, args.model, run)
    # Loaded before generating, so a bad judge.classifier_path fails in seconds, not after hours.
    classifier = load_judge_classifier(params.judge, params.model)
    result = baseline_behaviour(
        model, tokenizer, identity, table, params.baseline, params.model, params.judge.method, args.out / ".parts",
        classifier=classifier, progress=not args.no_progress,
    )  # fmt: skip
    metrics = refusal_rates(result)
    judges = [j for j in params.judge.method if j in COMPLETION_JUDGES]
    validation = validate_files(pd.read_parquet(args.validation), judges, params.baseline.partial_as, classifier)[0]
    write_parquet(args.out / "responses.parquet", result)
    for name, rows in result.groupby("category"):
        verdicts = rows[["prompt_id", "refused", "refusal_score"]].reset_index(drop=True)
        write_parquet(args.out / "sets" / f"{name}.parquet", verdicts)
    write_json(args.out / "metrics.json", metrics)
    write_json(args.out / "judge_validation.json", validation)
    shutil.rmtree(args.out / ".parts", ignore_errors=True)

    run.log_identity(identity)
    run.log_input(args.prompts)
    run.log_metrics(metrics)
    run.log_metrics({"human": validation_metrics(validation)})
    run.log_artifact(args.out / "metrics.json")
    print(f"baseline: {len(result)} responses, refusal rate {metrics['refusal_rate']['overall']:.3f} -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--validation", type=Path, required=True, help="artifacts/prompts/judge_validation.parquet")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--out", type=Path, required=True, help="output folder (artifacts/baseline)")
    run_stage(STAGE, parser, main)
