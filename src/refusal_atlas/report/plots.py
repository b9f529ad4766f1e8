"""Figures for the geometry and steering results, with byte-stable PNG output.

Every function builds a :class:`matplotlib.figure.Figure` on an Agg canvas directly,
without pyplot: no global figure registry to leak memory in long stages, no GUI
backend needed on a headless machine, and whatever backend a notebook has chosen is
left alone. Sizes and dpi are fixed functions of the input, and PNGs are written
without the "Software" text chunk, so the same data and matplotlib version give the
same bytes (which keeps DVC hashes stable).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import dendrogram

DPI = 120
# Matplotlib writes its version under "Software" by default; dropping it keeps bytes stable
# across patch upgrades that do not change rendering.
_PNG_METADATA = {"Software": None}


def _figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure) -> Figure:
    """Lay the figure out once and freeze it.

    Constrained layout (and equal-aspect axes) re-solve positions on every draw, so a
    second save of the same figure could move a colorbar by a pixel; one draw followed by
    switching the layout engine off makes every later render byte-identical.
    """
    fig.canvas.draw()
    fig.set_layout_engine("none")
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render ``fig`` to PNG bytes (fixed dpi, no software/time metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=_PNG_METADATA)
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG at ``path`` atomically (temporary sibling, then ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _annotate(ax, values: np.ndarray, fmt: str, image) -> None:
    """Print each cell's value in white on dark cells and black on light ones, whatever the colormap."""
    for (i, j), v in np.ndenumerate(values):
        if np.isnan(v):
            continue
        r, g, b, _ = image.cmap(image.norm(v))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # perceived luminance of the cell colour
        ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color="white" if dark else "black")


def matrix_heatmap(
    df: pd.DataFrame,
    title: str = "",
    cmap: str = "viridis",
    fmt: str = ".2f",
    vmin: float | None = None,
    vmax: float | None = None,
    center: float | None = None,
    colorbar_label: str = "",
) -> Figure:
    """Annotated heatmap of any rows × columns DataFrame (transfer, selectivity, angles, styles).

    NaN cells stay blank. With ``center`` the colormap is diverging around that value
    (use a diverging ``cmap`` such as "RdBu_r"); otherwise it spans [vmin, vmax], which
    default to the data range.
    """
    values = df.to_numpy(dtype=np.float64)
    n_rows, n_cols = values.shape
    fig, ax = _figure(max(4.0, 0.6 * n_cols + 2.5), max(3.0, 0.45 * n_rows + 1.8))
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
    if center is not None:
        # TwoSlopeNorm needs vmin < center < vmax; widen symmetric limits when the data sit on one side.
        span = max(abs(hi - center), abs(center - lo), 1e-9)
        norm = TwoSlopeNorm(vcenter=center, vmin=min(lo, center - span), vmax=max(hi, center + span))
    else:
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    _annotate(ax, values, fmt, image)
    ax.set_xticks(range(n_cols), [str(c) for c in df.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), [str(r) for r in df.index], fontsize=8)
    if df.columns.name:
        ax.set_xlabel(str(df.columns.name))
    if df.index.name:
        ax.set_ylabel(str(df.index.name))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label=colorbar_label)
    return _finish(fig)


def cosine_heatmap(df: pd.DataFrame, title: str = "Cosine similarity of refusal directions") -> Figure:
    """Annotated k×k cosine heatmap, diverging colormap fixed to [-1, 1] and centred at 0.

    Fixed limits make heatmaps of different models or layers directly comparable.
    """
    return matrix_heatmap(
        df, title=title, cmap="RdBu_r", fmt=".2f", vmin=-1.0, vmax=1.0, center=0.0, colorbar_label="cosine"
    )


