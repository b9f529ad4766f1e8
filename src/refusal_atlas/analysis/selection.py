"""Where each direction acts: its site (layer, position), chosen by ``directions.select``, and its stability.

``select_sites`` runs the configured selector (fixed, COSMIC or Arditi et al.'s search) for
every category and the pooled direction, copies pooled's site to the random controls, and
adds each site's power flags, mean residual norm (for norm-relative steering) and the
within-category stability of the direction there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from refusal_atlas.analysis.atlas import (
    POOLED,
    load_prompts,
    mean_resid_norm,
    power_flags,
    side_ids,
    validation_sides,
)
from refusal_atlas.analysis.directions import stability
from refusal_atlas.analysis.sites import select_arditi, select_cosmic, select_fixed
from refusal_atlas.config import DirectionsConfig, ModelConfig
from refusal_atlas.model.chat import format_prompts
from refusal_atlas.model.generation import forward_tokens_per_s, refusal_token_ids


@dataclass
class Selection:
    selected: dict  # direction -> site record (selected.json)
    candidates: list[dict]  # every candidate a selector looked at, with its scores (candidates.csv)
    metrics: dict  # counts, stability, under-powered directions (metrics.json)
    search: dict | None  # Arditi's search time against its floor on this host (MLflow only), or None


def select_sites(
    atlas: xr.Dataset,
    stores: Mapping[str, xr.Dataset],
    prompts: pd.DataFrame,
    baseline_of: Mapping[str, str],
    n_layers: int,
    cfg: DirectionsConfig,
    mcfg: ModelConfig,
    load_model: Callable[[], tuple],
    progress: bool = True,
) -> Selection:
    """Every direction's site and the stage's metrics.

    Inputs: the atlas (``build_atlas``), every set's store, the prompt table, each category's
    baseline pool, the model's number of layers, the settings, and ``load_model()`` returning (model, tokenizer), called
    once and only when the selector needs the model (``arditi``).
    """
    offsets = [int(p) for p in atlas.position.values]
    groups = {**{c: ([c], [p]) for c, p in baseline_of.items()}, POOLED: (list(baseline_of), ["benign"])}
    selected, candidates, model = {}, [], None
    search = {"seconds": 0.0, "scored_tokens": 0}
    for name, (targets, pools) in groups.items():
        units, norms = atlas["direction"].sel(direction_name=name).values, atlas["norm"].sel(direction_name=name).values
        if cfg.select == "fixed":
            site = select_fixed(cfg.layer, cfg.position, n_layers, offsets)
        elif cfg.select == "cosmic":
            target, baseline = (
                _means(stores, targets, "target", cfg.filter),
                _means(stores, pools, "baseline", cfg.filter),
            )
            site = select_cosmic(target, baseline, units, cfg.max_layer_fraction, n_layers=n_layers, offsets=offsets)
        else:
            if model is None:
                model, tokenizer = load_model()
                ids = refusal_token_ids(tokenizer, mcfg.refusal_tokens)
            sides = validation_sides(prompts, name, targets, pools, cfg.n_val, cfg.seed)
            harmful, benign = (
                format_prompts(tokenizer, texts, mcfg.system_prompt, mcfg.chat_template, mcfg.chat_template_kwargs)
                for texts in sides
            )
            start = time.perf_counter()
            site = select_arditi(
                model, tokenizer, units, norms, harmful, benign, ids, mcfg.batch_size, cfg.max_layer_fraction,
                cfg.kl_threshold, offsets, mcfg.max_prompt_tokens, progress=progress, fallback=cfg.fallback,
            )  # fmt: skip
            search["seconds"] += time.perf_counter() - start
            search["scored_tokens"] += site["n_scored"]["tokens"]
        selected[name] = {k: v for k, v in site.items() if k not in ("table", "layer_similarity")}
        candidates += [{"direction": name, **row} for row in site.get("table", [])]
    for k in range(cfg.n_random):
        selected[f"random_{k}"] = {**selected[POOLED], "method": "copied from pooled"}
    metrics = _site_metrics(atlas, stores, baseline_of, groups, selected, offsets, cfg)
    if model is None:
        return Selection(selected, candidates, metrics, None)
    # The search's time against its floor, on this host now (MLflow only: timings are not outputs).
    search["forward_tokens_per_s"] = forward_tokens_per_s(
        model, tokenizer, harmful + benign, mcfg.batch_size, mcfg.max_prompt_tokens
    )
    search["floor_s"] = search["scored_tokens"] / search["forward_tokens_per_s"]
    search["floor_ratio"] = search["seconds"] / search["floor_s"]
    return Selection(selected, candidates, metrics, search)


def _site_metrics(atlas, stores, baseline_of, groups, selected, offsets, cfg: DirectionsConfig) -> dict:
    """Power flags and the mean residual norm on every site (in place), and the stage's metrics."""
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
    lineage = json.loads(atlas.attrs["lineage"])
    for name, site in selected.items():
        site.update(power[name])
    for name, site in selected.items():
        li, pi = site["layer"], offsets.index(site["position"])
        source = name if name in baseline_of else POOLED
        site["mean_resid_norm"] = mean_resid_norm(stores, _lineage_sides(lineage[source], groups[source]), li, pi)
        if name in baseline_of:
            t = side_ids(stores[name], "target", cfg.filter)
            b = side_ids(stores[baseline_of[name]], "baseline", cfg.filter)
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
    return metrics


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
