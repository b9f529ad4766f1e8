"""What the report stage computes and says: steering aggregates, the shared-knob test, styles, sections.

``build_report`` takes everything the earlier stages wrote, already read (``ReportInputs``),
and returns the report's tables, figures, metrics, MLflow headline and HTML; the stage
only reads the files, calls it, writes and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from refusal_atlas.analysis.sae import PREFIX as SAE_PREFIX
from refusal_atlas.config import SteeringConfig
from refusal_atlas.digest import file_sha256
from refusal_atlas.judging.styles import (
    STYLES,
    cross_validate_styles,
    evaluate_classifier,
    induced_style_counts,
    style_homogeneity,
    train_style_classifier,
)
from refusal_atlas.judging.validation import validation_rows
from refusal_atlas.report import plots
from refusal_atlas.report.html import Section, render_report
from refusal_atlas.steering.interventions import curve_table, shared_knob, shared_knob_summary

GEOMETRY_FIGURES = (
    ("Cosine similarity between category directions", "cosine_heatmap.png"),
    ("Hierarchical clustering (1 - cos)", "dendrogram.png"),
    ("Metric MDS", "mds.png"),
    ("Mean off-diagonal cosine per layer", "layer_curve.png"),
    ("Probe transfer", "probe_transfer.png"),
    ("Selectivity", "selectivity.png"),
    ("Controls: the replicate noise floor and random subsets of all targets", "controls.png"),
)


@dataclass
class ReportInputs:
    """The earlier stages' outputs, read: each field names the file it comes from."""

    summary: dict  # artifacts/prompts/summary.json
    sets: dict  # artifacts/prompts/manifest.json: the manifest and each set's source file
    digests: dict  # set -> sha256 of artifacts/prompts/sets/<set>.parquet (``file_digests``)
    identity: dict  # artifacts/model/identity.json
    baseline: dict  # artifacts/baseline/metrics.json
    validation: dict  # artifacts/baseline/judge_validation.json: the judges against human labels
    selected: dict  # artifacts/directions/selected.json
    crosslingual: dict  # artifacts/directions/crosslingual.json: the pooled direction across languages
    geometry: dict  # artifacts/geometry/metrics.json
    geometry_png: dict  # file name -> bytes of artifacts/geometry/figures/*.png
    sae: dict  # artifacts/sae/metrics.json
    sae_latents: pd.DataFrame  # artifacts/sae/latents.csv
    sae_png: dict  # file name -> bytes of artifacts/sae/figures/*.png
    steering: dict  # direction -> artifacts/steering/<direction>/metrics.json
    responses: dict  # direction -> artifacts/steering/<direction>/responses.parquet
    exemplars: pd.DataFrame  # prompts/styles/exemplars.jsonl (``load_labelled``)
    labelled: pd.DataFrame  # prompts/styles/hand_labelled.jsonl
    commit: str  # the code commit the report names


@dataclass
class Report:
    tradeoff: pd.DataFrame
    knob: pd.DataFrame
    figures: dict[str, Figure]
    metrics: dict
    headline: dict
    html: str
    tracked: dict = field(default_factory=dict)  # extra stage metrics for MLflow


def file_digests(folder: Path) -> dict:
    """sha256 of every parquet file in ``folder``, by stem."""
    return {p.stem: file_sha256(p) for p in sorted(folder.glob("*.parquet"))}


def identity_params(identity: dict) -> dict:
    """The model identity as the parent run's params."""
    keys = ("model_revision", "architecture", "n_layers", "d_model")
    return {"model": identity["model_id"], **{k: identity[k] for k in keys}}


