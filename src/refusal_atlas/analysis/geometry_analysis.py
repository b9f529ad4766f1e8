"""The geometry stage's analysis: how the category directions relate, from the atlas and the stores.

``analyse_geometry`` takes the direction atlas, the activation stores and the reference site
(the pooled direction's layer and position) and returns every number the stage writes;
``geometry_tables`` and ``geometry_figures`` turn that into the stage's CSVs and PNGs by
file name, and ``save_geometry`` writes them into a folder the caller names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from refusal_atlas.analysis import geometry as g
from refusal_atlas.analysis.atlas import resample_directions, site_arrays
from refusal_atlas.config import GeometryConfig


@dataclass
class GeometryResult:
    cos: pd.DataFrame
    layers: np.ndarray  # the layers of the per-layer curve
    per_layer: np.ndarray  # mean off-diagonal cosine at each of them
    distinct: dict
    clustering: dict
    mds: dict
    angles: pd.DataFrame
    rank: dict
    transfer: pd.DataFrame
    selectivity: pd.DataFrame
    metrics: dict
    controls: dict  # replicate floor, random-harmful and disjoint-baseline controls (geometry.replicate_floor, ...)


def analyse_geometry(
    atlas: xr.Dataset, stores: Mapping[str, xr.Dataset], pools: Mapping[str, str], site: Mapping, cfg: GeometryConfig
) -> GeometryResult:
    """Cosines, distinctness, clusters, MDS, principal angles, rank, probes and selectivity at ``site``.

    Inputs: the atlas (``store.open_directions``), every set's store, each category's baseline
    pool (``pools``: category → pool, in the manifest's order), the reference site
    (``{"layer", "position"}``) and the geometry settings.
    """
    cats = list(pools)
    li, pi = list(atlas.layer.values).index(site["layer"]), list(atlas.position.values).index(site["position"])
    units = atlas["direction"].sel(direction_name=cats).values  # [k, layer, position, hidden]
    filter_, n_per_side = atlas.attrs["filter"], int(atlas.attrs["n_per_side"])
    cos = g.cosine_matrix(units[:, li, pi], cats)
    # Block inputs only, and only layers where every direction is defined: at layer 0 the
    # template tokens embed identically for every prompt, so their difference is zero.
    layers = [l for l in range(units.shape[1] - 1) if (np.linalg.norm(units[:, l, pi], axis=-1) > 0).all()]
    per_layer = g.offdiag_mean_per_layer(units[:, layers], position=pi)
    target = site_arrays(stores, cats, "target", filter_, "train", li, pi)
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
    units_at = {c: units[i, li, pi] for i, c in enumerate(cats)}
    select = g.selectivity({c: test[c] for c in cats}, units_at, baseline=test["benign"])
    # The controls a reviewer asks for: the replicate noise floor (the resamples above), directions from random
    # subsets of all targets (after the resamples, so those keep their draws), a disjoint baseline per category.
    pooled_targets = np.concatenate([target[c] for c in cats])
    main_pool = max(set(pools.values()), key=list(pools.values()).count)  # the pool most categories share
    random_draws = resample_directions(pooled_targets, base[main_pool], n_per_side, cfg.n_draws, rng)
    controls = {
        "replicate": g.replicate_floor(resamples),
        "random_harmful": g.random_harmful_control(random_draws, units_at),
        "shared_baseline": g.shared_baseline_control(target, pools, base, cfg.seed),
    }
    metrics = {
        **g.summarize_geometry(cos, clustering, mds, rank, distinct, probes, transfer),
        "reference_site": {"layer": site["layer"], "position": site["position"]},
        "probe_accuracy": probes.to_dict(),
        "controls": g.control_metrics(controls["replicate"], controls["random_harmful"], controls["shared_baseline"]),
    }
    return GeometryResult(
        cos, atlas.layer.values[layers], per_layer, distinct, clustering, mds, angles, rank, transfer, select, metrics,
        controls,
    )  # fmt: skip


def save_geometry_tables(r: GeometryResult, folder: Path) -> None:
    """Write the analysis's tables as CSVs into ``folder`` (which must exist)."""
    r.cos.to_csv(folder / "cosine.csv")
    r.distinct["p_pair"].to_csv(folder / "distinctness_p.csv")
    r.angles.to_csv(folder / "principal_angles.csv", index=False)
    r.transfer.to_csv(folder / "probe_transfer.csv")
    r.selectivity.to_csv(folder / "selectivity.csv")
    silhouette = r.clustering["silhouette"]
    pd.DataFrame({"k": silhouette.index, **{m: silhouette[m].values for m in silhouette.columns}}).to_csv(
        folder / "silhouette.csv", index=False
    )
    r.mds[2]["coords"].to_csv(folder / "mds_2d.csv")
    clusters = {f"{m}_k{k}": ids for m, cuts in r.clustering["labels"].items() for k, ids in cuts.items()}
    pd.DataFrame(clusters).rename_axis("direction").to_csv(folder / "clusters.csv")
    shared = r.controls["shared_baseline"]
    shared["cosine_disjoint"].to_csv(folder / "cosine_disjoint_baseline.csv")
    floor = r.controls["replicate"]["values"]
    pd.DataFrame(
        {"kind": ["within"] * len(floor["within"]) + ["between"] * len(floor["between"]),
         "cosine": np.concatenate([floor["within"], floor["between"]])}
    ).to_csv(folder / "replicate_cosines.csv", index=False)  # fmt: skip


def dvc_plot_tables(r: GeometryResult) -> dict[str, pd.DataFrame]:
    """The two DVC plots' data (written without index): the cosine heatmap in long form, the layer curve."""
    return {
        "cosine_long.csv": r.cos.stack().rename("cosine").rename_axis(["a", "b"]).reset_index(),
        "layer_curve.csv": pd.DataFrame({"layer": r.layers, "mean_offdiag_cosine": r.per_layer}),
    }