def layer_curve(
    x: Sequence[float], ys: Mapping[str, Sequence[float]], xlabel: str = "layer", ylabel: str = "", title: str = ""
) -> Figure:
    """One line per label over a shared x axis (e.g. mean off-diagonal cosine per layer)."""
    fig, ax = _figure(6.0, 3.8)
    for label, y in ys.items():
        ax.plot(np.asarray(x), np.asarray(y, dtype=np.float64), marker="o", markersize=3, label=str(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        ax.legend(fontsize=7, loc="best")
    return _finish(fig)


def dendrogram_plot(
    linkage: np.ndarray,
    names: Sequence[str],
    title: str = "",
    n_clusters: int | None = None,
    distance_label: str = "1 − cosine",
) -> Figure:
    """Dendrogram of a scipy linkage matrix [k − 1, 4], leaves labelled by ``names``.

    With ``n_clusters`` the branches of the cut into that many clusters are coloured
    (the cut height is midway between the merges that separate k and k − 1 clusters);
    without it the tree is drawn in one colour rather than scipy's arbitrary 0.7·max cut.
    """
    z = np.asarray(linkage, dtype=np.float64)
    threshold = 0.0
    if n_clusters is not None and 2 <= n_clusters <= len(names):
        threshold = (z[-n_clusters, 2] + z[-(n_clusters - 1), 2]) / 2 if n_clusters <= len(z) else z[0, 2] / 2
    fig, ax = _figure(max(5.0, 0.45 * len(names) + 2.0), 4.0)
    dendrogram(
        z,
        labels=list(names),
        ax=ax,
        leaf_rotation=90,
        leaf_font_size=8,
        color_threshold=threshold,
        above_threshold_color="0.35",
    )
    if threshold > 0:
        ax.axhline(threshold, linestyle=":", color="0.5", linewidth=1)
    ax.set_ylabel(distance_label)
    ax.set_title(title)
    return _finish(fig)


def mds_scatter(
    coords: np.ndarray | pd.DataFrame,
    names: Sequence[str] | None = None,
    groups: Sequence | None = None,
    title: str = "MDS of 1 − cosine",
    stress: float | None = None,
) -> Figure:
    """2-D scatter of MDS coordinates [k, 2], each point labelled; ``groups`` (length k) colours points.

    ``names`` defaults to the DataFrame index when ``coords`` is a DataFrame. A given
    ``stress`` is shown in the title so the reader knows how faithful the picture is.
    """
    if names is None:
        names = list(coords.index) if isinstance(coords, pd.DataFrame) else [str(i) for i in range(len(coords))]
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    fig, ax = _figure(5.5, 5.0)
    if groups is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=30, color="C0")
    else:
        groups = list(groups)
        # Sorted group order keeps colours stable whatever order the categories arrive in.
        for colour, g in enumerate(sorted(set(groups), key=str)):
            mask = np.array([x == g for x in groups])
            ax.scatter(xy[mask, 0], xy[mask, 1], s=30, color=f"C{colour % 10}", label=str(g))
        ax.legend(fontsize=7, title="group", title_fontsize=7)
    for (px, py), name in zip(xy, names):
        ax.annotate(str(name), (px, py), xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_title(title if stress is None else f"{title} (stress-1 = {stress:.3f})")
    ax.grid(alpha=0.3)
    return _finish(fig)


def _curve_style(name: str, index: int) -> dict:
    if name.startswith("random"):
        return {"color": "0.6", "linestyle": "--", "linewidth": 1.0, "zorder": 1}
    if name == "pooled":
        return {"color": "black", "linestyle": "-", "linewidth": 2.2, "zorder": 3}
    return {"color": f"C{index % 10}", "linestyle": "-", "linewidth": 1.3, "zorder": 2}


def tradeoff_plot(
    curves: Mapping[str, pd.DataFrame],
    title: str = "Refusal vs over-refusal under steering",
    annotate: Sequence[str] | None = None,
) -> Figure:
    """Refusal rate (y) against over-refusal rate (x) for every direction, one curve per direction.

    Each DataFrame has columns ``rr``, ``rr_lo``, ``rr_hi``, ``orr``, ``orr_lo``,
    ``orr_hi`` and ``alpha`` (one row per steering strength, rates in [0, 1], lo/hi the
    CI bounds). Points are joined in increasing α and labelled with α, for the curves
    named in ``annotate`` (default: all). Names starting with "random" are drawn dashed
    grey (controls, one legend entry), "pooled" black; the dotted diagonal RR = ORR
    marks a direction that refuses harmful and benign prompts alike. An SAE direction
    ("sae_<name>") is drawn dashed with square markers in the colour of ``<name>``.
    """
    fig, ax = _figure(6.5, 5.5)
    ax.plot([0, 1], [0, 1], linestyle=":", color="0.75", linewidth=1, zorder=0, label="RR = ORR")
    random_labelled = False
    colour_index, colours = 0, {}
    for name, df in curves.items():
        df = df.sort_values("alpha")
        base = name.removeprefix("sae_")
        style = _curve_style(base, colours.get(base, colour_index))
        if base != name:
            style.update(linestyle="--", marker="s")
        elif not name.startswith("random") and name != "pooled":
            colours[name] = colour_index
            colour_index += 1
        label = name
        if name.startswith("random"):
            label = None if random_labelled else "random controls"
            random_labelled = True
        xerr = np.clip(np.vstack([df["orr"] - df["orr_lo"], df["orr_hi"] - df["orr"]]), 0, None)
        yerr = np.clip(np.vstack([df["rr"] - df["rr_lo"], df["rr_hi"] - df["rr"]]), 0, None)
        ax.errorbar(
            df["orr"],
            df["rr"],
            xerr=xerr,
            yerr=yerr,
            marker=style.get("marker", "o"),
            markersize=3.5,
            capsize=2,
            elinewidth=0.7,
            label=label,
            **{k: v for k, v in style.items() if k != "marker"},
        )
        if annotate is None or name in annotate:
            for _, row in df.iterrows():
                ax.annotate(
                    f"{row['alpha']:g}",
                    (row["orr"], row["rr"]),
                    xytext=(3, -8),
                    textcoords="offset points",
                    fontsize=6,
                    color=style["color"],
                )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("over-refusal rate (benign prompts refused)")
    ax.set_ylabel("refusal rate (harmful prompts refused)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncols=2)
    return _finish(fig)


def explained_variance_plot(
    cumulative: Sequence[float],
    title: str = "Spectrum of the direction matrix",
    participation_ratio: float | None = None,
) -> Figure:
    """Per-component (bars) and cumulative (line) explained variance, from ``effective_rank()["cumulative"]`` [k]."""
    cum = np.asarray(cumulative, dtype=np.float64)
    single = np.diff(np.r_[0.0, cum])
    x = np.arange(1, cum.size + 1)
    fig, ax = _figure(5.5, 3.8)
    ax.bar(x, single, color="C0", alpha=0.5, label="per component")
    ax.plot(x, cum, marker="o", color="C1", label="cumulative")
    ax.axhline(0.9, linestyle=":", color="0.5", linewidth=1)
    ax.set_xticks(x)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("component")
    ax.set_ylabel("share of Σ singular value²")
    ax.set_title(title if participation_ratio is None else f"{title} (participation ratio = {participation_ratio:.2f})")
    ax.legend(fontsize=7, loc="center right")
    return _finish(fig)


def cosine_distributions(values: Mapping[str, Sequence[float]], title: str = "") -> Figure:
    """Overlaid histograms of cosine samples on a shared [-1, 1] axis (the replicate noise floor and controls)."""
    fig, ax = _figure(6.0, 3.8)
    bins = np.linspace(-1, 1, 81)
    for label, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        ax.hist(v, bins=bins, alpha=0.55, density=True, label=f"{label} (n={v.size}, mean {v.mean():.2f})")
    ax.set_xlabel("cosine")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _finish(fig)


def geometry_figures(r) -> dict[str, Figure]:
    """The geometry stage's PNGs by file name, from an ``analysis.geometry_analysis.GeometryResult``."""
    cats = list(r.cos.index)
    return {
        "cosine_heatmap.png": cosine_heatmap(r.cos),
        "layer_curve.png": layer_curve(
            r.layers,
            {"mean off-diagonal cosine": r.per_layer},
            ylabel="cosine",
            title="Category directions across layers",
        ),
        "dendrogram.png": dendrogram_plot(
            r.clustering["linkage"]["average"], cats, "Average linkage on 1 - cos", r.clustering["best_k"]["average"]
        ),
        "mds.png": mds_scatter(r.mds[2]["coords"], cats, title="Metric MDS", stress=r.mds[2]["stress"]),
        "probe_transfer.png": matrix_heatmap(r.transfer, "Probe transfer (train → test)", "viridis", ".2f", 0, 1),
        "selectivity.png": matrix_heatmap(
            r.selectivity, "Selectivity: projection minus benign", "RdBu_r", ".1f", center=0
        ),
        "explained_variance.png": explained_variance_plot(
            r.rank["cumulative"], participation_ratio=r.rank["participation_ratio"]
        ),
        "controls.png": cosine_distributions(
            {
                "within a category (resamples)": r.controls["replicate"]["values"]["within"],
                "between categories (resamples)": r.controls["replicate"]["values"]["between"],
                "random subsets of all targets": r.controls["random_harmful"]["values"]["random"],
            },
            title="Replicate noise floor and the random-harmful control",
        ),
    }