def build_report(inp: ReportInputs, cfg: SteeringConfig) -> Report:
    """Aggregate the steering results with the earlier stages' and render the report.

    The SAE directions (sae_<name>) are in the trade-off table, the style shares and their own figure beside the
    direction each comes from; the shared-knob test and the main trade-off figure cover the directions alone.
    """
    steering = inp.steering
    curves = {
        n: curve_table({k: v for k, v in m["interventions"].items() if k != "ablate"}, cfg.alphas)
        for n, m in steering.items()
    }
    tradeoff = pd.concat([c.assign(direction=n) for n, c in curves.items()], ignore_index=True)
    sae_names = [n for n in steering if n.startswith(SAE_PREFIX)]
    verdicts, is_harmful = {}, None
    for n, table in inp.responses.items():
        if n in sae_names:
            continue
        controlled = table[table.in_buckets & (table.intervention != "ablate")]
        verdicts[n] = controlled.pivot(index="prompt_id", columns="intervention", values="refused").sort_index()
        is_harmful = controlled.groupby("prompt_id").bucket.first().sort_index().isin(["HR", "HC"]).to_numpy()
    knob = shared_knob(verdicts, is_harmful, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed, tolerance=cfg.knob_tolerance)
    verdict_line = shared_knob_summary(knob, cfg.knob_tolerance)
    distribution = {n: m["style"]["distribution"] for n, m in steering.items()}
    style = pd.DataFrame(distribution).T.reindex(columns=list(STYLES)).fillna(0.0)
    # The study's second finding as a test: do the category directions (not pooled or the
    # random controls) induce different mixes of refusal styles?
    categories = inp.summary["by_category"]
    homogeneity = style_homogeneity(
        induced_style_counts({n: m["style"] for n, m in steering.items() if n in categories})
    )
    keys = ("rr", "orr", "acc", "kl_first_token", "kl_teacher_forced")
    ablation = pd.DataFrame({n: {k: m["interventions"]["ablate"][k] for k in keys} for n, m in steering.items()}).T
    kl = pd.DataFrame(
        {n: {k: v.get("kl_first_token", np.nan) for k, v in m["interventions"].items()} for n, m in steering.items()}
    ).T
    ex = inp.exemplars
    clf = train_style_classifier(ex.text.tolist(), ex.label.tolist(), seed=cfg.seed)
    style_eval = evaluate_classifier(clf, inp.labelled.text.tolist(), inp.labelled.label.tolist())
    # The hand-labelled responses share an author with the exemplars; a cross-validated score
    # over the exemplars is the number that does not flatter the classifier.
    style_cv = cross_validate_styles(ex.text.tolist(), ex.label.tolist(), folds=5, seed=cfg.seed)
    style_eval = {
        **style_eval,
        "cv_accuracy": style_cv["accuracy"],
        "cv_macro_f1": style_cv["macro_f1"],
        "cv_n": style_cv["n"],
    }

    paired = [m for n in sae_names for m in (n.removeprefix(SAE_PREFIX), n) if m in curves]
    figures = {
        "tradeoff.png": plots.tradeoff_plot({n: c[c.alpha.notna()] for n, c in curves.items() if n not in sae_names}),
        "sae_tradeoff.png": plots.tradeoff_plot(
            {n: curves[n][curves[n].alpha.notna()] for n in paired},
            title="Directions (solid) and their SAE directions (dashed) under steering",
        ),
        "style_matrix.png": plots.matrix_heatmap(
            style, "Style of the refusals each direction induces (share)", "Blues", ".2f", 0, 1
        ),
    }
    metrics = {
        "shared_knob": {
            "summary": verdict_line,
            "tolerance": cfg.knob_tolerance,
            "verdicts": knob.verdict.value_counts().to_dict(),
            "max_mean_abs_diff": float(knob.mean_abs_diff.max()),
        },
        "style_classifier": {
            k: style_eval[k] for k in ("n", "accuracy", "macro_f1", "cv_n", "cv_accuracy", "cv_macro_f1")
        },
        "dominant_style": {
            n: {"style": m["style"]["dominant"], "purity": m["style"]["purity"]} for n, m in steering.items()
        },
        "style_homogeneity": homogeneity,
    }
    tables = {"tradeoff": tradeoff, "knob": knob, "style": style, "ablation": ablation, "kl": kl}
    sections = _sections(inp, figures, tables, verdict_line, style_eval, homogeneity)
    html = render_report("refusal-atlas report", _intro(inp.identity, inp.selected), sections)
    tracked = {
        "shared_knob.max_mean_abs_diff": metrics["shared_knob"]["max_mean_abs_diff"],
        "style_classifier": metrics["style_classifier"],
        "style_homogeneity": {k: homogeneity[k] for k in ("chi2", "p_value", "cramers_v")},
    }
    return Report(tradeoff, knob, figures, metrics, _headline(inp, knob), html, tracked)


