"""DVC stage `directions`: one refusal direction per category, pooled, random controls; their sites.

Writes directions.zarr (unit vectors at every layer and position, raw norms, counts,
lineage), selected.json (each direction's (layer, position), the score behind it and
the mean residual norm there, for norm-relative steering) and metrics.json (counts and
within-category stability at the selected site).
"""

from refusal_atlas.pipeline.numerics import pin_cpu_numerics

pin_cpu_numerics()  # before numpy and torch load: the same bits on any x86-64 host (refusal_atlas.pipeline.numerics)

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from refusal_atlas.analysis.atlas import (
    POOLED,
    build_atlas,
    load_prompts,
    mean_resid_norm,
    power_flags,
    side_ids,
    site_record,
    validation_sides,
)
from refusal_atlas.analysis.directions import select_arditi, select_cosmic, select_fixed, stability
from refusal_atlas.data import store
from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.data.prompts import load_manifest
from refusal_atlas.model.chat import format_prompts
from refusal_atlas.model.generation import forward_tokens_per_s, refusal_token_ids
from refusal_atlas.model.load import load_stage_model
from refusal_atlas.pipeline.harness import run_stage, stage_parser

STAGE = "directions"


def main(args, params, run) -> None:
    cfg, mcfg = params.directions, params.model
    manifest = load_manifest(args.manifest)
    baseline_of = {c: manifest.baseline_of(c) for c in manifest.categories}
    identity = json.loads((args.model / "identity.json").read_text())
    expect = {
        "model_weights_fingerprint": identity["weights_fingerprint"],
        "template_sha256": identity["template_sha256"],
    }
    stores = {name: store.open_store(args.activations / f"{name}.zarr", expect=expect) for name in manifest.sets()}
    atlas = build_atlas(
        stores, baseline_of, cfg.n_per_side, cfg.filter, cfg.method, cfg.seed, cfg.n_random, cfg.allow_fewer
    )
    offsets = [int(p) for p in atlas.position.values]
    n_layers = identity["n_layers"]
    lineage = json.loads(atlas.attrs["lineage"])

    table = pd.read_parquet(args.prompts)
    groups = {**{c: ([c], [p]) for c, p in baseline_of.items()}, POOLED: (list(baseline_of), ["benign"])}
    selected, candidates, model = {}, [], None
    search = {"seconds": 0.0, "scored_tokens": 0}
    for name, (targets, pools) in groups.items():
        units, norms = atlas["direction"].sel(direction_name=name).values, atlas["norm"].sel(direction_name=name).values
        if cfg.select == "fixed":
            site = select_fixed(cfg.layer, cfg.position, n_layers, offsets)
        elif cfg.select == "cosmic":
            site = select_cosmic(
                _means(stores, targets, "target", cfg.filter),
                _means(stores, pools, "baseline", cfg.filter),
                units,
                cfg.max_layer_fraction,
                n_layers=n_layers,
                offsets=offsets,
            )
        else:
            if model is None:
                model, tokenizer, _ = load_stage_model(params.model, args.model, run)
                fmt = lambda texts: format_prompts(
                    tokenizer, texts, mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs
                )  # noqa: E731
                ids = refusal_token_ids(tokenizer, mcfg.refusal_tokens)
            harmful, benign = map(fmt, validation_sides(table, name, targets, pools, cfg.n_val, cfg.seed))
            start = time.perf_counter()
            site = select_arditi(
                model,
                tokenizer,
                units,
                norms,
                harmful,
                benign,
                ids,
                mcfg.batch_size,
                cfg.max_layer_fraction,
                cfg.kl_threshold,
                offsets,
                mcfg.max_prompt_tokens,
                progress=not args.no_progress,
                fallback=cfg.fallback,
            )
            search["seconds"] += time.perf_counter() - start
            search["scored_tokens"] += site["n_scored"]["tokens"]
        selected[name] = {k: v for k, v in site.items() if k not in ("table", "layer_similarity")}
        candidates += [{"direction": name, **row} for row in site.get("table", [])]
    for k in range(cfg.n_random):
        selected[f"random_{k}"] = {**selected[POOLED], "method": "copied from pooled"}

    counts = {
        n: {
            "n_target": int(atlas.n_target.sel(direction_name=n)),
            "n_baseline": int(atlas.n_baseline.sel(direction_name=n)),
        }
        for n in atlas.direction_name.values
    }
    power = power_flags(counts, cfg.min_per_side)
    # A direction learnt from a handful of refusals is kept, and flagged wherever it is shown.
    underpowered = sorted(n for n, p in power.items() if p["underpowered"])
    metrics = {
        "counts": counts,
        "stability": {},
        "underpowered": {"min_per_side": cfg.min_per_side, "names": underpowered, "n": len(underpowered)},
    }
    for name, site in selected.items():
        site.update(power[name])
    for name, site in selected.items():
        li, pi = site["layer"], offsets.index(site["position"])
        source = name if name in baseline_of else POOLED
        site["mean_resid_norm"] = mean_resid_norm(stores, _lineage_sides(lineage[source], groups[source]), li, pi)
        if name in baseline_of:
            t, b = (
                side_ids(stores[name], "target", cfg.filter),
                side_ids(stores[baseline_of[name]], "baseline", cfg.filter),
            )
            s = stability(
                load_prompts(stores[name], t)[:, [li]][:, :, [pi]],
                load_prompts(stores[baseline_of[name]], b)[:, [li]][:, :, [pi]],
                cfg.n_per_side,
                cfg.n_draws,
                cfg.seed,
            )
            metrics["stability"][name] = {
                "within_cos_mean": float(s["mean"][0, 0]),
                "within_cos_sd": float(s["sd"][0, 0]),
                "split_half_cos": float(s["split_half"][0, 0]),
            }

    store.save_directions(args.out / "directions.zarr", atlas)
    for name, site in selected.items():
        write_json(args.out / "sites" / f"{name}.json", site_record(atlas, name, site))
    write_json(args.out / "selected.json", selected)
    # Every candidate a selector looked at, with its scores; for arditi, `reason` says why a row
    # was dropped, or `not_scored` where a lower-bypass candidate had already passed.
    with atomic_path(args.out / "candidates.csv") as tmp:
        pd.DataFrame(candidates).to_csv(tmp, index=False)
    write_json(args.out / "metrics.json", metrics)
    run.log_identity(identity)
    run.log_input(args.activations)
    run.log_metrics(metrics)
    run.log_artifact(args.out / "selected.json")
    run.set_tags({"directions.underpowered": ", ".join(underpowered) or "none"})
    if (
        model is not None
    ):  # the search's time against its floor, on this host now (MLflow only: timings are not outputs)
        search["forward_tokens_per_s"] = forward_tokens_per_s(
            model, tokenizer, harmful + benign, mcfg.batch_size, mcfg.max_prompt_tokens
        )
        search["floor_s"] = search["scored_tokens"] / search["forward_tokens_per_s"]
        search["floor_ratio"] = search["seconds"] / search["floor_s"]
        run.log_metrics({"search": search})
        print(
            f"directions: arditi search {search['seconds']:.0f} s for {search['scored_tokens']} scored tokens, "
            f"{search['floor_ratio']:.2f}x the floor at {search['forward_tokens_per_s']:.0f} forward tokens/s"
        )
    warn = f"; under-powered (a side < {cfg.min_per_side} prompts): {', '.join(underpowered)}" if underpowered else ""
    print(f"directions: {atlas.sizes['direction']} directions ({cfg.method}, select {cfg.select}){warn} -> {args.out}")


def _means(stores, names, role, filter_):
    return (
        np.concatenate([load_prompts(stores[n], side_ids(stores[n], role, filter_)) for n in names])
        .astype(np.float64)
        .mean(0)
    )


def _lineage_sides(info, group):
    """set → prompt ids of a direction's lineage (pooled target ids are 'category/id')."""
    targets, pools = group
    out = {pools[0]: info["baseline_ids"]}
    for t in targets:
        out[t] = [i.split("/", 1)[-1] for i in info["target_ids"] if len(targets) == 1 or i.startswith(f"{t}/")]
    return out


if __name__ == "__main__":
    parser = stage_parser(STAGE, __doc__)
    parser.add_argument("--manifest", type=Path, required=True, help="prompts/manifest.yaml")
    parser.add_argument("--prompts", type=Path, required=True, help="artifacts/prompts/prompts.parquet")
    parser.add_argument("--activations", type=Path, required=True, help="artifacts/activations")
    parser.add_argument("--model", type=Path, required=True, help="artifacts/model")
    parser.add_argument("--out", type=Path, required=True, help="artifacts/directions")
    run_stage(STAGE, parser, main)
