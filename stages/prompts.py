"""DVC stage `prompts`: validate the manifest and prompt files; write the prompt table.

Writes prompts.parquet (every prompt), sets/<set>.parquet, summary.json (counts, the DVC
metrics), manifest.json (each set's role, baseline pool and the file it was read from:
format, path, sha256; later stages and the report read it instead of the manifest) and
judge_validation.parquet (the manifest's human-labelled completions, every file's rows;
empty when it lists none), which the baseline stage scores the judges on, and
crosslingual.parquet (the manifest's per-language harmful and harmless prompts; empty when
it lists none), which the directions stage's cross-lingual transfer analysis reads.
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import sys
from pathlib import Path

from refusal_atlas.data.atomic import write_json, write_parquet
from refusal_atlas.data.prompts import collect_prompt_sets, crosslingual_table, summarize_prompts, validation_files
from refusal_atlas.judging.validation import validation_table
from refusal_atlas.pipeline.harness import run_stage, stage_parser

STAGE = "prompts"


def main(args, params, run) -> None:
    cfg = params.prompts
    manifest = Path(cfg.manifest)
    collected = collect_prompt_sets(manifest, cfg.splits, cfg.min_per_category, cfg.max_per_set)
    table = collected.table
    present, absent = validation_files(manifest)
    validation = validation_table([path for _, path in present])  # every file checked before anything is written
    languages, left_out = crosslingual_table(manifest)
    notes = collected.provenance["notes"] + absent + left_out  # fallback sources, absent files
    for note in notes:
        print(f"prompts: note: {note}", file=sys.stderr)
    summary = summarize_prompts(table)
    write_parquet(args.out / "prompts.parquet", table)
    for name, rows in table.groupby("category"):
        write_parquet(args.out / "sets" / f"{name}.parquet", rows.reset_index(drop=True))
    write_json(args.out / "summary.json", summary)
    write_json(args.out / "manifest.json", {**collected.provenance, "notes": notes})
    write_parquet(args.out / "judge_validation.parquet", validation)
    write_parquet(args.out / "crosslingual.parquet", languages)

    run.log_input(manifest.parent, context="prompts")
    run.set_tags({"prompts.manifest": str(manifest), "prompts.manifest_sha256": collected.provenance["sha256"]})
    run.log_metrics({"n_prompts": summary["total"], "count": summary["by_category"]})
    run.log_artifact(args.out / "summary.json")
    print(f"prompts: {summary['total']} prompts in {len(summary['by_category'])} sets -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder (artifacts/prompts)")
    run_stage(STAGE, parser, main)