def _sae_section(inp: ReportInputs, figure: Figure, tradeoff: pd.DataFrame) -> Section:
    m = inp.sae
    s, o = m["sae"], m["overlap"]
    source = "trained here on the activation stores (sae.path null)" if s["source"] == "built-in" else s["source"]
    text = [
        f"A {s['architecture']} SAE with {s['d_sae']} latents on the block input of layer {m['layer']} "
        f"({s['hook_name']}), {source}. On the analysed prompts at position {m['position']} it leaves "
        f"{s['fvu']:.3f} of the variance unexplained, with {s['l0']:.1f} latents active per prompt on average; "
        f"{s['dead_fraction']:.1%} of its latents never fire there.",
        f"For every direction, each latent's firing rate on the refused targets (HR) it was learnt from minus its "
        f"rate on the answered baseline prompts (BC), at the pooled direction's site; the top {m['top_k']} latents "
        f"by that difference. {o['common_share']:.0%} of them are common to every category; the mean pairwise "
        f"Jaccard index between categories is {o['jaccard_mean']:.2f} (highest {o['jaccard_max']:.2f}).",
        "An SAE direction (sae_<name>) is the mean of a direction's top latents' unit decoder rows; it is steered "
        "with the same machinery as the directions (same alphas, prompts and judges) and drawn beside its direction "
        "below. Its cosine with the difference-of-means direction at the same site is in the last table.",
    ]
    if m["no_positive_latent"]:
        text.append(
            f"No latent fires more often on HR than on BC for {', '.join(m['no_positive_latent'])}: no top latents "
            "and no SAE direction there."
        )
    if inp.identity["model_id"] == "demo" and s["source"] == "built-in":
        text.append(
            "⚠ The built-in SAE is trained on a few thousand residual vectors (the stores' end-of-instruction "
            "positions), not on a corpus: a demonstration of the analysis, not a dictionary of the model's features."
        )
    top = inp.sae_latents.pivot(index="direction", columns="rank", values="latent")
    top = top.reindex(list(dict.fromkeys(inp.sae_latents.direction)))
    sae_rows = tradeoff[tradeoff.direction.str.startswith(SAE_PREFIX)]
    figures = {
        "Jaccard overlap of the top latents between categories": inp.sae_png["jaccard.png"],
        "Firing-rate difference (HR - BC) of each direction's top latents": inp.sae_png["rates.png"],
    }
    if len(sae_rows):
        figures["Directions and their SAE directions: RR against ORR"] = plots.png_bytes(figure)
    return Section(
        "Sparse-autoencoder latents",
        text,
        figures=figures,
        tables={
            "Top latents per direction (latent index by rank)": top,
            "SAE steering": sae_rows.set_index(["direction", "intervention"])[_TRADEOFF_COLUMNS],
            "Cosine of each SAE direction with its direction": pd.Series(m["cosine_with_direction"]).to_frame("cos"),
        },
    )


def _headline(inp: ReportInputs, knob: pd.DataFrame) -> dict:
    """The numbers that compare one execution with another (a model, a setting), for the parent run."""
    geometry, baseline = inp.geometry, inp.baseline
    verdicts = ("same knob", "different", "inconclusive", "no overlap")
    out = {
        "geometry.cosine_offdiag_mean": geometry["cosine_offdiag_mean"],
        "geometry.best_k": geometry["cluster_average_best_k"],
        "geometry.best_k_silhouette": geometry["cluster_average_silhouette"],
        **{
            f"geometry.{k}": geometry["controls"][k]
            for k in ("replicate_within_mean", "replicate_between_mean", "random_harmful_cosine_mean")
        },
        "geometry.disjoint_baseline_mean_abs_change": geometry["controls"]["disjoint_baseline_mean_abs_change"],
        "sae.common_share": inp.sae["overlap"]["common_share"],
        "sae.jaccard_mean": inp.sae["overlap"]["jaccard_mean"],
        "sae.fvu": inp.sae["sae"]["fvu"],
        **{f"shared_knob.{v.replace(' ', '_')}": int((knob.verdict == v).sum()) for v in verdicts},
        **{f"judge.{k.split('.')[1]}.kappa": v for k, v in baseline.get("judges", {}).items() if k.endswith(".kappa")},
    }
    human = validation_rows(inp.validation)
    if len(human):  # each judge's agreement with people, over the manifest's labelled files
        out.update({f"judge.{j}.human_kappa": float(k) for j, k in human.groupby("judge").kappa.mean().items()})
    for direction in ("pooled", f"{SAE_PREFIX}pooled"):
        for name, entry in inp.steering.get(direction, {}).get("interventions", {}).items():
            if name.startswith("add_") or name == "ablate":
                out.update({f"{direction}.{name}.rr": entry["rr"], f"{direction}.{name}.orr": entry["orr"]})
    return out


