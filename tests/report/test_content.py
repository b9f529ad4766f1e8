"""report.content, called in-process on the smoke pipeline's files, gives what the report stage wrote."""

import json

import pandas as pd
import pytest

from refusal_atlas.config import load_params
from refusal_atlas.judging.styles import load_labelled
from refusal_atlas.report.content import GEOMETRY_FIGURES, ReportInputs, build_report, file_digests, identity_params

pytestmark = pytest.mark.slow


def _inputs(repo, commit: str) -> ReportInputs:
    art = repo / "artifacts"
    read = lambda path: json.loads(path.read_text())  # noqa: E731
    names = sorted(p.name for p in (art / "steering").iterdir() if (p / "metrics.json").exists())
    return ReportInputs(
        summary=read(art / "prompts/summary.json"),
        sets=read(art / "prompts/manifest.json"),
        validation=read(art / "baseline/judge_validation.json"),
        crosslingual=read(art / "directions/crosslingual.json"),
        digests=file_digests(art / "prompts/sets"),
        identity=read(art / "model/identity.json"),
        baseline=read(art / "baseline/metrics.json"),
        selected=read(art / "directions/selected.json"),
        geometry=read(art / "geometry/metrics.json"),
        geometry_png={f: (art / "geometry/figures" / f).read_bytes() for _, f in GEOMETRY_FIGURES},
        sae=read(art / "sae/metrics.json"),
        sae_latents=pd.read_csv(art / "sae/latents.csv"),
        sae_png={p.name: p.read_bytes() for p in sorted((art / "sae/figures").glob("*.png"))},
        steering={n: read(art / "steering" / n / "metrics.json") for n in names},
        responses={n: pd.read_parquet(art / "steering" / n / "responses.parquet") for n in names},
        exemplars=load_labelled(repo / "prompts/styles/exemplars.jsonl"),
        labelled=load_labelled(repo / "prompts/styles/hand_labelled.jsonl"),
        commit=commit,
    )


def test_build_report_reproduces_the_stage_outputs(pipeline):
    written = (pipeline / "artifacts/report/report.html").read_text(encoding="utf-8")
    commit = written.split("Code commit ", 1)[1].split(";", 1)[0]
    report = build_report(_inputs(pipeline, commit), load_params(pipeline / "params.yaml").steering)
    assert report.html == written
    assert report.metrics == json.loads((pipeline / "artifacts/report/metrics.json").read_text())
    pd.testing.assert_frame_equal(
        report.tradeoff, pd.read_csv(pipeline / "artifacts/report/tradeoff.csv"), check_dtype=False
    )
    assert set(report.figures) == {"tradeoff.png", "sae_tradeoff.png", "style_matrix.png"}
    # The parent run's headline: pooled RR/ORR at each intervention and the shared-knob verdict counts.
    knob = report.metrics["shared_knob"]["verdicts"]
    assert sum(report.headline[f"shared_knob.{v.replace(' ', '_')}"] for v in knob) == sum(knob.values())
    assert {k for k in report.headline if k.startswith("pooled.")} >= {"pooled.ablate.rr", "pooled.ablate.orr"}
    # ... and the SAE's overlap and the pooled SAE direction's, steered in the smoke profile.
    assert {"sae.common_share", "sae.jaccard_mean", "sae.fvu", "sae_pooled.ablate.rr"} <= set(report.headline)
    assert identity_params(_inputs(pipeline, commit).identity)["model"] == "demo"


def test_intro_flags_underpowered_and_fallback_directions():
    from refusal_atlas.report.content import _intro

    identity = {"model_id": "m", "architecture": "A", "n_layers": 2, "d_model": 8, "model_revision": "local"}
    selected = {
        "a": {"underpowered": True, "min_per_side": 8, "n_target": 3, "n_baseline": 40},
        "b": {"fallback": "relax_induce"},
        "c": {},
    }
    intro = _intro(identity, selected)
    assert intro[0] == "Model m (A, 2 layers, d_model 8, revision local)."
    assert "fewer than 8 prompts" in intro[1] and "a (HR 3, BC 40)" in intro[1] and "c (" not in intro[1]
    assert "for 1 direction(s): b;" in intro[2]
    assert len(_intro(identity, {"c": {}})) == 1
