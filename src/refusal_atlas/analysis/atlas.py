"""The direction atlas: every category's direction, the pooled one and the random controls.

Reads activation stores (as opened by ``store.open_store``), draws each category's two
sides (refused targets against its baseline pool's answered prompts, train split),
computes the directions at every layer and position, and returns one labelled
``xarray.Dataset`` with the lineage needed to redo the computation exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from refusal_atlas.analysis.directions import DirectionError, compute_direction, draw_sides, lineage, random_controls
from refusal_atlas.data import store

POOLED = "pooled"


def side_ids(ds: xr.Dataset, role: str, filter_: str, split: str = "train") -> list[str]:
    """Prompt ids of one side: targets the model refused (or all, filter 'label'), baselines it answered."""
    mask = ds["split"].values == split
    if filter_ == "behaviour":
        refused = ds["refused"].values.astype(bool)
        mask &= refused if role == "target" else ~refused
    return [str(i) for i in ds["prompt_id"].values[mask]]


def load_prompts(ds: xr.Dataset, ids: list[str]) -> np.ndarray:
    """float32 ``[n, layer, position, hidden]`` of the given prompt ids, in the given order."""
    index = {str(p): i for i, p in enumerate(ds["prompt_id"].values)}
    return store.load_resid(ds, prompt=[index[i] for i in ids])


def mean_resid_norm(
    stores: Mapping[str, xr.Dataset], sides: Mapping[str, list[str]], layer_index: int, position_index: int
) -> float:
    """Mean L2 norm of the residual at one (layer, position) over the given prompts (set → ids)."""
    norms = [
        np.linalg.norm(load_prompts(stores[s], ids)[:, layer_index, position_index], axis=-1)
        for s, ids in sides.items()
        if ids
    ]
    return float(np.concatenate(norms).mean())


def build_atlas(
    stores: Mapping[str, xr.Dataset],
    baseline_of: Mapping[str, str],
    n_per_side: int,
    filter_: str,
    method: str,
    seed: int,
    n_random: int,
    allow_fewer: bool = True,
) -> xr.Dataset:
    """One direction per category, plus ``pooled`` (all categories against ``benign``) and random controls.

    ``stores``: set name → activation store; ``baseline_of``: category → baseline pool.
    Returns a Dataset with ``direction`` (direction, layer, position, hidden) unit vectors,
    ``norm`` (direction, layer, position), ``n_target`` and ``n_baseline`` (direction), and
    the prompt ids of each side in the ``lineage`` attribute (JSON).
    """
    rng = np.random.default_rng(seed)
    sides: dict[str, tuple[list[str], list[str]]] = {}
    units, norms = {}, {}
    for category, pool in baseline_of.items():
        target_ids = side_ids(stores[category], "target", filter_)
        baseline_ids = side_ids(stores[pool], "baseline", filter_)
        t, b = draw_sides(target_ids, baseline_ids, n_per_side, rng, allow_fewer, label=category)
        sides[category] = (t, b)
        units[category], norms[category] = compute_direction(
            load_prompts(stores[category], t), load_prompts(stores[pool], b), method, seed
        )

    # Pooled: refused targets of every category against the default pool's answered prompts.
    pooled_target = [(c, i) for c in baseline_of for i in side_ids(stores[c], "target", filter_)]
    benign_ids = side_ids(stores["benign"], "baseline", filter_)
    keys = [f"{c}/{i}" for c, i in pooled_target]
    t, b = draw_sides(keys, benign_ids, n_per_side * len(baseline_of), rng, allow_fewer, label=POOLED)
    # ``t`` is sorted, so each category's ids form one block; loading block by block keeps t's order.
    blocks = dict.fromkeys(i.split("/", 1)[0] for i in t)
    target = np.concatenate(
        [load_prompts(stores[c], [i.split("/", 1)[1] for i in t if i.split("/", 1)[0] == c]) for c in blocks]
    )
    units[POOLED], norms[POOLED] = compute_direction(target, load_prompts(stores["benign"], b), method, seed)
    sides[POOLED] = (t, b)

    r_units, r_norms = random_controls(norms[POOLED], units[POOLED].shape[-1], n_random, seed)
    for k in range(n_random):
        units[f"random_{k}"], norms[f"random_{k}"] = r_units[k], r_norms[k]
        sides[f"random_{k}"] = ([], [])

    names = list(units)
    ref = stores[next(iter(baseline_of))]
    info = lineage(sides)
    # The dimension is `direction`; the names live in the `direction_name` coordinate (a
    # variable cannot share its name with a dimension coordinate), indexed for .sel().
    return xr.Dataset(
        {
            "direction": (store.DIRECTION_DIMS, np.stack([units[n] for n in names]).astype(np.float32)),
            "norm": (("direction", "layer", "position"), np.stack([norms[n] for n in names])),
            "n_target": ("direction", np.array([info[n]["n_target"] for n in names], dtype=np.int64)),
            "n_baseline": ("direction", np.array([info[n]["n_baseline"] for n in names], dtype=np.int64)),
        },
        coords={
            "direction_name": ("direction", np.array(names, dtype=object)),
            "layer": ref["layer"].values,
            "position": ref["position"].values,
            "position_token": ("position", ref["position_token"].values.astype(object)),
        },
        attrs={
            "method": method,
            "filter": filter_,
            "n_per_side": n_per_side,
            "seed": seed,
            "lineage": json.dumps(
                {n: {"target_ids": v["target_ids"], "baseline_ids": v["baseline_ids"]} for n, v in info.items()}
            ),
            "baseline_of": json.dumps(dict(baseline_of)),
        },
    ).set_xindex("direction_name")


def validation_texts(prompts: pd.DataFrame, sets: Sequence[str], n: int | None, seed: int) -> list[str]:
    """Texts of the val-split prompts of ``sets``, at most ``n`` of them (``directions.n_val``).

    The rows are sorted by prompt_id and, when there are more than ``n``, ``n`` are drawn
    without replacement by a generator seeded with ``seed``, so the draw depends only on the
    prompt ids. Input: the prompt table (columns prompt_id, category, split, text).
    """
    rows = prompts[(prompts.split == "val") & prompts.category.isin(list(sets))].sort_values("prompt_id")
    if n is not None and len(rows) > n:
        rows = rows.iloc[np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))]
    return rows.text.tolist()


def validation_sides(
    prompts: pd.DataFrame, name: str, targets: Sequence[str], pools: Sequence[str], n: int | None, seed: int
) -> tuple[list[str], list[str]]:
    """``validation_texts`` of direction ``name``'s target sets and of its baseline pools: what Arditi's
    selection scores.

    Raises ``DirectionError`` naming the direction, the side and its sets when a side has no
    val-split prompt (a small set, or ``prompts.max_per_set``, can leave none).
    """
    sides = {
        side: validation_texts(prompts, sets, n, seed) for side, sets in (("target", targets), ("baseline", pools))
    }
    for side, sets in (("target", targets), ("baseline", pools)):
        if not sides[side]:
            raise DirectionError(
                f"select: arditi scores sites on val-split prompts, and direction '{name}' has none on its {side} side "
                f"({', '.join(sets)}: 0 of {int(prompts.category.isin(list(sets)).sum())} prompts are in the val "
                "split). Add prompts to those sets, raise prompts.max_per_set, or set directions.select to cosmic or "
                "fixed."
            )
    return sides["target"], sides["baseline"]


def power_flags(counts: Mapping[str, Mapping[str, int]], min_per_side: int) -> dict[str, dict]:
    """Per direction, its side counts and whether it is under-powered (either side < ``min_per_side``).

    Input: ``{name: {"n_target", "n_baseline"}}``. Output: ``{name: {"n_target", "n_baseline",
    "min_per_side", "underpowered"}}``. A random control (no prompts on either side) is never flagged.
    """

    def weak(t: int, b: int) -> bool:
        return t + b > 0 and min(t, b) < min_per_side

    return {
        name: {
            "n_target": int(c["n_target"]),
            "n_baseline": int(c["n_baseline"]),
            "min_per_side": min_per_side,
            "underpowered": weak(int(c["n_target"]), int(c["n_baseline"])),
        }
        for name, c in counts.items()
    }


def lineage_residuals(
    atlas: xr.Dataset, stores: Mapping[str, xr.Dataset], layer_index: int, position_index: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per direction with prompts (not the random controls), float32 ``[n, hidden]`` residuals of the very prompts
    it was learnt from (its lineage), target side and baseline side, at one (layer, position)."""
    lineage_ = json.loads(atlas.attrs["lineage"])
    baseline_of = json.loads(atlas.attrs["baseline_of"])
    out = {}
    for name, sides in lineage_.items():
        if not sides["target_ids"]:
            continue
        pool = baseline_of.get(name, "benign")
        ids = sides["target_ids"]
        keys = ids if name == POOLED else [f"{name}/{i}" for i in ids]  # pooled's ids are category/id
        blocks = dict.fromkeys(k.split("/", 1)[0] for k in keys)
        target = np.concatenate(
            [load_prompts(stores[c], [k.split("/", 1)[1] for k in keys if k.split("/", 1)[0] == c]) for c in blocks]
        )
        baseline = load_prompts(stores[pool], sides["baseline_ids"])
        out[name] = (target[:, layer_index, position_index], baseline[:, layer_index, position_index])
    return out


