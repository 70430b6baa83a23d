"""Tag pictures: thumbnails with the tags the tagger added (green) and strongly disputed (red).

Inputs: the tag stage's tags table (data_contracts/tag.py TAGS_SCHEMA: id, added, disputed), the ingest
posts table (id, image_path) and the image pool (`store.pool_dir()`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from tasks.common.visuals import GREEN, MUTED, RED, Line, Tile, contact_sheet, pick, save_png, thumbnail


def _tag_list(items: list[dict] | None, sign: str, ascending: bool = False) -> str:
    """'+tag .87, +other .61': most confident first (highest prob for added, lowest for disputed)."""
    direction = 1.0 if ascending else -1.0
    items = sorted(items or [], key=lambda t: (direction * (t.get("prob") or 0.0), t.get("tag") or ""))
    return ", ".join(f"{sign}{t['tag']} {t['prob']:.2f}".replace(" 0.", " .") for t in items)


def _sheet(rows: np.ndarray, tags: pa.Table, paths: dict[int, str], pool: Path, thumb: int,
           title: str, caption_rows: int) -> Image.Image:
    ids = tags.column("id").to_numpy()
    added = tags.column("added").to_pylist()
    disputed = tags.column("disputed").to_pylist()
    tiles = []
    for r in rows:
        post_id = int(ids[r])
        path = paths.get(post_id)
        lines: list[Line | str] = [Line(f"#{post_id}", MUTED)]
        if disputed[r]:
            lines.append(Line(_tag_list(disputed[r], "-", ascending=True), RED))
        if added[r]:
            lines.append(Line(_tag_list(added[r], "+"), GREEN))
        tiles.append(Tile(thumbnail(Path(pool) / path, thumb) if path else None, lines))
    return contact_sheet(tiles, title, thumb=thumb, caption_rows=caption_rows)


def make_tag_sheets(
    tags: pa.Table,
    posts: pa.Table,
    pool: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    max_items: int = 24,
    thumb: int = 176,
    caption_rows: int = 6,
) -> dict[str, str]:
    """Two sheets: posts where the tagger changed something (added or disputed tags; disputed shown
    first, in red, added in green, with probabilities), and posts with strongly disputed tags only,
    most confidently disputed first. A sheet with nothing to show is left out."""
    if tags.num_rows == 0:
        return {}
    paths = dict(zip(posts.column("id").to_pylist(), posts.column("image_path").to_pylist()))
    ids = tags.column("id").to_numpy()
    n_added = np.array([len(a or []) for a in tags.column("added").to_pylist()])
    disputed = tags.column("disputed").to_pylist()
    n_disputed = np.array([len(d or []) for d in disputed])
    images: dict[str, str] = {}

    changed = np.flatnonzero((n_added > 0) | (n_disputed > 0))
    if len(changed):
        rows = changed[pick(ids[changed], max_items, seed)]
        title = (f"tag: tagger changes on {len(rows)} of {len(changed)} changed posts ({tags.num_rows} tagged, "
                 f"seed {seed}); red - disputed, green + added, with tagger probability")
        images["tagger additions"] = save_png(_sheet(rows, tags, paths, pool, thumb, title, caption_rows),
                                              out_dir, "tag-added")
    with_disputed = np.flatnonzero(n_disputed > 0)
    if len(with_disputed):
        rows = with_disputed[pick(ids[with_disputed], max_items, seed)]
        # Most confidently disputed (lowest tagger probability for a Danbooru tag) first.
        lowest = {int(r): min((t.get("prob") or 0.0) for t in disputed[r]) for r in rows}
        rows = np.array(sorted(rows, key=lambda r: (lowest[int(r)], ids[r])), dtype=np.int64)
        title = (f"tag: {len(rows)} of {len(with_disputed)} posts with Danbooru tags the tagger disputes "
                 f"(seed {seed}), most confident dispute first")
        images["disputed tags"] = save_png(_sheet(rows, tags, paths, pool, thumb, title, caption_rows),
                                           out_dir, "tag-disputed")
    return images


def sheet_ids(tags: pa.Table, seed: int, max_items: int) -> set[int]:
    """The posts make_tag_sheets can show (the same `pick` over the same rows): fetched from object storage
    before drawing. Were the two to drift apart, a tile would only show blank, never fail the stage."""
    ids = tags["id"].to_numpy()
    n_added = np.array([len(a or []) for a in tags["added"].to_pylist()])
    n_disputed = np.array([len(d or []) for d in tags["disputed"].to_pylist()])
    chosen: set[int] = set()
    for rows in (np.flatnonzero((n_added > 0) | (n_disputed > 0)), np.flatnonzero(n_disputed > 0)):
        chosen.update(int(i) for i in ids[rows][pick(ids[rows], max_items, seed)])
    return chosen