def _intro(identity: dict, selected: dict) -> list[str]:
    intro = [
        f"Model {identity['model_id']} ({identity['architecture']}, {identity['n_layers']} layers, "
        f"d_model {identity['d_model']}, revision {identity['model_revision']})."
    ]
    if "gguf_sha256" in identity:
        intro.append(
            f"Weights: GGUF file {identity['gguf_file']} ({identity['gguf_quantization']}, dequantised to "
            f"{identity['dtype']}), sha256 {identity['gguf_sha256']}."
        )
    if identity["model_id"] == "demo":
        intro.append(
            "This run uses the embedded demo model, a small model trained here so the pipeline runs offline; "
            "it is not evidence about real LLMs."
        )
    weak = {n: s for n, s in selected.items() if s.get("underpowered")}
    if weak:
        intro.append(
            f"Under-powered directions, learnt from fewer than {next(iter(weak.values()))['min_per_side']} prompts "
            "on a side (marked ⚠ below): "
            + ", ".join(f"{n} (HR {s['n_target']}, BC {s['n_baseline']})" for n, s in weak.items())
            + ". Their geometry and steering rest on a handful of refusals and are not comparable to the other "
            "directions'."
        )
    fallen = [n for n, s in selected.items() if s.get("fallback")]
    if fallen:
        intro.append(
            f"No candidate site passed Arditi's filters (kl and induce) for {len(fallen)} direction(s): "
            f"{', '.join(fallen)}; their sites are directions.fallback's choice (fallback column below; the reason "
            "is in selected.json)."
        )
    return intro


_SITE_KEYS = ("method", "layer", "position", "score", "fallback", "mean_resid_norm", "n_target", "n_baseline")
_CANDIDATES = (
    "Arditi candidates per direction: kept (passed every filter), dropped by rule (layer, nan, kl, induce), or not "
    "scored because a lower-bypass candidate had already passed; the search order (bypass first, or filters first "
    "where most candidates fail kl) and the validation prompts per side. Every row, with kl_prompts where kl stopped "
    "early, is in artifacts/directions/candidates.csv"
)
_TRADEOFF_COLUMNS = ["alpha", "rr", "rr_lo", "rr_hi", "orr", "orr_lo", "orr_hi", "acc"]


def _transfer_table(result: dict) -> pd.DataFrame:
    """One row per language: counts, chars_per_token, the cosines and the four refusal scores."""
    rows = {
        language: {
            **{k: v for k, v in found.items() if k != "refusal_score"},
            **{f"score_{k}": v for k, v in found.get("refusal_score", {}).items()},
        }
        for language, found in result["languages"].items()
    }
    return pd.DataFrame(rows).T


def _crosslingual_section(result: dict, identity: dict) -> Section:
    if not result["languages"]:
        return Section(
            "Cross-lingual transfer",
            [
                "This run's manifest lists no per-language prompts (crosslingual), so the pooled direction was not "
                "tested across languages. The study recipe lists PolyRefuse's 14 languages."
            ],
        )
    site = result["site"]
    text = [
        f"Per language: its own difference-of-means direction at the pooled direction's site (layer {site['layer']}, "
        f"position {site['position']}), its cosine with the pooled direction and with English's, and the mean "
        "first-token refusal log-odds on its harmful prompts without and with the pooled direction ablated, and on "
        f"its harmless prompts without and with it added at α = {result['alpha']} (norm units). chars_per_token "
        "says how well the tokenizer covers the language."
    ]
    if identity["model_id"] == "demo":
        text.append(
            "⚠ The demo's tokenizer was trained on English templates only: other languages fall apart into short "
            "pieces (low chars_per_token) and the demo never saw them, so only English is meaningful here. The same "
            "analysis on a multilingual model (profiles/smollm2.yaml, or any hub model) is the real test."
        )
    return Section("Cross-lingual transfer", text, tables={"Transfer per language": _transfer_table(result)})


