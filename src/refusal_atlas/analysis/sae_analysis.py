"""The SAE stage's work, given its inputs already opened: the SAE (read or trained), per-direction latents, overlap,
steering sites, figures and metrics (``run_sae_analysis``); the stage only reads, calls it, writes and logs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from refusal_atlas.analysis.atlas import POOLED, lineage_residuals
from refusal_atlas.analysis.sae import (
    PREFIX,
    SAE_CFG,
    SAE_WEIGHTS,
    SaeError,
    SparseAutoencoder,
    category_latents,
    latent_overlap,
    load_sae,
    reconstruction_stats,
    sae_direction,
    save_sae,
    train_topk_sae,
)
from refusal_atlas.config import SaeConfig
from refusal_atlas.data import store
from refusal_atlas.data.atomic import atomic_path, write_json
from refusal_atlas.digest import file_sha256


@dataclass
class SaeResult:
    sae: SparseAutoencoder
    source: Path | None  # the sae.path folder, or None for the built-in SAE
    label: str  # sae.path as given, or "built-in"
    latents: pd.DataFrame  # direction, rank, latent, rate_target, rate_baseline, rate_diff
    jaccard: pd.DataFrame  # direction x direction
    loss: pd.DataFrame  # step, loss (empty for a loaded SAE)
    sites: dict  # sae_<name> -> site record, as artifacts/directions/sites/<name>.json
    figures: dict[str, Figure]
    metrics: dict

    def write(self, out: Path) -> None:
        """Every output under ``out`` (artifacts/sae), each written whole or not at all: ``model/`` (the built-in
        SAE in sae-lens's format; for a loaded one, SOURCE.json naming its folder and both files' sha256, the
        weights not copied), ``latents.csv``, ``jaccard.csv``, ``loss.csv``, ``figures/``, ``sites/`` and
        ``metrics.json``."""
        from refusal_atlas.report.plots import save_png

        if self.source is None:
            save_sae(self.sae, out / "model")
        else:
            source = {
                "path": self.label,
                **{f"{name}_sha256": file_sha256(self.source / name) for name in (SAE_CFG, SAE_WEIGHTS)},
            }
            with atomic_path(out / "model") as folder:
                folder.mkdir()
                (folder / "SOURCE.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        for name, table in {"latents.csv": self.latents, "jaccard.csv": self.jaccard, "loss.csv": self.loss}.items():
            with atomic_path(out / name) as tmp:
                table.to_csv(tmp, index=name == "jaccard.csv")
        with atomic_path(out / "figures") as figures:
            figures.mkdir()
            for name, figure in self.figures.items():
                save_png(figure, figures / name)
        with atomic_path(out / "sites") as sites:
            sites.mkdir()
            for name, record in self.sites.items():
                write_json(sites / f"{name}.json", record)
        write_json(out / "metrics.json", self.metrics)


def _index(values, value, what: str) -> int:
    values = [int(v) for v in values]
    if int(value) not in values:
        raise SaeError(
            f"the SAE reads {what} {value}, but the activation stores hold {what}s {values}; use an SAE trained at "
            f"one of them (or set sae.layer to one)"
        )
    return values.index(int(value))


def training_residuals(stores: Mapping[str, xr.Dataset], layer_index: int) -> np.ndarray:
    """Every stored residual at one layer, all sets, prompts and positions: float32 ``[n, hidden]``."""
    parts = [store.load_resid(ds, layer=layer_index) for _, ds in sorted(stores.items())]  # [prompt, position, hidden]
    return np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts])


def _jaccard_figure(jaccard: pd.DataFrame, top_k: int) -> Figure:
    from refusal_atlas.report.plots import matrix_heatmap

    return matrix_heatmap(
        jaccard, f"Overlap of the top {top_k} SAE latents (Jaccard)", "Purples", ".2f", 0, 1, colorbar_label="Jaccard"
    )


def _rates_figure(latents: pd.DataFrame) -> Figure:
    """Per direction, the firing-rate difference of its top latents (rank on x)."""
    from refusal_atlas.report.plots import matrix_heatmap

    table = latents.pivot(index="direction", columns="rank", values="rate_diff")
    table = table.reindex(list(dict.fromkeys(latents.direction)))
    return matrix_heatmap(table, "Firing rate on HR minus on BC, top latents by rank", "Greens", ".2f", 0, 1)


def run_sae_analysis(
    atlas: xr.Dataset,
    stores: Mapping[str, xr.Dataset],
    site: dict,
    identity: dict,
    cfg: SaeConfig,
    path: Path | None,
    progress: bool = True,
) -> SaeResult:
    """The SAE at ``path`` (``cfg.path`` resolved; sae-lens format), or one trained on ``stores`` per ``cfg``,
    analysed at the pooled direction's ``site`` (layer, position, mean_resid_norm) against every direction's
    lineage in ``atlas``."""
    from tqdm.auto import tqdm

    layers = atlas["layer"].values
    loss = pd.DataFrame({"step": pd.Series(dtype=int), "loss": pd.Series(dtype=float)})
    if path is not None:
        sae = load_sae(path)
        if sae.d_in != identity["d_model"]:
            raise SaeError(
                f"{path}: the SAE reads {sae.d_in}-dimensional inputs but the model has d_model {identity['d_model']}; "
                "it was trained on another model. Point sae.path at an SAE of this model"
            )
        li = _index(layers, sae.layer, "layer")
        train = {}
    else:
        layer = site["layer"] if cfg.layer is None else cfg.layer
        li = _index(layers, layer, "layer")
        x = training_residuals(stores, li)
        bar = tqdm(total=cfg.steps, desc="train SAE", unit="step", disable=not progress)
        sae, train = train_topk_sae(
            x, cfg.d_sae, cfg.k, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed, int(layers[li]), identity["model_id"],
            on_step=lambda step, value: bar.update(1),
        )  # fmt: skip
        bar.close()
        loss = pd.DataFrame(train.pop("loss_curve"), columns=["step", "loss"])
    pi = _index(atlas["position"].values, site["position"], "position")
    sides = lineage_residuals(atlas, stores, li, pi)
    latents, top = category_latents(sae, sides, cfg.top_k)
    categories = [n for n in top if n != POOLED]
    common, jaccard = latent_overlap({n: top[n] for n in categories})
    off = jaccard.to_numpy()[~np.eye(len(jaccard), dtype=bool)]

    # A name this manifest lacks is skipped, with a note: one params file serves several manifests.
    steer = list(top) if cfg.steer is None else [n for n in cfg.steer if n in top]
    missing = sorted(set(cfg.steer or []) - set(top))
    same_site = int(layers[li]) == int(site["layer"])
    norm = site["mean_resid_norm"] if same_site else float(np.linalg.norm(sides[POOLED][0], axis=1).mean())
    sites, agreement = {}, {}
    for name in [n for n in top if top[n]]:  # a direction with no latent firing more on HR has no SAE direction
        unit = sae_direction(sae, top[name])
        reference = atlas["direction"].sel(direction_name=name).values[li, pi].astype(np.float64)
        agreement[name] = float(unit @ reference / (np.linalg.norm(reference) or 1.0))
        if name in steer:
            sites[f"{PREFIX}{name}"] = {
                "name": f"{PREFIX}{name}",
                "layer": int(layers[li]),
                "position": int(site["position"]),
                "mean_resid_norm": float(norm),
                "d_model": int(unit.shape[0]),
                "unit": unit.tolist(),
            }
    all_x = np.concatenate([np.concatenate(s) for s in sides.values()])
    stats = reconstruction_stats(sae, all_x)
    metrics = {
        "sae": {
            "source": cfg.path or "built-in",
            "architecture": sae.architecture,
            "d_sae": sae.d_sae,
            "k": sae.k,
            "hook_name": sae.hook_name,
            **stats,  # on the analysed prompts, at the analysed position
        },
        "train": train,  # the built-in SAE on its training residuals (every set, prompt and position)
        "layer": int(layers[li]),
        "position": int(site["position"]),
        "top_k": cfg.top_k,
        "overlap": {
            "common_share": common,
            "jaccard_mean": float(off.mean()) if off.size else float("nan"),
            "jaccard_max": float(off.max()) if off.size else float("nan"),
        },
        "cosine_with_direction": agreement,
        "steered": sorted(sites),
        "steer_missing": missing,
        "no_positive_latent": [n for n in top if not top[n]],
    }
    figures = {"jaccard.png": _jaccard_figure(jaccard, cfg.top_k), "rates.png": _rates_figure(latents)}
    return SaeResult(sae, path, cfg.path or "built-in", latents, jaccard, loss, sites, figures, metrics)
