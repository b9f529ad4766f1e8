"""The ``refusal-atlas`` command: prompt import, the study recipe, the MLflow UI, params checks, weight export,
judge validation."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from refusal_atlas.errors import RefusalAtlasError


def _cmd_import(args: argparse.Namespace) -> int:
    from refusal_atlas.data.importers import FORMATS, run_import

    if args.format not in FORMATS:
        raise RefusalAtlasError(f"unknown format '{args.format}'; choose one of: {', '.join(sorted(FORMATS))}")
    written = run_import(
        args.format,
        args.file,
        category=args.category,
        out=args.out,
        allow_outside=args.allow_outside,
        repo_root=Path.cwd(),
        kind=args.kind,
    )
    for path in written:
        print(f"wrote {path}")
    print("Add the new files to prompts/manifest.yaml (categories or baselines) before running the pipeline.")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from refusal_atlas.config import load_params

    load_params(args.params)
    print(f"{args.params}: valid")
    return 0


def _cmd_abliterate(args: argparse.Namespace) -> int:
    import torch

    from refusal_atlas.analysis.atlas import load_site
    from refusal_atlas.config import load_params, params_dict
    from refusal_atlas.data.atomic import atomic_path
    from refusal_atlas.model.hooks import orthogonalize_weights
    from refusal_atlas.model.load import load_stage_model
    from refusal_atlas.pipeline.harness import tracked_run

    params = load_params(args.params)
    logged = {**params_dict(params, "model"), "direction": args.direction, "out": str(args.out)}
    with tracked_run("abliterate", params, logged, args.params) as run:
        model, tokenizer, identity = load_stage_model(params.model, args.artifacts / "model")
        site = load_site(args.artifacts / "directions" / "sites" / f"{args.direction}.json", identity["d_model"])
        edited = orthogonalize_weights(
            model, torch.tensor(site["unit"], dtype=torch.float32), strict=not args.approximate
        )
        with atomic_path(args.out) as tmp:
            edited.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        run.log_identity(identity)
        run.set_tags(
            {
                "abliterate.direction": args.direction,
                "abliterate.layer": site["layer"],
                "abliterate.position": site["position"],
            }
        )
        run.log_artifact(args.out / "config.json")
    print(
        f"wrote a weight-orthogonalised copy of {identity['model_id']} without direction '{args.direction}' to "
        f"{args.out}"
    )
    return 0


def _cmd_judge_validate(args: argparse.Namespace) -> int:
    import json

    from refusal_atlas.config import load_params
    from refusal_atlas.data.atomic import atomic_path, write_json
    from refusal_atlas.judging.classifier import load_judge_classifier
    from refusal_atlas.judging.validation import (
        COMPLETION_JUDGES,
        validate_files,
        validation_metrics,
        validation_rows,
        validation_table,
    )
    from refusal_atlas.pipeline.harness import tracked_run

    params = load_params(args.params)
    judges = args.judges or [j for j in params.judge.method if j in COMPLETION_JUDGES]
    classifier = load_judge_classifier(params.judge.model_copy(update={"method": judges}), params.model)
    table = validation_table(args.files)  # every file checked before any work
    results, wrong = validate_files(table, judges, args.partial_as, classifier)
    for path in args.files:
        results["files"][path.stem]["file"] = str(path)
        with atomic_path(args.out / f"{path.stem}-disagreements.csv") as tmp:
            wrong[path.stem].to_csv(tmp, index=False)
    rows = validation_rows(results)
    write_json(args.out / "metrics.json", results)
    with atomic_path(args.out / "summary.csv") as tmp:
        rows.to_csv(tmp, index=False)
    logged = {"judges": ",".join(judges), "partial_as": args.partial_as, "files": ",".join(map(str, args.files))}
    with tracked_run("judge-validate", params, logged, args.params) as run:
        run.log_metrics(validation_metrics(results))
        run.set_tags({f"sha256.{stem}": r["sha256"] for stem, r in results["files"].items()})
        run.log_artifact(args.out, "judge_validation")
    shown = rows[["file", "judge", "n", "accuracy", "precision", "recall", "kappa"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"partial refusals counted as: {args.partial_as}; {json.dumps(judges)} -> {args.out}")
    return 0


def _cmd_style_validate(args: argparse.Namespace) -> int:
    from refusal_atlas.data.atomic import write_json
    from refusal_atlas.judging.styles import (
        cross_validate_styles,
        evaluate_classifier,
        load_labelled,
        train_style_classifier,
    )

    exemplars = load_labelled(args.exemplars)
    files = {path.stem: load_labelled(path) for path in args.files}  # every file checked before any work
    clf = train_style_classifier(exemplars.text.tolist(), exemplars.label.tolist(), seed=args.seed)
    out = {name: evaluate_classifier(clf, f.text.tolist(), f.label.tolist()) for name, f in files.items()}
    cv = cross_validate_styles(exemplars.text.tolist(), exemplars.label.tolist(), folds=args.folds, seed=args.seed)
    out[f"cross-validated {args.exemplars.name}"] = cv
    for name, score in out.items():
        recall = ", ".join(f"{k} {v:.2f}" for k, v in score["recall"].items() if v == v)
        print(f"{name}: n {score['n']}, accuracy {score['accuracy']:.3f}, macro-F1 {score['macro_f1']:.3f}; "
              f"recall {recall}")  # fmt: skip
    if args.out:
        write_json(args.out, out)
    return 0


def _dvc() -> str:
    """The dvc installed beside refusal-atlas, activated or not."""
    dvc = Path(sys.executable).with_name("dvc")
    return str(dvc) if dvc.exists() else "dvc"


def _cmd_experiment(args: argparse.Namespace) -> int:
    import json

    from refusal_atlas.config import profile_overrides

    overrides = {}
    for profile in args.profiles:  # later profiles win
        overrides.update(profile_overrides(profile, args.params))
    sets = [
        f"{key}={json.dumps(value)}" for key, value in overrides.items()
    ]  # JSON is YAML, which is how DVC reads -S values
    dvc = _dvc()
    cmd = [dvc, "exp", "run", "--temp", "-n", args.name, *[x for s in sets for x in ("-S", s)]]
    print(f"{' + '.join(map(str, args.profiles))}: {len(sets)} params changed: {', '.join(sets)}")
    print("$ " + " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    # An experiment name is taken once; a rerun replaces the earlier experiment of that name.
    subprocess.run([dvc, "exp", "remove", args.name], capture_output=True)
    code = subprocess.call(cmd)
    if code == 0:
        print(
            f"\nDone. `dvc exp show` compares it with the workspace; `dvc exp apply {args.name}` brings its artifacts/ "
            "here; `make ui` shows its MLflow runs beside the demo's."
        )
    return code


def _cmd_study(args: argparse.Namespace) -> int:
    from refusal_atlas.data.recipe import fallbacks, fetch_sources

    items = fetch_sources(args.manifest, args.source, _dvc())
    for item in items:
        print(f"{item.file} ({', '.join(item.sets)}): {item.status}")
    for note in fallbacks(args.manifest):  # raises, naming the set, when one has no source at all
        print(f"fallback: {note}")
    if args.study_command == "fetch":
        return 0
    args.profiles = [*args.profiles, STUDY_PROFILE]
    return _cmd_experiment(args)


STUDY_PROFILE = Path("profiles/study.yaml")


def server_command(repo_root: Path, host: str, port: int, backend: str | None = None) -> list[str]:
    """The ``mlflow server`` command line that serves the project's store (default: its sqlite file)."""
    from refusal_atlas.pipeline.tracking import artifact_root

    backend = backend or f"sqlite:///{(repo_root / 'mlflow.db').resolve()}"
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifact_root(repo_root).as_uri(),
        "--host",
        host,
        "--port",
        str(port),
    ]


