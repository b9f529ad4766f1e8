"""Every figure builds from small inputs, and its PNG bytes are valid and reproducible."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from refusal_atlas.analysis import geometry as geo
from refusal_atlas.report import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["SafetyCore", "OverRefusal", "Humanizing", "Incomplete", "HateSpeech"]


def _cos() -> pd.DataFrame:
    units = np.random.default_rng(0).standard_normal((5, 16)) + np.r_[2.0, np.zeros(15)]
    return geo.cosine_matrix(units, NAMES)


def _curve(shift: float) -> pd.DataFrame:
    alpha = np.array([10.0, 30.0, 60.0, 100.0])
    rr = np.clip(0.5 + alpha / 200 + shift, 0, 1)
    orr = np.clip(alpha / 120 + shift, 0, 1)
    return pd.DataFrame(
        {
            "alpha": alpha,
            "rr": rr,
            "rr_lo": rr - 0.05,
            "rr_hi": np.minimum(rr + 0.05, 1),
            "orr": orr,
            "orr_lo": np.maximum(orr - 0.05, 0),
            "orr_hi": orr + 0.05,
        }
    )


def _builders() -> dict:
    cos = _cos()
    clustering = geo.cluster_directions(cos, max_k=3)
    mds = geo.mds_embedding(cos, dims=(2,))
    rank = geo.effective_rank(np.random.default_rng(1).standard_normal((5, 16)))
    return {
        "cosine_heatmap": lambda: plots.cosine_heatmap(cos),
        "layer_curve": lambda: plots.layer_curve(
            range(4), {"offdiag": [0.1, 0.3, 0.5, 0.4], "max": [0.2, 0.6, 0.9, 0.8]}, ylabel="cosine", title="per layer"
        ),
        "dendrogram": lambda: plots.dendrogram_plot(clustering["linkage"]["average"], NAMES, title="average"),
        "dendrogram_cut": lambda: plots.dendrogram_plot(clustering["linkage"]["complete"], NAMES, n_clusters=2),
        "mds": lambda: plots.mds_scatter(
            mds[2]["coords"], groups=clustering["labels"]["average"][2].tolist(), stress=mds[2]["stress"]
        ),
        "mds_plain": lambda: plots.mds_scatter(mds[2]["coords"].to_numpy(), NAMES),
        "matrix_heatmap": lambda: plots.matrix_heatmap(
            cos.where(~np.eye(5, dtype=bool)), title="with NaN diagonal", cmap="magma", fmt=".1f"
        ),
        "matrix_centered": lambda: plots.matrix_heatmap(cos * 3 + 1, cmap="RdBu_r", center=0.0),
        "tradeoff": lambda: plots.tradeoff_plot(
            {
                "SafetyCore": _curve(0.0),
                "HateSpeech": _curve(0.05),
                "pooled": _curve(-0.05),
                "random_0": _curve(-0.4),
                "random_1": _curve(-0.45),
            }
        ),
        "tradeoff_some_labels": lambda: plots.tradeoff_plot(
            {"pooled": _curve(0.0), "x": _curve(0.1)}, annotate=["pooled"]
        ),
        "explained_variance": lambda: plots.explained_variance_plot(
            rank["cumulative"], participation_ratio=rank["participation_ratio"]
        ),
    }


@pytest.mark.parametrize("name", sorted(_builders()))
def test_each_plot_returns_a_figure_with_stable_png(name, tmp_path):
    build = _builders()[name]
    fig = build()
    assert isinstance(fig, Figure) and fig.axes
    first = plots.save_png(fig, tmp_path / "sub" / f"{name}.png")
    data = first.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert b"Software" not in data and b"matplotlib" not in data.lower()
    second = plots.save_png(fig, tmp_path / f"{name}_again.png").read_bytes()
    assert second == data
    # A fresh figure from the same inputs renders to the very same bytes.
    assert plots.png_bytes(build()) == data
    assert not list(tmp_path.rglob("*.tmp"))


def test_save_png_replaces_an_existing_file(tmp_path):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    plots.save_png(plots.cosine_heatmap(_cos()), target)
    assert target.read_bytes().startswith(PNG_MAGIC)


def test_cosine_heatmap_prints_values_and_fixes_the_colour_scale():
    cos = _cos()
    fig = plots.cosine_heatmap(cos)
    ax = fig.axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert f"{cos.iloc[0, 1]:.2f}" in texts and "1.00" in texts
    assert len(ax.texts) == 25
    assert ax.images[0].norm.vmin == -1.0 and ax.images[0].norm.vmax == 1.0
    assert [t.get_text() for t in ax.get_yticklabels()] == NAMES


def test_tradeoff_plot_styles_controls_and_pooled():
    fig = plots.tradeoff_plot(
        {"SafetyCore": _curve(0.0), "pooled": _curve(0.1), "random_0": _curve(-0.3), "random_1": _curve(-0.3)}
    )
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels.count("random controls") == 1 and "pooled" in labels and "SafetyCore" in labels
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers carry the labels
    assert lines["pooled"].get_color() == "black"
    assert lines["random controls"].get_linestyle() == "--"
    assert {"10", "30", "60", "100"} <= {t.get_text() for t in ax.texts}
