"""DVC stage `report`: the trade-off curves, the shared-knob statistic, styles, and report.html.

Aggregates every direction's steering result with the earlier stages' outputs into
tradeoff.csv (DVC plots), shared_knob.csv, PNG figures, metrics.json and one
self-contained report.html (images embedded, no network references).
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import json
from pathlib import Path

import pandas as pd

from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.judging.styles import load_labelled
from refusal_atlas.pipeline.harness import repo_root, run_stage, stage_parser
from refusal_atlas.pipeline.tracking import git_state
from refusal_atlas.report.content import GEOMETRY_FIGURES, ReportInputs, build_report, file_digests, identity_params
from refusal_atlas.report.plots import save_png

STAGE = "report"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def main(args, params, run) -> None:
    names = sorted(p.name for p in args.steering.iterdir() if (p / "metrics.json").exists())
    inputs = ReportInputs(
        summary=_json(args.prompts / "summary.json"),
        sets=_json(args.prompts / "manifest.json"),
        digests=file_digests(args.prompts / "sets"),
        identity=_json(args.model / "identity.json"),
        baseline=_json(args.baseline / "metrics.json"),
        validation=_json(args.baseline / "judge_validation.json"),
        selected=_json(args.directions / "selected.json"),
        crosslingual=_json(args.directions / "crosslingual.json"),
        geometry=_json(args.geometry / "metrics.json"),
        geometry_png={f: (args.geometry / "figures" / f).read_bytes() for _, f in GEOMETRY_FIGURES},
        sae=_json(args.sae / "metrics.json"),
        sae_latents=pd.read_csv(args.sae / "latents.csv"),
        sae_png={p.name: p.read_bytes() for p in sorted((args.sae / "figures").glob("*.png"))},
        steering={n: _json(args.steering / n / "metrics.json") for n in names},
        responses={n: pd.read_parquet(args.steering / n / "responses.parquet") for n in names},
        exemplars=load_labelled(args.styles / "exemplars.jsonl"),
        labelled=load_labelled(args.styles / "hand_labelled.jsonl"),
        commit=git_state(repo_root())["git_commit"],
    )
    report = build_report(inputs, params.steering)

    with atomic_path(args.out / "figures") as folder:
        folder.mkdir()
        for name, fig in report.figures.items():
            save_png(fig, folder / name)
    report.tradeoff.to_csv(args.out / "tradeoff.csv", index=False)
    report.knob.to_csv(args.out / "shared_knob.csv", index=False)
    write_json(args.out / "metrics.json", report.metrics)
    with atomic_path(args.out / "report.html") as tmp:
        tmp.write_text(report.html, encoding="utf-8")

    run.log_identity(inputs.identity)
    run.log_metrics(report.tracked)
    run.log_headline(report.headline, identity_params(inputs.identity))
    for path in ("figures", "report.html", "tradeoff.csv", "shared_knob.csv"):
        run.log_artifact(args.out / path)
    print(f"report: {report.metrics['shared_knob']['summary']} -> {args.out / 'report.html'}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    folders = ("prompts", "model", "baseline", "directions", "geometry", "sae", "steering")
    for name in folders:
        parser.add_argument(f"--{name}", type=Path, required=True, help=f"artifacts/{name}")
    parser.add_argument("--styles", type=Path, required=True, help="prompts/styles")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/report")
    run_stage(STAGE, parser, main)