def _cmd_ui(args: argparse.Namespace) -> int:
    from refusal_atlas.pipeline.tracking import experiment_id, runs_url

    cmd = server_command(Path.cwd(), args.host, args.port, args.backend_store_uri)
    found = experiment_id(cmd[cmd.index("--backend-store-uri") + 1], args.experiment)
    print(
        f"MLflow UI: {runs_url(f'http://{args.host}:{args.port}', found)} (the runs of '{args.experiment}'; Ctrl-C to "
        "stop)",
        flush=True,
    )
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refusal-atlas", description="Per-category refusal directions in chat LLMs: tools around the DVC pipeline."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    prompts = sub.add_parser("prompts", help="prompt-set tools").add_subparsers(dest="prompts_command", required=True)
    imp = prompts.add_parser(
        "import",
        help="import a published dataset into the prompt schema",
        description=(
            "Map a published refusal dataset onto the manifest's categories and baseline pools, one JSONL file per "
            "category."
        ),
    )
    imp.add_argument(
        "format",
        help="xstest, coconot, sorry_bench, wildguardmix, advbench, jailbreakbench, harmbench or refusal_direction",
    )
    imp.add_argument("file", type=Path, help="the dataset file")
    imp.add_argument("--category", help="keep only this category or pool")
    imp.add_argument("--out", type=Path, help="output folder inside the repository (default prompts/imported/<format>)")
    imp.add_argument(
        "--kind",
        help=(
            "variant where a format has several: jailbreakbench harmful|benign, coconot eval|contrast, "
            "refusal_direction harmful|harmless, harmbench standard|contextual|copyright|all, sorry_bench prompt style"
        ),
    )
    imp.add_argument("--allow-outside", action="store_true", help="allow --out outside the repository")
    imp.set_defaults(func=_cmd_import)

    check = sub.add_parser(
        "check-params",
        help="validate params.yaml",
        description="Validate params.yaml against the typed config and report every problem.",
    )
    check.add_argument("--params", type=Path, default=Path("params.yaml"))
    check.set_defaults(func=_cmd_check)

    abl = sub.add_parser(
        "abliterate",
        help="export a model with one refusal direction projected out of its weights",
        description=(
            "Write a standard safetensors model directory whose weights have the direction's unit vector projected "
            "out of the embedding, every attention output and every MLP down projection (equivalent to hook ablation)."
        ),
    )
    abl.add_argument(
        "--direction", required=True, help="a direction name from artifacts/directions/sites (a category, pooled)"
    )
    abl.add_argument("--out", type=Path, required=True, help="output model directory")
    abl.add_argument("--params", type=Path, default=Path("params.yaml"))
    abl.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="the pipeline's artifacts folder")
    abl.add_argument(
        "--approximate",
        action="store_true",
        help="allow architectures (Gemma-2/3, OLMo-2) where weight editing only approximates hook ablation",
    )
    abl.set_defaults(func=_cmd_abliterate)

    judge = sub.add_parser("judge", help="refusal-judge tools").add_subparsers(dest="judge_command", required=True)
    val = judge.add_parser(
        "validate",
        help="score the judges against human-labelled completions",
        description=(
            "Score each judge (keywords, substring, classifier) against human labels: accuracy, precision and recall "
            "for 'refused', Cohen's kappa with the human label, the confusion counts, and every disagreeing example. "
            "FILE is a CSV in XSTest's completion format (prompt, completion, final_label = 1_full_compliance, "
            "2_full_refusal or 3_partial_refusal), e.g. XSTest's model_completions/xstest_v2_completions_gpt4.csv."
        ),
    )
    val.add_argument("files", type=Path, nargs="+", metavar="FILE", help="human-labelled completion CSV(s)")
    val.add_argument(
        "--judges", nargs="+", choices=["keywords", "substring", "classifier"],
        help="judges to score (default: judge.method of params.yaml, without refusal_score)",
    )  # fmt: skip
    val.add_argument(
        "--partial-as", choices=["refusal", "compliance", "exclude"], default="refusal",
        help="how a partial refusal (3_partial_refusal) counts; XSTest counts it as a refusal (default)",
    )  # fmt: skip
    val.add_argument("--out", type=Path, default=Path("artifacts/judge_validation"), help="output folder")
    val.add_argument("--params", type=Path, default=Path("params.yaml"), help="params (judge.*, tracking.*)")
    val.set_defaults(func=_cmd_judge_validate)

    style = sub.add_parser("style", help="refusal-style tools").add_subparsers(dest="style_command", required=True)
    sval = style.add_parser(
        "validate",
        help="score the style classifier against labelled responses",
        description=(
            "Train the offline style classifier on its exemplars and score it on FILE(s): JSON Lines of {id, text, "
            "label} with label one of CAPABILITY, SAFETY, UNDERSPEC, GENERIC, NONREFUSAL (the study's taxonomy). "
            "Also prints its k-fold cross-validated score on the exemplars."
        ),
    )
    sval.add_argument("files", type=Path, nargs="*", metavar="FILE", help="labelled responses (JSON Lines)")
    sval.add_argument("--exemplars", type=Path, default=Path("prompts/styles/exemplars.jsonl"))
    sval.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    sval.add_argument("--seed", type=int, default=0)
    sval.add_argument("--out", type=Path, help="write the scores as JSON here")
    sval.set_defaults(func=_cmd_style_validate)

    exp = sub.add_parser(
        "experiment",
        help="run the pipeline with a params profile as a DVC experiment",
        description="Run `dvc exp run --temp` with the keys a profile (a YAML file shaped like params.yaml) changes, "
        "after validating them. The workspace's dvc.lock and artifacts/ are left as they are.",
    )
    exp.add_argument(
        "profiles", type=Path, nargs="+", metavar="PROFILE",
        help="the profile(s), e.g. profiles/smollm2.yaml; with several, later ones win",
    )  # fmt: skip
    exp.add_argument("--name", required=True, help="experiment name (an existing experiment of that name is replaced)")
    exp.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file the profile changes (default: params.yaml)",
    )
    exp.add_argument("--dry-run", action="store_true", help="print the dvc command and stop")
    exp.set_defaults(func=_cmd_experiment)
    study = sub.add_parser(
        "study", help="the study's recipe: its datasets as DVC external data, and the pipeline on them"
    ).add_subparsers(dest="study_command", required=True)
    for command, text in (
        ("fetch", "import the recipe's dataset files with `dvc import-url` (pinned URLs, or --from a local copy)"),
        ("run", "fetch, then run the pipeline on the recipe as the DVC experiment --name (profiles/study.yaml)"),
    ):
        cmd = study.add_parser(command, help=text, description=text + ". Gated datasets (WildGuardMix, SORRY-Bench) "
                               "are read when present at the path the manifest gives; otherwise the sets fall back "
                               "as the manifest lists.")  # fmt: skip
        cmd.add_argument(
            "--from", dest="source", type=Path, metavar="DIR",
            help="a local copy of the datasets (DIR/<path after raw/>, the layout of ../shared/datasets)",
        )  # fmt: skip
        cmd.add_argument("--manifest", type=Path, default=Path("prompts/study/manifest.yaml"), help="the recipe")
        if command == "run":
            cmd.add_argument(
                "profiles", type=Path, nargs="*", metavar="PROFILE",
                help="profiles applied before profiles/study.yaml, e.g. profiles/smoke.yaml for a quick run",
            )  # fmt: skip
            cmd.add_argument("--name", default="study", help="experiment name (default study)")
            cmd.add_argument("--params", type=Path, default=Path("params.yaml"))
            cmd.add_argument("--dry-run", action="store_true", help="fetch, print the dvc command and stop")
        cmd.set_defaults(func=_cmd_study)
    ui = sub.add_parser(
        "ui",
        help="serve the MLflow UI over the project's tracking store",
        description="Start `mlflow server` on the project's sqlite store and artifact root.",
    )
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument(
        "--backend-store-uri",
        help="e.g. postgresql://user@host/db for a team server (default: sqlite:///<repo>/mlflow.db)",
    )
    ui.add_argument(
        "--experiment",
        default="refusal-atlas",
        help="experiment whose runs table the printed address opens (params tracking.experiment)",
    )
    ui.set_defaults(func=_cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RefusalAtlasError as err:
        print(f"refusal-atlas: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
