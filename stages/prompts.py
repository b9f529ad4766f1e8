"""DVC stage `prompts`: validate the manifest and prompt files; write the prompt table."""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

from pathlib import Path

from refusal_atlas.data.atomic import write_json, write_parquet
from refusal_atlas.data.prompts import build_prompt_table, summarize_prompts
from refusal_atlas.pipeline.harness import run_stage, stage_parser

STAGE = "prompts"


def main(args, params, run) -> None:
    cfg = params.prompts
    manifest = Path(cfg.manifest)
    table = build_prompt_table(manifest, cfg.splits, cfg.min_per_category, cfg.max_per_set)
    summary = summarize_prompts(table)
    write_parquet(args.out / "prompts.parquet", table)
    for name, rows in table.groupby("category"):
        write_parquet(args.out / "sets" / f"{name}.parquet", rows.reset_index(drop=True))
    write_json(args.out / "summary.json", summary)

    run.log_input(manifest.parent, context="prompts")
    run.log_metrics({"n_prompts": summary["total"], "count": summary["by_category"]})
    run.log_artifact(args.out / "summary.json")
    print(f"prompts: {summary['total']} prompts in {len(summary['by_category'])} sets -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder (artifacts/prompts)")
    run_stage(STAGE, parser, main)