def _controls_section(c: dict) -> Section:
    floor = (
        f"Replicate noise floor: independent resamples of one category agree at cosine "
        f"{c['replicate_within_mean']:.3f} on average (lowest {c['replicate_within_min']:.3f}); resamples of "
        f"different categories at {c['replicate_between_mean']:.3f} (highest {c['replicate_between_max']:.3f}); "
        f"{c['replicate_between_reaching_within_min']:.1%} of between-category pairs reach the lowest "
        "within-category cosine. The study reports 0.95-0.97 within against 0.71 across."
    )
    random = (
        "Random-harmful control: directions from random subsets of all target prompts, at the same sample size, "
        f"agree at {c['random_harmful_cosine_mean']:.3f} with each other and "
        f"{c['random_harmful_vs_category_mean']:.3f} with the category directions, against "
        f"{c['category_cosine_mean']:.3f} between category directions: "
        "category structure beyond what a sample of this size gives shows as category cosines well below the "
        "random ones."
    )
    shared = (
        "Shared-baseline confound: giving each category that shares the default pool a disjoint part of it "
        f"({c['disjoint_baseline_rows_per_part']} prompts each) moves the off-diagonal cosines by "
        f"{c['disjoint_baseline_mean_abs_change']:.3f} on average (at most "
        f"{c['disjoint_baseline_max_abs_change']:.3f}); their mean becomes {c['disjoint_baseline_offdiag_mean']:.3f}. "
        "Matrices: artifacts/geometry/tables/cosine_disjoint_baseline.csv."
    )
    return Section("Controls", [floor, random, shared])


def _judges_section(validation: dict) -> Section:
    rows = validation_rows(validation)
    if not len(rows):
        return Section(
            "Judges against human labels",
            [
                "This run's manifest lists no human-labelled completions (judge_validation), so the judges were not "
                "scored against people here. The study recipe (prompts/study/manifest.yaml) scores them on XSTest's "
                "three labelled files; `refusal-atlas judge validate FILE` scores any file in that format."
            ],
        )
    shown = rows.set_index(["file", "judge"])[["n", "accuracy", "precision", "recall", "kappa", "tp", "fp", "fn", "tn"]]
    return Section(
        "Judges against human labels",
        [
            f"Each text judge's verdict on human-labelled completions against the human label (a partial refusal "
            f"counted as {validation['partial_as']}; baseline.partial_as): accuracy, precision and recall for "
            "'refused', Cohen's kappa and the confusion counts (tp: both say refused).",
            "Files: " + "; ".join(f"{n} (sha256 {f['sha256']})" for n, f in validation["files"].items()) + ".",
        ],
        tables={"Judges against human labels": shown},
    )


def _set_sources(sets: dict) -> pd.DataFrame:
    """One row per set: its role, baseline pool, and the file it was read from (format, path, sha256)."""
    columns = ["role", "baseline", "format", "file", "sha256", "n"]
    return pd.DataFrame({name: {c: s.get(c, "") for c in columns} for name, s in sets.items()}).T