def site_record(atlas: xr.Dataset, name: str, site: dict) -> dict:
    """What steering needs of one direction: its unit vector at the selected site, and the site.

    One small file per direction, so a change to one direction reruns only its own
    steering instance.
    """
    unit = atlas["direction"].sel(direction_name=name, layer=site["layer"], position=site["position"]).values
    return {
        "name": name,
        **{k: site[k] for k in ("layer", "position", "mean_resid_norm")},
        "d_model": int(unit.shape[0]),
        "unit": unit.astype(float).tolist(),
    }


def load_site(path, d_model: int) -> dict:
    """Read a direction's site record and check its hidden size against the model's ``d_model``."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise store.StoreError(
            f"{path}: no such direction site; run `dvc repro directions`, which writes one per direction"
        )
    record = json.loads(path.read_text())
    if len(record["unit"]) != d_model:
        raise store.StoreError(
            f"{path}: direction has hidden size {len(record['unit'])} but the model has d_model {d_model}; "
            "it was computed for another model. Rerun `dvc repro directions` for this model."
        )
    return record


def site_arrays(
    stores: Mapping[str, xr.Dataset],
    names: list[str],
    role: str,
    filter_: str,
    split: str,
    layer_index: int,
    position_index: int,
) -> dict[str, np.ndarray]:
    """set → float32 ``[n, hidden]`` residuals of one side at one (layer, position)."""
    return {
        n: load_prompts(stores[n], side_ids(stores[n], role, filter_, split))[:, layer_index, position_index]
        for n in names
    }


def resample_directions(
    target: np.ndarray, baseline: np.ndarray, n_per_side: int, n_draws: int, rng: np.random.Generator
) -> np.ndarray:
    """``[n_draws, hidden]`` unit difference-of-means directions from independent draws of both sides.

    Each side draws ``min(n_per_side, available)`` rows. A side with fewer than
    ``2 * n_per_side`` rows is drawn with replacement (a bootstrap): draws without
    replacement from such a pool share most of their rows, which would overstate how
    much independent draws agree.
    """

    def draw(rows: np.ndarray) -> np.ndarray:
        return rows[rng.choice(len(rows), min(n_per_side, len(rows)), replace=len(rows) < 2 * n_per_side)]

    out = []
    for _ in range(n_draws):
        t, b = draw(target), draw(baseline)
        d = t.astype(np.float64).mean(0) - b.astype(np.float64).mean(0)
        out.append(d / (np.linalg.norm(d) or 1.0))
    return np.stack(out)
