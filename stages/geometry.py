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

from refusal_atlas.analysis.atlas import POOLED
from refusal_atlas.analysis.geometry_analysis import analyse_geometry, dvc_plot_tables, save_geometry_tables
from refusal_atlas.data import store
from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.data.prompts import read_provenance
from refusal_atlas.pipeline.harness import run_stage, stage_parser
from refusal_atlas.report.plots import geometry_figures, save_png

STAGE = "geometry"


def main(args, params, run) -> None:
    baseline_of, names = read_provenance(args.sets)
    atlas = store.open_directions(args.directions / "directions.zarr")
    site = json.loads((args.directions / "selected.json").read_text())[POOLED]
    identity = json.loads((args.model / "identity.json").read_text())
    stores = store.open_stores(args.activations, names, identity)
    result = analyse_geometry(atlas, stores, baseline_of, site, params.geometry)

    with atomic_path(args.out / "tables") as tables:
        tables.mkdir()
        save_geometry_tables(result, tables)
    with atomic_path(args.out / "figures") as figures:
        figures.mkdir()
        for name, figure in geometry_figures(result).items():
            save_png(figure, figures / name)
    for name, table in dvc_plot_tables(result).items():  # the two DVC plots (heatmap, layer curve)
        with atomic_path(args.out / name) as tmp:
            table.to_csv(tmp, index=False)
    write_json(args.out / "metrics.json", result.metrics)

    run.log_identity(identity)
    run.log_input(args.directions / "directions.zarr")
    run.log_metrics(result.metrics)
    run.log_artifact(args.out / "figures", "figures")
    run.log_artifact(args.out / "tables", "tables")
    mean = result.metrics["cosine_offdiag_mean"]
    print(
        f"geometry: mean off-diagonal cosine {mean:.3f} at layer {site['layer']}, position {site['position']} -> "
        f"{args.out}"
    )


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--sets", type=Path, required=True, help="artifacts/prompts/manifest.json")
    parser.add_argument("--directions", type=Path, required=True, help="artifacts/directions")
    parser.add_argument("--activations", type=Path, required=True, help="artifacts/activations")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model (its identity.json)")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/geometry")
    run_stage(STAGE, parser, main)
