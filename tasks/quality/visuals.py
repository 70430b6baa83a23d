"""Quality pictures: one contact sheet per label (worst score … masterpiece) and the norm_score histogram.

Inputs: the quality table (data_contracts/quality.py QUALITY_SCHEMA), the ingest posts table (id, score,
image_path) and the image pool (`store.pool_dir()`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from data_contracts.quality import QUALITY_LABELS
from tasks.common.visuals import (MUTED, THUMB, Line, Tile, contact_sheet, new_figure, pick, save_figure, save_png, slug,
                                  thumbnail)
from tasks.quality.core import boundaries


def make_label_sheets(
    quality: pa.Table,
    posts: pa.Table,
    pool: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    max_items: int = 24,
    thumb: int = THUMB,
) -> dict[str, str]:
    """A sheet per label in QUALITY_LABELS order (labels without samples left out): up to max_items
    posts chosen by seed, highest norm_score first, captioned with id, score, norm_score and year."""
    meta = {i: (p, s) for i, p, s in zip(posts.column("id").to_pylist(), posts.column("image_path").to_pylist(),
                                          posts.column("score").to_pylist())}
    ids = quality.column("id").to_numpy()
    labels = np.asarray(quality.column("label").to_pylist(), dtype=object)
    norm = quality.column("norm_score").to_numpy(zero_copy_only=False).astype(np.float64)
    years = quality.column("year").to_pylist()
    images: dict[str, str] = {}
    for label in QUALITY_LABELS:
        rows = np.flatnonzero(labels == label)
        if len(rows) == 0:
            continue
        chosen = rows[pick(ids[rows], max_items, seed)]
        chosen = sorted(chosen, key=lambda r: (-norm[r], ids[r]))
        tiles = []
        for r in chosen:
            path, score = meta.get(int(ids[r]), (None, None))
            tiles.append(Tile(thumbnail(Path(pool) / path, thumb) if path else None,
                              [f"#{ids[r]} score {score if score is not None else '?'}",
                               Line(f"norm {norm[r]:.3f} · {years[r]}", MUTED)]))
        title = f"quality {label}: {len(chosen)} of {len(rows)} (seed {seed}), highest norm_score first"
        images[f"label: {label}"] = save_png(contact_sheet(tiles, title, thumb=thumb), out_dir,
                                             f"quality-{slug(label)}")
    return images


def cut_points(norm_score: np.ndarray, cluster: np.ndarray) -> list[tuple[float, str]]:
    """Where one label ends and the next begins: the midpoint between label c's highest and label c+1's
    lowest norm_score (kmeans labels may overlap: then label c+1's lowest value, marked 'overlaps')."""
    rows = [r for r in boundaries(norm_score, cluster) if r["count"]]
    cuts = []
    for lo, hi in zip(rows, rows[1:]):
        if lo["norm_max"] <= hi["norm_min"]:
            mid = (lo["norm_max"] + hi["norm_min"]) / 2
            cuts.append((mid, f"{hi['label']} ≥ {mid:.3f}"))
        else:
            cuts.append((hi["norm_min"], f"{hi['label']} from {hi['norm_min']:.3f} (overlaps)"))
    return cuts


def make_norm_histogram(quality: pa.Table, out_dir: Path, *, bins: int = 50) -> dict[str, str]:
    """Histogram of norm_score (700 x 300 px), stacked by label, with the cluster boundaries marked."""
    fig = norm_histogram_figure(quality, bins=bins)
    return {"norm_score histogram": save_figure(fig, out_dir, "quality-norm-score-histogram")}


def norm_histogram_figure(quality: pa.Table, *, bins: int = 50):
    """The Figure of ``make_norm_histogram``. The legend sits right of the plot and each cut label on a
    white box left of its line, so the legend never hides a cut label and the bars never hide the text."""
    norm = quality.column("norm_score").to_numpy(zero_copy_only=False).astype(np.float64)
    cluster = quality.column("cluster").to_numpy(zero_copy_only=False).astype(np.int64)
    ok = np.isfinite(norm)
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist([norm[ok & (cluster == c)] for c in range(len(QUALITY_LABELS))], bins=bins, range=(0.0, 1.0),
            stacked=True, label=list(QUALITY_LABELS))
    for x, label in cut_points(norm, cluster):
        ax.axvline(x, color="#333333", lw=1, ls="--")
        ax.annotate(label, (x, 0.98), xycoords=("data", "axes fraction"), xytext=(-2, 0),
                    textcoords="offset points", rotation=90, fontsize=7, ha="right", va="top", color="#333333",
                    bbox={"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title="label",
              title_fontsize=8)
    ax.set_xlabel("norm_score (within-year percentile of popularity)")
    ax.set_ylabel("count")
    ax.set_title(f"norm_score of {len(norm)} samples by label", fontsize=10)
    fig.tight_layout()
    return fig


def make_quality_visuals(quality: pa.Table, posts: pa.Table, pool: Path, out_dir: Path, *, seed: int = 0,
                         max_items: int = 24) -> dict[str, str]:
    images = make_norm_histogram(quality, out_dir)
    images.update(make_label_sheets(quality, posts, pool, out_dir, seed=seed, max_items=max_items))
    return images