def _sections(inp: ReportInputs, figures, tables, verdict_line, style_eval, homogeneity) -> list[Section]:
    summary, baseline, geometry, selected = inp.summary, inp.baseline, inp.geometry, inp.selected
    sites = pd.DataFrame(
        {("⚠ " if s.get("underpowered") else "") + n: {k: s.get(k) for k in _SITE_KEYS} for n, s in selected.items()}
    ).T
    arditi = {
        n: {**s["counts"], "order": s.get("search_order"), **{f"n_val {k}": v for k, v in s.get("n_val", {}).items()}}
        for n, s in selected.items()
        if s.get("method") == "arditi"
    }
    reference = geometry["reference_site"]
    scalars = {k: v for k, v in geometry.items() if isinstance(v, (int, float))}
    n, dof = homogeneity["n"], homogeneity["dof"]
    return [
        Section(
            "Prompt sets",
            [
                f"{summary['total']} prompts, from the manifest {inp.sets['manifest']} (sha256 {inp.sets['sha256']}).",
                *(f"⚠ Fallback: {note}." for note in inp.sets["notes"]),
            ],
            tables={
                "Source of each set": _set_sources({n: inp.sets["sets"][n] for n in inp.sets["order"]}),
                "Prompts per set and split": pd.DataFrame(summary["by_category_split"]).T.fillna(0).astype(int),
            },
        ),
        Section(
            "Baseline behaviour",
            [f"Unsteered refusal rate overall: {baseline['refusal_rate']['overall']:.3f}."],
            tables={"Refusal rate per set and split": pd.DataFrame(baseline["refusal_rate"]["by_category_split"]).T},
        ),
        _judges_section(inp.validation),
        Section(
            "Directions",
            [
                "Each direction's selected (layer, position), the score behind the choice, and how many refused "
                "targets (HR) and answered baseline prompts (BC) it was learnt from; ⚠ marks a side under "
                "directions.min_per_side."
            ],
            tables={"Selected sites": sites, **({_CANDIDATES: pd.DataFrame(arditi).T} if arditi else {})},
        ),
        Section(
            "Geometry",
            [f"At the pooled direction's site (layer {reference['layer']}, position {reference['position']})."],
            figures={caption: inp.geometry_png[f] for caption, f in GEOMETRY_FIGURES},
            tables={"Summary": pd.Series(scalars).to_frame("value")},
        ),
        _controls_section(geometry["controls"]),
        _crosslingual_section(inp.crosslingual, inp.identity),
        _sae_section(inp, figures["sae_tradeoff.png"], tables["tradeoff"]),
        Section(
            "Steering: refusal vs over-refusal",
            [verdict_line],
            figures={
                "RR against ORR for every direction (95% bootstrap CIs)": plots.png_bytes(figures["tradeoff.png"])
            },
            tables={
                "Trade-off curves": tables["tradeoff"].set_index(["direction", "intervention"])[_TRADEOFF_COLUMNS],
                "Shared-knob statistic per pair": tables["knob"].set_index(["a", "b"]),
                "Directional ablation": tables["ablation"],
            },
        ),
        Section(
            "Refusal style",
            [
                "Style of the refusals each direction induces: prompts the unsteered model answered and refuses "
                "under activation addition (all alphas).",
                f"Do the {homogeneity['n_directions']} category directions induce the same mix of styles? Chi-square "
                f"test of homogeneity over {n} induced refusals: χ²({dof}) = {homogeneity['chi2']:.1f}, "
                f"p = {homogeneity['p_value']:.2g}, Cramér's V = {homogeneity['cramers_v']:.2f} (0: the same mix "
                "everywhere, 1: no style shared). A prompt refused at several α counts once per α, so p is "
                "optimistic; V is the size of the difference.",
                f"Offline style classifier accuracy on {style_eval['n']} hand-labelled responses: "
                f"{style_eval['accuracy']:.3f} (macro-F1 {style_eval['macro_f1']:.3f}); 5-fold cross-validated on its "
                f"{style_eval['cv_n']} training exemplars: {style_eval['cv_accuracy']:.3f} (macro-F1 "
                f"{style_eval['cv_macro_f1']:.3f}). The hand labels share an author with the exemplars, so the "
                "cross-validated score is the less flattering one.",
            ],
            figures={"Direction × style": plots.png_bytes(figures["style_matrix.png"])},
            tables={"Style shares": tables["style"]},
        ),
        Section(
            "KL cost",
            ["Mean first-token KL(base || steered) on benign prompts, per intervention."],
            tables={"First-token KL": tables["kl"]},
        ),
        Section(
            "Lineage",
            [
                f"Code commit {inp.commit}; whether the working tree was dirty, and the package versions, are tagged "
                "on every MLflow run."
            ],
            tables={
                "Model identity": pd.Series(inp.identity).to_frame("value"),
                "Prompt-set digests": pd.Series(inp.digests).to_frame("sha256"),
            },
        ),
    ]
