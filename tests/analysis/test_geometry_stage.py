"""The directions, geometry and sae stages, end to end, recover directions planted at known angles.

tests/analysis/test_geometry.py checks the geometry functions on planted unit vectors. Here the
real stage scripts (stages/directions.py, stages/geometry.py, stages/sae.py) run as subprocesses on
synthetic inputs written in the exact formats the pipeline hands them: finished
activation stores (``store.create_store`` + ``store.write_batch`` + ``finalize_store``,
with the attributes stages/activations.py writes), the model stage's identity.json, the
prompt table and the prompt sets' manifest.json. ``directions.select: fixed`` at the planted site means no
model is loaded, so nothing here needs a forward pass.

The plant: six categories whose refusal directions have a two-cluster Gram matrix
(cosine 0.8 within {a, b, c} and within {d, e, f}, 0.1 across). Every prompt's residual
is a shared mean plus unit Gaussian noise; a category's refused prompts add
``SHIFT * u_category`` at the planted (layer, position) only. Decoys make a wrong site or
a broken behaviour filter visible: at another layer every category shares one direction,
the answered target prompts are shifted along unrelated directions, and the refused
benign prompts along another.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import REPO, run
from sklearn.metrics import silhouette_score

from refusal_atlas.analysis.sae import save_sae
from refusal_atlas.data import store
from refusal_atlas.data.prompts import CROSSLINGUAL_COLUMNS

pytestmark = pytest.mark.slow

D_MODEL, N_LAYERS = 64, 4
LAYERS = list(range(N_LAYERS + 1))  # block inputs 0..L-1 and the final residual L, as stages/activations.py stores them
POSITIONS, POSITION_TOKENS = [-2, -1], ["<eoi>", "\n"]
SITE_LAYER, SITE_POSITION = 2, -1  # the planted site, chosen with directions.select: fixed
DECOY_LAYER = 1  # here every category's refused prompts share ONE direction (a single "knob")
CATS = ["cat_a", "cat_b", "cat_c", "cat_d", "cat_e", "cat_f"]
TRUTH = np.array([0, 0, 0, 1, 1, 1])
INNER, ACROSS = 0.8, 0.1
N_PER_SIDE = 32
SIGMA, SHIFT = 1.0, 100.0
BATCH = 16
# Tolerance on recovered cosines. Each direction is a difference of means of 32 vs 32
# prompts, so its noise e has sd SIGMA * sqrt(2/32) = 0.25 per coordinate (|e| ~ 2 in
# d = 64) against a planted shift of 100. The cosine of two estimated directions differs
# from the planted one by (u_a.e_b + u_b.e_a) / SHIFT, sd ~ sqrt(2) * 0.25 / 100 = 0.0035,
# plus a bias of at most |e|^2 / SHIFT^2 = 0.0004; 0.02 is more than 5 sd.
COS_TOL = 0.02

IDENTITY = {  # the keys model.load.compute_identity writes into artifacts/model/identity.json
    "model_id": "synthetic-planted",
    "model_revision": "local",
    "architecture": "SyntheticForCausalLM",
    "n_layers": N_LAYERS,
    "d_model": D_MODEL,
    "dtype": "float32",
    "config_sha256": "c" * 64,
    "weights_fingerprint": "f" * 64,
    "template_sha256": "e" * 64,
}


def planted_gram() -> np.ndarray:
    gram = np.where(TRUTH[:, None] == TRUTH[None, :], INNER, ACROSS)
    np.fill_diagonal(gram, 1.0)
    return gram


def planted_units(gram: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors [k, D_MODEL] whose Gram matrix is exactly ``gram``, in a random orthonormal basis."""
    lam, vec = np.linalg.eigh(gram)
    assert lam.min() > -1e-9, f"planted Gram is not positive semi-definite: {lam}"
    coords = vec * np.sqrt(np.clip(lam, 0.0, None))
    basis = np.linalg.qr(rng.standard_normal((D_MODEL, len(gram))))[0]
    return coords @ basis.T


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def write_store(path: Path, name: str, rows: pd.DataFrame, values: np.ndarray) -> None:
    """A finished activation store, written the way stages/activations.py writes one."""
    # Store order is by token length, then id (activations.store_order).
    order = np.lexsort((rows.prompt_id.to_numpy(), rows.n_tokens.to_numpy()))
    rows, values = rows.iloc[order].reset_index(drop=True), values[order]
    attrs = {
        **{k if k.startswith(("model_", "template_")) else f"model_{k}": v for k, v in IDENTITY.items()},
        "inputs_fingerprint": f"synthetic-{name}",
        "code_version": "activations-v1",
        "prompt_set": name,
    }
    store.create_store(path, rows, LAYERS, POSITIONS, POSITION_TOKENS, D_MODEL, "float32", BATCH, attrs)
    for b in range(-(-len(rows) // BATCH)):
        store.write_batch(path, b, values[b * BATCH : (b + 1) * BATCH])
    store.finalize_store(path)


def build_inputs(root: Path, units: np.ndarray, rng: np.random.Generator) -> dict[str, Path]:
    """Manifest, prompt table, activation stores and identity.json under ``root``; returns their paths."""
    mean = 3.0 * rng.standard_normal((len(LAYERS), len(POSITIONS), D_MODEL))  # shared by every prompt
    knob = _unit(rng.standard_normal(D_MODEL))  # the decoy layer's single shared direction
    pi = POSITIONS.index(SITE_POSITION)
    # (split, refused, count); the behaviour filter must keep only refused targets and answered baselines.
    layout = {
        "target": [("train", True, 32), ("train", False, 8), ("val", True, 4), ("test", True, 16)],
        "baseline": [("train", False, 64), ("train", True, 16), ("val", False, 8), ("test", False, 32)],
    }
    sets = {**{c: ("target", units[i]) for i, c in enumerate(CATS)}, "benign": ("baseline", None)}
    act_dir = root / "artifacts" / "activations"
    paths = {
        "manifest": root / "artifacts" / "prompts" / "manifest.json",
        "crosslingual": root / "artifacts" / "prompts" / "crosslingual.parquet",
        "prompts": root / "artifacts" / "prompts" / "prompts.parquet",
        "activations": act_dir,
        "model": root / "artifacts" / "model",
        "params": root / "params.yaml",
    }
    for folder in (act_dir, paths["model"], paths["manifest"].parent, paths["prompts"].parent):
        folder.mkdir(parents=True, exist_ok=True)
    table = []
    for name, (role, unit) in sets.items():
        rows = pd.DataFrame(
            [(split, refused) for split, refused, n in layout[role] for _ in range(n)], columns=["split", "refused"]
        )
        rows.insert(0, "prompt_id", [f"{name}-{i:03d}" for i in range(len(rows))])
        rows = rows.assign(category=name, role=role, n_tokens=rng.integers(6, 30, len(rows)))
        values = mean + SIGMA * rng.standard_normal((len(rows), len(LAYERS), len(POSITIONS), D_MODEL))
        refused, answered = rows.refused.to_numpy(), ~rows.refused.to_numpy()
        if role == "target":
            values[refused, SITE_LAYER, pi] += SHIFT * unit
            values[refused, DECOY_LAYER, pi] += SHIFT * knob
            # Answered targets lie along unrelated directions: learning from them would bend the direction.
            values[answered, SITE_LAYER, pi] += SHIFT * _unit(rng.standard_normal(D_MODEL))
        else:
            values[refused, SITE_LAYER, pi] += SHIFT * _unit(rng.standard_normal(D_MODEL))
        write_store(act_dir / f"{name}.zarr", name, rows, values.astype(np.float32))
        texts = [f"synthetic prompt {i}" for i in rows.prompt_id]
        table.append(
            rows.assign(text=texts, source="synthetic", sha256="0" * 64)[
                ["prompt_id", "category", "role", "split", "text", "source", "sha256"]
            ]
        )

    sets = {c: {"role": "target", "baseline": "benign"} for c in CATS} | {"benign": {"role": "baseline"}}
    paths["manifest"].write_text(json.dumps({"sets": sets, "order": list(sets)}))  # as the prompts stage writes it
    pd.DataFrame(columns=CROSSLINGUAL_COLUMNS).to_parquet(paths["crosslingual"], index=False)  # no languages
    pd.concat(table, ignore_index=True).to_parquet(paths["prompts"], index=False)
    (paths["model"] / "identity.json").write_text(json.dumps(IDENTITY))
    paths["params"].write_text(
        yaml.safe_dump(
            {
                "directions": {
                    "select": "fixed",
                    "layer": SITE_LAYER,
                    "position": SITE_POSITION,
                    "n_per_side": N_PER_SIDE,
                    "allow_fewer": True,
                    "filter": "behaviour",
                    "method": "mean_diff",
                    "seed": 0,
                    "n_random": 2,
                    "n_draws": 10,
                },
                "geometry": {
                    "n_draws": 10,
                    "n_permutations": 200,
                    "top_k": 3,
                    "max_clusters": 6,
                    "cv_folds": 3,
                    "seed": 0,
                },
                # An absolute sqlite URI in the tmp dir (the stages also run with cwd there, so MLflow's
                # artifact root lands in it too): nothing is logged into the repository.
                "tracking": {"uri": f"sqlite:///{(root / 'mlflow.db').resolve()}", "experiment": "geometry-stage-test"},
            }
        )
    )
    return paths


def test_directions_and_geometry_stages_recover_planted_angles(tmp_path: Path):
    rng = np.random.default_rng(0)
    gram = planted_gram()
    units = planted_units(gram, rng)
    paths = build_inputs(tmp_path, units, rng)
    out_dir, out_geo = tmp_path / "artifacts" / "directions", tmp_path / "artifacts" / "geometry"
    common = [
        "--params",
        str(paths["params"]),
        "--no-progress",
        "--sets",
        str(paths["manifest"]),
        "--activations",
        str(paths["activations"]),
        "--model",
        str(paths["model"]),
    ]
    run(
        [
            sys.executable,
            str(REPO / "stages" / "directions.py"),
            *common,
            "--prompts",
            str(paths["prompts"]),
            "--crosslingual",
            str(paths["crosslingual"]),
            "--out",
            str(out_dir),
        ],
        tmp_path,
        timeout=600,
    )
    run(
        [
            sys.executable,
            str(REPO / "stages" / "geometry.py"),
            *common,
            "--directions",
            str(out_dir),
            "--out",
            str(out_geo),
        ],
        tmp_path,
        timeout=600,
    )

    # directions: every site is the fixed one, the behaviour filter kept exactly the refused
    # train targets and answered train baselines, and each unit vector is the planted one.
    selected = json.loads((out_dir / "selected.json").read_text())
    assert set(selected) == {*CATS, "pooled", "random_0", "random_1"}
    assert all((s["layer"], s["position"]) == (SITE_LAYER, SITE_POSITION) for s in selected.values()), selected
    counts = json.loads((out_dir / "metrics.json").read_text())["counts"]
    assert all(counts[c] == {"n_target": N_PER_SIDE, "n_baseline": N_PER_SIDE} for c in CATS), counts
    assert counts["pooled"] == {"n_target": 64, "n_baseline": 64}, (
        counts
    )  # capped by benign's 64 answered train prompts
    atlas = store.open_directions(out_dir / "directions.zarr", d_model=D_MODEL)
    got = (
        atlas["direction"].sel(direction_name=CATS, layer=SITE_LAYER, position=SITE_POSITION).values.astype(np.float64)
    )
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    agreement = np.einsum("kd,kd->k", got, units)
    assert (agreement > 0.99).all(), dict(zip(CATS, agreement.round(4)))
    for c in CATS:
        site = json.loads((out_dir / "sites" / f"{c}.json").read_text())
        assert site["d_model"] == D_MODEL and float(np.dot(site["unit"], units[CATS.index(c)])) > 0.99

    # geometry: the cosine matrix is the planted Gram.
    cos = pd.read_csv(out_geo / "tables" / "cosine.csv", index_col=0)
    assert list(cos.index) == CATS and list(cos.columns) == CATS
    err = np.abs(cos.to_numpy() - gram)
    assert err.max() < COS_TOL, f"recovered cosines differ from the plant by up to {err.max():.4f}:\n{cos.round(3)}"
    metrics = json.loads((out_geo / "metrics.json").read_text())
    assert metrics["reference_site"] == {"layer": SITE_LAYER, "position": SITE_POSITION}
    off = ~np.eye(len(CATS), dtype=bool)
    assert metrics["cosine_offdiag_mean"] == pytest.approx(gram[off].mean(), abs=COS_TOL)

    # Clustering finds the two planted clusters: k = 2 is best for both linkages, with the
    # planted partition's silhouette (1 - 0.2/0.9 = 0.78 on the exact Gram; 0.02 on every
    # cosine moves it by under 0.03). Every within-cluster cosine exceeding every across one
    # means both linkages merge within clusters first, so their k = 2 cut is the plant.
    same = TRUTH[:, None] == TRUTH[None, :]
    assert cos.to_numpy()[same & off].min() > cos.to_numpy()[~same].max()
    expected_sil = silhouette_score(1.0 - gram, TRUTH, metric="precomputed")
    for method in ("average", "complete"):
        assert metrics[f"cluster_{method}_best_k"] == 2, metrics
        assert metrics[f"cluster_{method}_silhouette"] == pytest.approx(expected_sil, abs=0.03)
    sil = pd.read_csv(out_geo / "tables" / "silhouette.csv").set_index("k")
    assert (sil.idxmax() == 2).all(), sil
    # The memberships behind those scores: at k = 2 each linkage groups exactly the planted clusters.
    clusters = pd.read_csv(out_geo / "tables" / "clusters.csv", index_col="direction").loc[CATS]
    for method in ("average", "complete"):
        ids = clusters[f"{method}_k2"].to_numpy()
        assert (ids[:, None] == ids[None, :]).tolist() == same.tolist(), clusters

    # Effective rank k^2 / |G|_F^2 of the planted Gram (2.60); cosines within 0.02 keep it within 5 %.
    assert metrics["participation_ratio"] == pytest.approx(len(CATS) ** 2 / np.sum(gram**2), rel=0.05)
    # Held-out refused prompts project SHIFT * cos(u_row, u_column) onto each direction (benign subtracted).
    select = pd.read_csv(out_geo / "tables" / "selectivity.csv", index_col=0)
    np.testing.assert_allclose(select.loc[CATS, CATS].to_numpy() / SHIFT, gram, atol=COS_TOL)
    assert metrics["probe_accuracy_mean"] > 0.95
    assert metrics["distinctness_max_pair_p"] < 0.05  # even the 0.8 pairs differ beyond resampling noise

    # Across layers: the planted mean off-diagonal cosine at the site, ~1 at the single-knob decoy layer.
    curve = pd.read_csv(out_geo / "layer_curve.csv").set_index("layer")["mean_offdiag_cosine"]
    assert curve[SITE_LAYER] == pytest.approx(gram[off].mean(), abs=COS_TOL)
    assert curve[DECOY_LAYER] > 0.99

    # The sae stage, with an SAE in sae-lens's format at sae.path whose first six latents read the planted
    # directions (the dual basis: latent i reads the coefficient of u_i alone, firing past 50 of the shift's 100)
    # and whose other latents read directions no prompt was shifted along.
    sae_dir, out_sae = tmp_path / "planted_sae", tmp_path / "artifacts" / "sae"
    save_sae(planted_sae(units, rng), sae_dir)
    params = yaml.safe_load(paths["params"].read_text())
    params["sae"] = {"path": str(sae_dir), "top_k": 1, "steer": None}  # null: every direction's SAE direction
    paths["params"].write_text(yaml.safe_dump(params))
    run([sys.executable, str(REPO / "stages" / "sae.py"), *common, "--directions", str(out_dir), "--out", str(out_sae)],
        tmp_path, timeout=600)  # fmt: skip
    latents = pd.read_csv(out_sae / "latents.csv").set_index("direction")
    assert latents.loc[CATS, "latent"].tolist() == list(range(len(CATS)))  # each category's own planted latent
    assert (latents.loc[CATS, "rate_target"] == 1.0).all() and (latents.loc[CATS, "rate_baseline"] == 0.0).all()
    metrics = json.loads((out_sae / "metrics.json").read_text())
    assert metrics["overlap"] == {"common_share": 0.0, "jaccard_mean": 0.0, "jaccard_max": 0.0}
    assert (metrics["layer"], metrics["position"], metrics["sae"]["architecture"]) == (SITE_LAYER, SITE_POSITION,
                                                                                       "jumprelu")  # fmt: skip
    assert min(metrics["cosine_with_direction"][c] for c in CATS) > 1 - COS_TOL
    source = json.loads((out_sae / "model" / "SOURCE.json").read_text())
    assert source["path"] == str(sae_dir) and len(source["sae_weights.safetensors_sha256"]) == 64
    site = json.loads((out_sae / "sites" / "sae_cat_d.json").read_text())
    assert np.dot(site["unit"], units[3]) == pytest.approx(1.0, abs=1e-6)  # latent 3's decoder row is u_d
    assert {p.stem for p in (out_sae / "sites").iterdir()} == {f"sae_{n}" for n in [*CATS, "pooled"]}
    # An SAE for another layer than the stores hold is refused, naming the layers there are.
    save_sae(planted_sae(units, rng, layer=9), sae_dir.with_name("layer9"))
    params["sae"]["path"] = str(sae_dir.with_name("layer9"))
    paths["params"].write_text(yaml.safe_dump(params))
    failed = run([sys.executable, str(REPO / "stages" / "sae.py"), *common, "--directions", str(out_dir), "--out",
                  str(tmp_path / "never")], tmp_path, check=False)  # fmt: skip
    assert failed.returncode == 2 and "reads layer 9, but the activation stores hold layers [0, 1, 2, 3, 4]" in (
        failed.stderr
    )
    assert not (tmp_path / "never").exists()

    # The stages logged their runs to the tmp sqlite store.
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        stages = {v for (v,) in db.execute("SELECT value FROM tags WHERE key = 'refusal_atlas.stage'")}
    assert stages == {"directions", "geometry", "sae"}


def planted_sae(units: np.ndarray, rng: np.random.Generator, layer: int = SITE_LAYER):
    """A JumpReLU SAE on block input ``layer``: latent i < len(units) decodes to u_i and encodes with the i-th dual
    vector (so it reads u_i's coefficient alone); ten more latents read random directions orthogonal to the plant."""
    from refusal_atlas.analysis.sae import SparseAutoencoder

    dual = np.linalg.pinv(units)  # [D_MODEL, k]: units @ dual = I
    free = np.linalg.qr(np.concatenate([units.T, rng.standard_normal((D_MODEL, 10))], axis=1))[0][:, len(units) :]
    d_sae = len(units) + free.shape[1]
    return SparseAutoencoder(
        architecture="jumprelu",
        W_enc=np.concatenate([dual, free], axis=1).astype(np.float32),
        b_enc=np.zeros(d_sae, np.float32),
        W_dec=np.concatenate([units, free.T]).astype(np.float32),
        b_dec=np.zeros(D_MODEL, np.float32),
        threshold=np.full(d_sae, SHIFT / 2, np.float32),
        layer=layer,
        hook_name=f"blocks.{layer}.hook_resid_pre",
    )


def test_select_sites_and_analyse_geometry_recover_the_plant_in_process(tmp_path: Path):
    """The library functions behind the two stages, called directly on the same synthetic stores:
    ``select_sites`` (fixed site, so ``load_model`` must never be called) and ``analyse_geometry``."""
    from refusal_atlas.analysis.atlas import build_atlas
    from refusal_atlas.analysis.geometry_analysis import analyse_geometry, dvc_plot_tables
    from refusal_atlas.analysis.selection import select_sites
    from refusal_atlas.config import load_params

    rng = np.random.default_rng(0)
    gram = planted_gram()
    units = planted_units(gram, rng)
    paths = build_inputs(tmp_path, units, rng)
    params = load_params(paths["params"])
    stores = {n: store.open_store(paths["activations"] / f"{n}.zarr") for n in [*CATS, "benign"]}
    pools = {c: "benign" for c in CATS}
    cfg = params.directions
    atlas = build_atlas(stores, pools, cfg.n_per_side, cfg.filter, cfg.method, cfg.seed, cfg.n_random, cfg.allow_fewer)
    prompts = pd.read_parquet(paths["prompts"])

    def no_model():
        raise AssertionError("select: fixed must not load the model")

    result = select_sites(atlas, stores, prompts, pools, N_LAYERS, cfg, params.model, no_model, progress=False)
    assert result.search is None and result.candidates == []
    assert set(result.selected) == {*CATS, "pooled", "random_0", "random_1"}
    assert all((s["layer"], s["position"]) == (SITE_LAYER, SITE_POSITION) for s in result.selected.values())
    assert result.selected["random_1"]["method"] == "copied from pooled"
    assert result.metrics["counts"]["pooled"] == {"n_target": 64, "n_baseline": 64}
    # Planted directions are stable: resampled halves agree almost perfectly at the site.
    assert min(s["within_cos_mean"] for s in result.metrics["stability"].values()) > 0.99
    assert result.metrics["underpowered"]["n"] == 0
    # The site's mean residual norm: |shared mean + noise (+ shift on refused targets)| over the lineage.
    assert all(s["mean_resid_norm"] > 0 for s in result.selected.values())

    # The random controls follow directions.n_random, in the atlas and in the sites steering reads.
    three = cfg.model_copy(update={"n_random": 3})
    atlas3 = build_atlas(stores, pools, three.n_per_side, three.filter, three.method, three.seed, 3, three.allow_fewer)
    assert {n for n in atlas3.direction_name.values if n.startswith("random")} == {"random_0", "random_1", "random_2"}
    sites3 = select_sites(atlas3, stores, prompts, pools, N_LAYERS, three, params.model, no_model, progress=False)
    assert sorted(n for n in sites3.selected if n.startswith("random")) == ["random_0", "random_1", "random_2"]

    geometry = analyse_geometry(atlas, stores, pools, {"layer": SITE_LAYER, "position": SITE_POSITION}, params.geometry)
    assert list(geometry.cos.index) == CATS
    assert np.abs(geometry.cos.to_numpy() - gram).max() < COS_TOL
    assert geometry.metrics["cluster_average_best_k"] == 2
    curve = dvc_plot_tables(geometry)["layer_curve.csv"].set_index("layer")["mean_offdiag_cosine"]
    off = ~np.eye(len(CATS), dtype=bool)
    assert curve[SITE_LAYER] == pytest.approx(gram[off].mean(), abs=COS_TOL) and curve[DECOY_LAYER] > 0.99

    # The controls on the planted stores: resamples of one category agree far more than across categories, random
    # subsets of all targets agree with each other far more than the planted categories do, and splitting the
    # shared benign pool (pure noise here) barely moves the cosines.
    c = geometry.metrics["controls"]
    assert c["replicate_within_mean"] > 0.95 and c["replicate_within_min"] > 0.9
    assert c["replicate_between_mean"] == pytest.approx(gram[off].mean(), abs=0.05)
    assert c["replicate_between_max"] < c["replicate_within_min"] and c["replicate_between_reaching_within_min"] == 0
    assert c["category_cosine_mean"] == pytest.approx(gram[off].mean(), abs=COS_TOL)
    assert c["random_harmful_cosine_mean"] > c["category_cosine_mean"] + 0.2
    from refusal_atlas.analysis.atlas import site_arrays

    li, pi = list(atlas.layer.values).index(SITE_LAYER), list(atlas.position.values).index(SITE_POSITION)
    answered = site_arrays(stores, ["benign"], "baseline", "behaviour", "train", li, pi)["benign"]  # BC, train split
    assert c["disjoint_baseline_rows_per_part"] == len(answered) // len(CATS) > 5
    assert c["disjoint_baseline_mean_abs_change"] < 0.05
    assert set(geometry.controls["shared_baseline"]["self_cosine"]) == set(CATS)
    assert min(geometry.controls["shared_baseline"]["self_cosine"].values()) > 0.95
