"""DVC stage `geometry`: how the category directions relate.

At the reference site (the pooled direction's selected layer and position) it computes
the cosine matrix, a permutation test of distinctness, hierarchical clustering with
silhouettes, metric MDS with stress, principal angles between category subspaces, the
effective rank, linear probes with cross-category transfer and the selectivity matrix;
across layers, the mean off-diagonal cosine. Writes metrics, CSVs (DVC plots) and PNGs.
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import json
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.analysis import geometry as g
from refusal_atlas.analysis.atlas import POOLED, resample_directions, site_arrays
from refusal_atlas.data import store
from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.data.prompts import load_manifest
from refusal_atlas.pipeline.harness import run_stage, stage_parser
from refusal_atlas.report import plots

STAGE = "geometry"


def main(args, params, run) -> None:
    cfg = params.geometry
    manifest = load_manifest(args.manifest)
    cats = list(manifest.categories)
    atlas = store.open_directions(args.directions / "directions.zarr")
    site = json.loads((args.directions / "selected.json").read_text())[POOLED]
    li, pi = list(atlas.layer.values).index(site["layer"]), list(atlas.position.values).index(site["position"])
    identity = json.loads((args.model / "identity.json").read_text())
    expect = {
        "model_weights_fingerprint": identity["weights_fingerprint"],
        "template_sha256": identity["template_sha256"],
    }
    stores = {n: store.open_store(args.activations / f"{n}.zarr", expect=expect) for n in manifest.sets()}
    units = atlas["direction"].sel(direction_name=cats).values  # [k, layer, position, hidden]
    filter_, n_per_side = atlas.attrs["filter"], int(atlas.attrs["n_per_side"])

    cos = g.cosine_matrix(units[:, li, pi], cats)
    # Block inputs only, and only layers where every direction is defined: at layer 0 the
    # template tokens embed identically for every prompt, so their difference is zero.
    layers = [l for l in range(units.shape[1] - 1) if (np.linalg.norm(units[:, l, pi], axis=-1) > 0).all()]
    per_layer = g.offdiag_mean_per_layer(units[:, layers], position=pi)
    target = site_arrays(stores, cats, "target", filter_, "train", li, pi)
    pools = {c: manifest.baseline_of(c) for c in cats}
    base = site_arrays(stores, sorted(set(pools.values())), "baseline", filter_, "train", li, pi)
    rng = np.random.default_rng(cfg.seed)
    resamples = {c: resample_directions(target[c], base[pools[c]], n_per_side, cfg.n_draws, rng) for c in cats}
    distinct = g.distinctness_test(resamples, cfg.n_permutations, cfg.seed)
    clustering = g.cluster_directions(cos, cfg.max_clusters)
    mds = g.mds_embedding(cos, seed=cfg.seed)
    angles = g.principal_angles({c: target[c] - base[pools[c]].astype(np.float64).mean(0) for c in cats}, cfg.top_k)
    rank = g.effective_rank(units[:, li, pi])
    pairs = {c: (target[c], base[pools[c]]) for c in cats}
    probes, transfer = g.probe_accuracy(pairs, cfg.cv_folds, cfg.seed), g.probe_transfer(pairs, cfg.cv_folds, cfg.seed)
    test = site_arrays(stores, cats + ["benign"], "target", "label", "test", li, pi)
    select = g.selectivity(
        {c: test[c] for c in cats}, {c: units[i, li, pi] for i, c in enumerate(cats)}, baseline=test["benign"]
    )
    metrics = {
        **g.summarize_geometry(cos, clustering, mds, rank, distinct, probes, transfer),
        "reference_site": {"layer": site["layer"], "position": site["position"]},
        "probe_accuracy": probes.to_dict(),
    }

    out = args.out
    with atomic_path(out / "tables") as tables:
        tables.mkdir()
        cos.to_csv(tables / "cosine.csv")
        distinct["p_pair"].to_csv(tables / "distinctness_p.csv")
        angles.to_csv(tables / "principal_angles.csv", index=False)
        transfer.to_csv(tables / "probe_transfer.csv")
        select.to_csv(tables / "selectivity.csv")
        pd.DataFrame(
            {
                "k": clustering["silhouette"].index,
                **{m: clustering["silhouette"][m].values for m in clustering["silhouette"].columns},
            }
        ).to_csv(tables / "silhouette.csv", index=False)
        mds[2]["coords"].to_csv(tables / "mds_2d.csv")
        pd.DataFrame(
            {f"{m}_k{k}": ids for m, cuts in clustering["labels"].items() for k, ids in cuts.items()}
        ).rename_axis("direction").to_csv(tables / "clusters.csv")
    with atomic_path(out / "figures") as figures:
        figures.mkdir()
        plots.save_png(plots.cosine_heatmap(cos), figures / "cosine_heatmap.png")
        plots.save_png(
            plots.layer_curve(
                atlas.layer.values[layers],
                {"mean off-diagonal cosine": per_layer},
                ylabel="cosine",
                title="Category directions across layers",
            ),
            figures / "layer_curve.png",
        )
        plots.save_png(
            plots.dendrogram_plot(
                clustering["linkage"]["average"], cats, "Average linkage on 1 - cos", clustering["best_k"]["average"]
            ),
            figures / "dendrogram.png",
        )
        plots.save_png(
            plots.mds_scatter(mds[2]["coords"], cats, title="Metric MDS", stress=mds[2]["stress"]), figures / "mds.png"
        )
        plots.save_png(
            plots.matrix_heatmap(transfer, "Probe transfer (train → test)", "viridis", ".2f", 0, 1),
            figures / "probe_transfer.png",
        )
        plots.save_png(
            plots.matrix_heatmap(select, "Selectivity: projection minus benign", "RdBu_r", ".1f", center=0),
            figures / "selectivity.png",
        )
        plots.save_png(
            plots.explained_variance_plot(rank["cumulative"], participation_ratio=rank["participation_ratio"]),
            figures / "explained_variance.png",
        )
    # The two DVC plots (heatmap, layer curve) sit beside the tables folder.
    cos.stack().rename("cosine").rename_axis(["a", "b"]).reset_index().to_csv(out / "cosine_long.csv", index=False)
    pd.DataFrame({"layer": atlas.layer.values[layers], "mean_offdiag_cosine": per_layer}).to_csv(
        out / "layer_curve.csv", index=False
    )
    write_json(out / "metrics.json", metrics)

    run.log_identity(identity)
    run.log_input(args.directions / "directions.zarr")
    run.log_metrics(metrics)
    run.log_artifact(out / "figures", "figures")
    run.log_artifact(out / "tables", "tables")
    print(
        f"geometry: mean off-diagonal cosine {metrics['cosine_offdiag_mean']:.3f} at layer {site['layer']}, position {site['position']} -> {out}"
    )


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--manifest", type=Path, required=True, help="prompts/manifest.yaml")
    parser.add_argument("--directions", type=Path, required=True, help="artifacts/directions")
    parser.add_argument("--activations", type=Path, required=True, help="artifacts/activations")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model (its identity.json)")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/geometry")
    run_stage(STAGE, parser, main)
