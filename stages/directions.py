"""DVC stage `directions`: one refusal direction per category, pooled, random controls; their sites.

Writes directions.zarr (unit vectors at every layer and position, raw norms, counts,
lineage), selected.json (each direction's (layer, position), the score behind it and
the mean residual norm there, for norm-relative steering), metrics.json (counts and
within-category stability at the selected site) and crosslingual.json: where the manifest
lists per-language prompts, the pooled direction's transfer to each language
(analysis.crosslingual; an empty languages table otherwise).
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import functools
import json
from pathlib import Path

import pandas as pd

from refusal_atlas.analysis.atlas import build_atlas, site_record
from refusal_atlas.analysis.crosslingual import crosslingual_transfer
from refusal_atlas.analysis.selection import select_sites
from refusal_atlas.data import store
from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.data.prompts import read_provenance
from refusal_atlas.model.generation import refusal_token_ids
from refusal_atlas.model.load import load_stage_model
from refusal_atlas.pipeline.harness import run_stage, stage_parser

STAGE = "directions"


def main(args, params, run) -> None:
    cfg = params.directions
    baseline_of, names = read_provenance(args.sets)
    identity = json.loads((args.model / "identity.json").read_text())
    stores = store.open_stores(args.activations, names, identity)
    atlas = build_atlas(
        stores, baseline_of, cfg.n_per_side, cfg.filter, cfg.method, cfg.seed, cfg.n_random, cfg.allow_fewer
    )
    prompts = pd.read_parquet(args.prompts)
    load = functools.cache(lambda: load_stage_model(params.model, args.model, run)[:2])  # one load at most
    result = select_sites(
        atlas, stores, prompts, baseline_of, identity["n_layers"], cfg, params.model, load, not args.no_progress
    )

    sites = {name: site_record(atlas, name, site) for name, site in result.selected.items()}
    languages = pd.read_parquet(args.crosslingual)
    transfer = {"languages": {}}
    if len(languages):  # the pooled direction across languages (the manifest's crosslingual files)
        model, tokenizer = load()
        ids = refusal_token_ids(tokenizer, params.model.refusal_tokens)
        transfer = crosslingual_transfer(
            model, tokenizer, languages, sites["pooled"], cfg.crosslingual_alpha, params.model, ids
        )

    store.save_directions(args.out / "directions.zarr", atlas)
    for name, record in sites.items():
        write_json(args.out / "sites" / f"{name}.json", record)
    write_json(args.out / "selected.json", result.selected)
    # Every candidate a selector looked at, with its scores; for arditi, `reason` says why a row
    # was dropped, or `not_scored` where a lower-bypass candidate had already passed.
    with atomic_path(args.out / "candidates.csv") as tmp:
        pd.DataFrame(result.candidates).to_csv(tmp, index=False)
    write_json(args.out / "metrics.json", result.metrics)
    write_json(args.out / "crosslingual.json", transfer)
    underpowered = result.metrics["underpowered"]["names"]
    run.log_identity(identity)
    run.log_input(args.activations)
    run.log_metrics(result.metrics)
    run.log_metrics({"crosslingual": transfer["languages"]})
    run.log_artifact(args.out / "selected.json")
    run.set_tags({"directions.underpowered": ", ".join(underpowered) or "none"})
    if result.search:
        run.log_metrics({"search": result.search})
        s = result.search
        print(f"directions: arditi search {s['seconds']:.0f} s for {s['scored_tokens']} scored tokens, "
              f"{s['floor_ratio']:.2f}x the floor at {s['forward_tokens_per_s']:.0f} forward tokens/s")  # fmt: skip
    warn = f"; under-powered (a side < {cfg.min_per_side} prompts): {', '.join(underpowered)}" if underpowered else ""
    print(f"directions: {atlas.sizes['direction']} directions ({cfg.method}, select {cfg.select}){warn} -> {args.out}")


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--sets", type=Path, required=True, help="artifacts/prompts/manifest.json")
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--crosslingual", type=Path, required=True, help="artifacts/prompts/crosslingual.parquet")
    parser.add_argument("--activations", type=Path, required=True, help="artifacts/activations")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/directions")
    run_stage(STAGE, parser, main)
