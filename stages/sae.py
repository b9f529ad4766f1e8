"""DVC stage `sae`: which sparse-autoencoder latents separate refused from answered prompts, per category.

Reads an SAE in sae-lens's format (sae.path), or trains a TopK SAE on the activation stores'
residuals at the pooled direction's layer (sae.path null, the demo's default; deterministic).
At the pooled direction's (layer, position), for every direction learnt from prompts, it
compares each latent's firing rate on the direction's refused targets (HR) with its rate on the
answered baseline prompts (BC): the same prompts the direction was computed from. Writes the
top latents per direction (latents.csv), their overlap (the share common to every category,
pairwise Jaccard: jaccard.csv and figures/jaccard.png), the SAE itself or where it came from
(model/), and one steering site per direction in sae.steer (sites/sae_<name>.json: the mean of
its top latents' decoder rows), which the steering stage evaluates beside the directions.
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import json
from pathlib import Path

from refusal_atlas.analysis.atlas import POOLED
from refusal_atlas.analysis.sae_analysis import run_sae_analysis
from refusal_atlas.data import store
from refusal_atlas.data.prompts import read_provenance
from refusal_atlas.pipeline.harness import repo_root, run_stage, stage_parser

STAGE = "sae"


def main(args, params, run) -> None:
    cfg = params.sae
    _, names = read_provenance(args.sets)
    identity = json.loads((args.model / "identity.json").read_text())
    stores = store.open_stores(args.activations, names, identity)
    atlas = store.open_directions(args.directions / "directions.zarr", identity["d_model"])
    site = json.loads((args.directions / "selected.json").read_text())[POOLED]
    path = (repo_root() / cfg.path) if cfg.path else None
    result = run_sae_analysis(atlas, stores, site, identity, cfg, path, progress=not args.no_progress)
    result.write(args.out)

    run.log_identity(identity)
    run.log_input(args.activations)
    run.log_metrics(result.metrics)
    run.log_artifact(args.out / "figures", "figures")
    run.log_artifact(args.out / "latents.csv")
    m = result.metrics
    if m["steer_missing"]:
        print(f"sae: note: sae.steer names {', '.join(m['steer_missing'])}, which this run has no direction for; "
              f"skipped (its directions: {', '.join(result.latents.direction.unique())})")  # fmt: skip
    print(
        f"sae: {m['sae']['architecture']} SAE, {m['sae']['d_sae']} latents at layer {m['layer']} (FVU "
        f"{m['sae']['fvu']:.3f}); top {cfg.top_k} latents per direction, {m['overlap']['common_share']:.2f} common "
        f"to every category, mean pairwise Jaccard {m['overlap']['jaccard_mean']:.2f}; {len(result.sites)} steering "
        f"sites -> {args.out}"
    )


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--sets", type=Path, required=True, help="artifacts/prompts/manifest.json")
    parser.add_argument("--directions", type=Path, required=True, help="artifacts/directions")
    parser.add_argument("--activations", type=Path, required=True, help="artifacts/activations")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model (its identity.json)")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/sae")
    run_stage(STAGE, parser, main)
