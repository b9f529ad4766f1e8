"""DVC stage `report`: the trade-off curves, the shared-knob statistic, styles, and report.html.

Aggregates every steering@<direction> result with the earlier stages' outputs into
tradeoff.csv (DVC plots), shared_knob.csv, PNG figures, metrics.json and one
self-contained report.html (images embedded, no network references).
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import json
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.judging.styles import (
    STYLES,
    evaluate_classifier,
    induced_style_counts,
    load_labelled,
    style_homogeneity,
    train_style_classifier,
)
from refusal_atlas.pipeline.harness import repo_root, run_stage, stage_parser
from refusal_atlas.pipeline.tracking import git_state
from refusal_atlas.report import plots
from refusal_atlas.report.html import Section, render_report
from refusal_atlas.steering.interventions import curve_table, shared_knob, shared_knob_summary

STAGE = "report"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def main(args, params, run) -> None:
    cfg = params.steering
    names = sorted(p.name for p in args.steering.iterdir() if (p / "metrics.json").exists())
    steering = {n: _json(args.steering / n / "metrics.json") for n in names}
    curves = {
        n: curve_table({k: v for k, v in m["interventions"].items() if k != "ablate"}, cfg.alphas)
        for n, m in steering.items()
    }
    tradeoff = pd.concat([c.assign(direction=n) for n, c in curves.items()], ignore_index=True)

    verdicts, is_harmful = {}, None
    for n in names:
        table = pd.read_parquet(args.steering / n / "responses.parquet")
        controlled = table[table.in_buckets & (table.intervention != "ablate")]
        verdicts[n] = controlled.pivot(index="prompt_id", columns="intervention", values="refused").sort_index()
        is_harmful = controlled.groupby("prompt_id").bucket.first().sort_index().isin(["HR", "HC"]).to_numpy()
    knob = shared_knob(verdicts, is_harmful, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, tolerance=cfg.knob_tolerance)
    verdict_line = shared_knob_summary(knob, cfg.knob_tolerance)
    style = (
        pd.DataFrame({n: m["style"]["distribution"] for n, m in steering.items()})
        .T.reindex(columns=list(STYLES))
        .fillna(0.0)
    )
    # The study's second finding as a test: do the category directions (not pooled or the
    # random controls) induce different mixes of refusal styles?
    summary = _json(args.prompts / "summary.json")
    homogeneity = style_homogeneity(
        induced_style_counts({n: m["style"] for n, m in steering.items() if n in summary["by_category"]})
    )
    ablation = pd.DataFrame(
        {
            n: {k: m["interventions"]["ablate"][k] for k in ("rr", "orr", "acc", "kl_first_token", "kl_teacher_forced")}
            for n, m in steering.items()
        }
    ).T
    kl = pd.DataFrame(
        {n: {k: v.get("kl_first_token", np.nan) for k, v in m["interventions"].items()} for n, m in steering.items()}
    ).T

    exemplars, labelled = (
        load_labelled(args.styles / "exemplars.jsonl"),
        load_labelled(args.styles / "hand_labelled.jsonl"),
    )
    style_eval = evaluate_classifier(
        train_style_classifier(exemplars.text.tolist(), exemplars.label.tolist(), seed=cfg.seed),
        labelled.text.tolist(),
        labelled.label.tolist(),
    )

    figures = {
        "tradeoff.png": plots.tradeoff_plot({n: c[c.alpha.notna()] for n, c in curves.items()}),
        "style_matrix.png": plots.matrix_heatmap(
            style, "Style of the refusals each direction induces (share)", "Blues", ".2f", 0, 1
        ),
    }
    with atomic_path(args.out / "figures") as folder:
        folder.mkdir()
        for name, fig in figures.items():
            plots.save_png(fig, folder / name)
    tradeoff.to_csv(args.out / "tradeoff.csv", index=False)
    knob.to_csv(args.out / "shared_knob.csv", index=False)
    metrics = {
        "shared_knob": {
            "summary": verdict_line,
            "tolerance": cfg.knob_tolerance,
            "verdicts": knob.verdict.value_counts().to_dict(),
            "max_mean_abs_diff": float(knob.mean_abs_diff.max()),
        },
        "style_classifier": {k: style_eval[k] for k in ("n", "accuracy", "macro_f1")},
        "dominant_style": {
            n: {"style": m["style"]["dominant"], "purity": m["style"]["purity"]} for n, m in steering.items()
        },
        "style_homogeneity": homogeneity,
    }
    write_json(args.out / "metrics.json", metrics)

    html = render_report(
        "refusal-atlas report",
        _intro(args),
        _sections(args, summary, figures, tradeoff, knob, verdict_line, style, ablation, kl, style_eval, homogeneity),
    )
    with atomic_path(args.out / "report.html") as tmp:
        tmp.write_text(html, encoding="utf-8")
    run.log_identity(_json(args.model / "identity.json"))
    run.log_metrics(
        {
            "shared_knob.max_mean_abs_diff": metrics["shared_knob"]["max_mean_abs_diff"],
            "style_classifier": metrics["style_classifier"],
            "style_homogeneity": {k: homogeneity[k] for k in ("chi2", "p_value", "cramers_v")},
        }
    )
    run.log_headline(_headline(args, steering, knob), _identity_params(_json(args.model / "identity.json")))
    for path in (
        args.out / "figures",
        args.out / "report.html",
        args.out / "tradeoff.csv",
        args.out / "shared_knob.csv",
    ):
        run.log_artifact(path)
    print(f"report: {verdict_line} -> {args.out / 'report.html'}")


def _identity_params(identity: dict) -> dict:
    return {
        "model": identity["model_id"],
        "model_revision": identity["model_revision"],
        "architecture": identity["architecture"],
        "n_layers": identity["n_layers"],
        "d_model": identity["d_model"],
    }


def _headline(args, steering: dict, knob: pd.DataFrame) -> dict:
    """The numbers that compare one execution with another (a model, a setting), for the parent run."""
    geometry, baseline = _json(args.geometry / "metrics.json"), _json(args.baseline / "metrics.json")
    out = {
        "geometry.cosine_offdiag_mean": geometry["cosine_offdiag_mean"],
        "geometry.best_k": geometry["cluster_average_best_k"],
        "geometry.best_k_silhouette": geometry["cluster_average_silhouette"],
        **{
            f"shared_knob.{v.replace(' ', '_')}": int((knob.verdict == v).sum())
            for v in ("same knob", "different", "inconclusive", "no overlap")
        },
        **{f"judge.{k.split('.')[1]}.kappa": v for k, v in baseline.get("judges", {}).items() if k.endswith(".kappa")},
    }
    pooled = steering.get("pooled", {}).get("interventions", {})
    for name, entry in pooled.items():
        if name.startswith("add_") or name == "ablate":
            out.update({f"pooled.{name}.rr": entry["rr"], f"pooled.{name}.orr": entry["orr"]})
    return out


def _intro(args) -> list[str]:
    identity = _json(args.model / "identity.json")
    intro = [
        f"Model {identity['model_id']} ({identity['architecture']}, {identity['n_layers']} layers, d_model {identity['d_model']}, revision {identity['model_revision']})."
    ]
    if "gguf_sha256" in identity:
        intro.append(
            f"Weights: GGUF file {identity['gguf_file']} ({identity['gguf_quantization']}, dequantised to {identity['dtype']}), sha256 {identity['gguf_sha256']}."
        )
    if identity["model_id"] == "demo":
        intro.append(
            "This run uses the embedded demo model, a small model trained here so the pipeline runs offline; it is not evidence about real LLMs."
        )
    selected = _json(args.directions / "selected.json")
    weak = {n: s for n, s in selected.items() if s.get("underpowered")}
    if weak:
        intro.append(
            f"Under-powered directions, learnt from fewer than {next(iter(weak.values()))['min_per_side']} prompts on a side (marked ⚠ below): "
            + ", ".join(f"{n} (HR {s['n_target']}, BC {s['n_baseline']})" for n, s in weak.items())
            + ". Their geometry and steering rest on a handful of refusals and are not comparable to the other directions'."
        )
    fallen = [n for n, s in selected.items() if s.get("fallback")]
    if fallen:
        intro.append(
            f"No candidate site passed Arditi's filters (kl and induce) for {len(fallen)} direction(s): {', '.join(fallen)}; their sites "
            "are directions.fallback's choice (fallback column below; the reason is in selected.json)."
        )
    return intro


def _png(path: Path) -> bytes:
    return path.read_bytes()


def _sections(
    args, summary, figures, tradeoff, knob, verdict_line, style, ablation, kl, style_eval, homogeneity
) -> list[Section]:
    identity = _json(args.model / "identity.json")
    baseline, geometry, selected = (
        _json(args.baseline / "metrics.json"),
        _json(args.geometry / "metrics.json"),
        _json(args.directions / "selected.json"),
    )
    geo = args.geometry / "figures"
    return [
        Section(
            "Prompt sets",
            [f"{summary['total']} prompts."],
            tables={"Prompts per set and split": pd.DataFrame(summary["by_category_split"]).T.fillna(0).astype(int)},
        ),
        Section(
            "Baseline behaviour",
            [f"Unsteered refusal rate overall: {baseline['refusal_rate']['overall']:.3f}."],
            tables={"Refusal rate per set and split": pd.DataFrame(baseline["refusal_rate"]["by_category_split"]).T},
        ),
        Section(
            "Directions",
            [
                "Each direction's selected (layer, position), the score behind the choice, and how many refused targets (HR) and "
                "answered baseline prompts (BC) it was learnt from; ⚠ marks a side under directions.min_per_side."
            ],
            tables={
                "Selected sites": pd.DataFrame(
                    {
                        ("⚠ " if s.get("underpowered") else "") + n: {
                            k: s.get(k)
                            for k in (
                                "method",
                                "layer",
                                "position",
                                "score",
                                "fallback",
                                "mean_resid_norm",
                                "n_target",
                                "n_baseline",
                            )
                        }
                        for n, s in selected.items()
                    }
                ).T,
                **(
                    {
                        "Arditi candidates per direction: kept (passed every filter), dropped by rule (layer, nan, kl, induce), or not scored because a "
                        "lower-bypass candidate had already passed; the search order (bypass first, or filters first where most candidates fail "
                        "kl) and the validation prompts per side. Every row, with kl_prompts where kl stopped early, is in "
                        "artifacts/directions/candidates.csv": pd.DataFrame(
                            {
                                n: {
                                    **s["counts"],
                                    "order": s.get("search_order"),
                                    **{f"n_val {k}": v for k, v in s.get("n_val", {}).items()},
                                }
                                for n, s in selected.items()
                                if s.get("method") == "arditi"
                            }
                        ).T
                    }
                    if any(s.get("method") == "arditi" for s in selected.values())
                    else {}
                ),
            },
        ),
        Section(
            "Geometry",
            [
                f"At the pooled direction's site (layer {geometry['reference_site']['layer']}, position {geometry['reference_site']['position']})."
            ],
            figures={
                c: _png(geo / f)
                for c, f in (
                    ("Cosine similarity between category directions", "cosine_heatmap.png"),
                    ("Hierarchical clustering (1 - cos)", "dendrogram.png"),
                    ("Metric MDS", "mds.png"),
                    ("Mean off-diagonal cosine per layer", "layer_curve.png"),
                    ("Probe transfer", "probe_transfer.png"),
                    ("Selectivity", "selectivity.png"),
                )
            },
            tables={
                "Summary": pd.Series({k: v for k, v in geometry.items() if isinstance(v, (int, float))}).to_frame(
                    "value"
                )
            },
        ),
        Section(
            "Steering: refusal vs over-refusal",
            [verdict_line],
            figures={
                "RR against ORR for every direction (95% bootstrap CIs)": plots.png_bytes(figures["tradeoff.png"])
            },
            tables={
                "Trade-off curves": tradeoff.set_index(["direction", "intervention"])[
                    ["alpha", "rr", "rr_lo", "rr_hi", "orr", "orr_lo", "orr_hi", "acc"]
                ],
                "Shared-knob statistic per pair": knob.set_index(["a", "b"]),
                "Directional ablation": ablation,
            },
        ),
        Section(
            "Refusal style",
            [
                "Style of the refusals each direction induces: prompts the unsteered model answered and refuses under activation addition (all alphas).",
                f"Do the {homogeneity['n_directions']} category directions induce the same mix of styles? Chi-square test of homogeneity over "
                f"{homogeneity['n']} induced refusals: χ²({homogeneity['dof']}) = {homogeneity['chi2']:.1f}, p = {homogeneity['p_value']:.2g}, "
                f"Cramér's V = {homogeneity['cramers_v']:.2f} (0: the same mix everywhere, 1: no style shared). A prompt refused at "
                "several α counts once per α, so p is optimistic; V is the size of the difference.",
                f"Offline style classifier accuracy on {style_eval['n']} hand-labelled responses: {style_eval['accuracy']:.3f} (macro-F1 {style_eval['macro_f1']:.3f}).",
            ],
            figures={"Direction × style": plots.png_bytes(figures["style_matrix.png"])},
            tables={"Style shares": style},
        ),
        Section(
            "KL cost",
            ["Mean first-token KL(base || steered) on benign prompts, per intervention."],
            tables={"First-token KL": kl},
        ),
        Section(
            "Lineage",
            [
                f"Code commit {git_state(repo_root())['git_commit']}; whether the working tree was dirty, and the package versions, are tagged on every MLflow run."
            ],
            tables={
                "Model identity": pd.Series(identity).to_frame("value"),
                "Prompt-set digests": pd.Series(_digests(args.prompts / "sets")).to_frame("sha256"),
            },
        ),
    ]


def _digests(folder: Path) -> dict:
    import hashlib

    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    for name, help_ in (
        ("prompts", "artifacts/prompts"),
        ("model", "artifacts/model"),
        ("baseline", "artifacts/baseline"),
        ("directions", "artifacts/directions"),
        ("geometry", "artifacts/geometry"),
        ("steering", "artifacts/steering"),
        ("styles", "prompts/styles"),
    ):
        parser.add_argument(f"--{name}", type=Path, required=True, help=help_)
    parser.add_argument("--out", type=Path, required=True, help="artifacts/report")
    run_stage(STAGE, parser, main)
