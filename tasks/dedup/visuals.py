"""Dedup pictures: a contact sheet of the largest near-duplicate groups, and the pair-distance histogram.

Inputs: the groups (tasks/dedup/groups.py DedupGroups, one entry per post in the order the posts were
given), the ingest posts table in that same order (data_contracts/ingest.py POSTS_SCHEMA: id, score,
width, height, image_path) and the image pool (`store.pool_dir()`; image_path is relative to it).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from tasks.common.visuals import (
    BACKGROUND,
    GREEN,
    MUTED,
    PAD,
    RED,
    Line,
    Tile,
    contact_sheet,
    histogram,
    letterbox,
    save_png,
    thumbnail,
)
from tasks.dedup.groups import DedupGroups

SHEET_THUMB = 128
MARK_WIDTH = 4  # the frame around a group's representative


def largest_groups(groups: DedupGroups, max_groups: int) -> list[np.ndarray]:
    """Row indices of the `max_groups` largest groups (size desc, then representative id), each with its
    representative first, then by distance to it, then by id."""
    multi = np.flatnonzero(groups.size > 1)
    if len(multi) == 0 or max_groups <= 0:
        return []
    reps = np.flatnonzero(groups.kept & (groups.size > 1))
    reps = reps[np.lexsort((groups.group[reps], -groups.size[reps]))][:max_groups]
    out = []
    for r in reps:
        rows = np.flatnonzero(groups.group == groups.group[r])
        rows = rows[np.lexsort((groups.ids[rows], groups.distance[rows], ~groups.kept[rows]))]
        out.append(rows)
    return out


def _marked(img: Image.Image | None, size: int) -> Image.Image | None:
    if img is None:
        return None
    img = letterbox(img, size)
    ImageDraw.Draw(img).rectangle([0, 0, size - 1, size - 1], outline=GREEN, width=MARK_WIDTH)
    return img


def _num(x) -> str:
    return "?" if x is None or (isinstance(x, float) and not np.isfinite(x)) else str(int(x))


def group_sheet(
    groups: DedupGroups,
    score: Sequence,
    width: Sequence,
    height: Sequence,
    paths: Sequence[str | Path | None],
    *,
    max_groups: int = 10,
    max_per_group: int = 8,
    thumb: int = SHEET_THUMB,
    title: str | None = None,
) -> Image.Image:
    """One row per group (largest first): the kept representative first, framed in green, then the dropped
    posts by distance; captions: post id, score, resolution, pHash distance to the representative."""
    rows_per_group = largest_groups(groups, max_groups)
    strips = []
    for rows in rows_per_group:
        shown = rows[:max_per_group]
        tiles = []
        for r in shown:
            img = thumbnail(paths[r], thumb) if paths[r] is not None else None
            rep = bool(groups.kept[r])
            lines: list[Line | str] = [
                f"#{groups.ids[r]} · score {_num(score[r])}",
                Line(f"{_num(width[r])}x{_num(height[r])}", MUTED),
                Line("KEPT (representative)", GREEN) if rep else Line(f"dropped · distance {groups.distance[r]}", RED),
            ]
            tiles.append(Tile(_marked(img, thumb) if rep else img, lines))
        rep = rows[0]
        more = f", showing {len(shown)}" if len(rows) > len(shown) else ""
        head = (f"group of {len(rows)}{more}: keeps #{groups.ids[rep]}; distances "
                f"{int(groups.distance[rows].min())}..{int(groups.distance[rows].max())}")
        strips.append(contact_sheet(tiles, head, thumb=thumb, caption_rows=3,
                                    max_width=PAD + max_per_group * (thumb + PAD)))
    n_groups = groups.n_groups
    title = title or (f"near-duplicate groups: the {len(strips)} largest of {n_groups} "
                      f"({groups.n_dropped} posts dropped; pHash distance <= {groups.max_distance}, "
                      f"parent/child <= {groups.parent_distance}); the kept post is framed in green")
    head = contact_sheet([], title, max_width=PAD + max_per_group * (thumb + PAD))
    if not strips:
        return head
    width_px = max(s.width for s in [head, *strips])
    sheet = Image.new("RGB", (width_px, head.height + sum(s.height for s in strips)), BACKGROUND)
    y = 0
    for strip in [head, *strips]:
        sheet.paste(strip, (0, y))
        y += strip.height
    return sheet


def make_group_sheet(
    groups: DedupGroups,
    posts: pa.Table,
    pool: Path,
    out_dir: Path,
    *,
    max_groups: int = 10,
    max_per_group: int = 8,
    thumb: int = SHEET_THUMB,
    fetch: Callable[[list[str]], object] | None = None,
) -> dict[str, str]:
    """Write `visuals/dedup-groups.png`; `posts` in the order `groups` was computed on. `fetch(rels)` makes
    the shown files local first (object storage: ArtifactStore.pool_fetch)."""
    ids = posts.column("id").to_numpy()
    if len(ids) != len(groups.ids) or not np.array_equal(ids, groups.ids):
        raise ValueError("posts must be the table the groups were computed on, in the same order")
    rels = posts.column("image_path").to_pylist()
    shown = [r for rows in largest_groups(groups, max_groups) for r in rows[:max_per_group]]
    if fetch is not None and shown:
        fetch([rels[r] for r in shown])
    paths: list[Path | None] = [None] * len(rels)
    for r in shown:
        paths[r] = Path(pool) / rels[r] if rels[r] else None
    sheet = group_sheet(groups, posts.column("score").to_pylist(), posts.column("width").to_pylist(),
                        posts.column("height").to_pylist(), paths, max_groups=max_groups,
                        max_per_group=max_per_group, thumb=thumb)
    return {"near-duplicate groups": save_png(sheet, out_dir, "dedup-groups")}


def make_distance_histogram(groups: DedupGroups, out_dir: Path) -> dict[str, str]:
    """Histogram of the pHash distances of the linked pairs (by hash search vs by parent/child link)."""
    d = groups.pair_distance.astype(np.float64)
    top = max(groups.parent_distance, groups.max_distance) + 1
    rel = histogram(d, out_dir, "dedup-pair-distances", bins=top + 1, value_range=(-0.5, top + 0.5),
                    xlabel="pHash distance (bits of 64)",
                    title=f"{len(d):,} near-duplicate pairs", vlines=[(groups.max_distance + 0.5, "max_distance"),
                                                                      (groups.parent_distance + 0.5, "parent_distance")],
                    groups=[("hash search", ~groups.pair_parent), ("parent/child link", groups.pair_parent)])
    return {"near-duplicate pair distances": rel}
