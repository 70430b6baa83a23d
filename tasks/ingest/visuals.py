"""Ingest pictures: a contact sheet per character and per series, and one of rejects (by reason).

Inputs are the contract tables (data_contracts/ingest.py POSTS_SCHEMA, REJECTS) and the image pool
(`store.pool_dir()`; posts.image_path is relative to it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.common.visuals import MUTED, RED, THUMB, Line, Tile, contact_sheet, pick, save_png, slug, thumbnail

TAG_COLUMNS = {"character": "tags_character", "series": "tags_copyright"}


def _group_rows(posts: pa.Table, column: str) -> dict[str, np.ndarray]:
    """tag -> row indices of the posts carrying it (one post can be in several groups)."""
    tags = posts.column(column).combine_chunks()
    if len(tags) == 0:
        return {}
    flat = pc.list_flatten(tags).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(tags).to_numpy()
    groups: dict[str, list[int]] = {}
    for tag, row in zip(flat, parents):
        if tag:
            groups.setdefault(str(tag), []).append(int(row))
    return {tag: np.unique(np.asarray(rows, dtype=np.int64)) for tag, rows in groups.items()}


def _score_text(score) -> str:
    return "score ?" if score is None else f"score {score}"


def make_group_sheets(
    posts: pa.Table,
    pool: Path,
    out_dir: Path,
    *,
    by: str = "character",
    seed: int = 0,
    max_items: int = 24,
    max_groups: int = 12,
    thumb: int = THUMB,
    fetch: Callable[[list[str]], object] | None = None,
) -> dict[str, str]:
    """One sheet per character (`by="character"`, tags_character) or series (`by="series"`,
    tags_copyright): the `max_groups` largest groups, up to `max_items` posts each, best score first,
    captioned with post id and score. `fetch(rels)` makes the shown files local first (object storage:
    ArtifactStore.pool_fetch), so only those are downloaded."""
    column = TAG_COLUMNS[by]
    groups = _group_rows(posts, column)
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:max_groups]
    ids = posts.column("id").to_numpy()
    scores = posts.column("score").to_pylist()
    paths = posts.column("image_path").to_pylist()
    images: dict[str, str] = {}
    for tag, rows in ranked:
        chosen = rows[pick(ids[rows], max_items, seed)]
        chosen = sorted(chosen, key=lambda r: (-(scores[r] if scores[r] is not None else -(1 << 31)), ids[r]))
        if fetch is not None:
            fetch([paths[r] for r in chosen])
        tiles = [
            Tile(thumbnail(Path(pool) / paths[r], thumb), [f"#{ids[r]}", Line(_score_text(scores[r]), MUTED)])
            for r in chosen
        ]
        title = f"{by} {tag}: {len(chosen)} of {len(rows)} posts (seed {seed}), best score first"
        images[f"{by}: {tag}"] = save_png(contact_sheet(tiles, title, thumb=thumb), out_dir, f"ingest-{by}-{slug(tag)}")
    return images


def make_character_sheets(posts: pa.Table, pool: Path, out_dir: Path, *, seed: int = 0, max_items: int = 24,
                          max_groups: int = 12, fetch: Callable[[list[str]], object] | None = None) -> dict[str, str]:
    return make_group_sheets(posts, pool, out_dir, by="character", seed=seed, max_items=max_items,
                             max_groups=max_groups, fetch=fetch)


def make_series_sheets(posts: pa.Table, pool: Path, out_dir: Path, *, seed: int = 0, max_items: int = 24,
                       max_groups: int = 12, fetch: Callable[[list[str]], object] | None = None) -> dict[str, str]:
    return make_group_sheets(posts, pool, out_dir, by="series", seed=seed, max_items=max_items,
                             max_groups=max_groups, fetch=fetch)


def make_rejects_sheet(
    rejects: pa.Table,
    pool: Path,
    out_dir: Path,
    image_paths: Mapping[int, str],
    *,
    seed: int = 0,
    max_items: int = 24,
    per_reason: int = 6,
    thumb: int = THUMB,
    exists: Callable[[str], bool] | None = None,
    fetch: Callable[[list[str]], object] | None = None,
) -> dict[str, str]:
    """One sheet of rejected posts whose image exists, grouped by reason (up to `per_reason` each).

    The rejects table holds no file path: `image_paths` maps a rejected post id to its pool-relative
    path (`images/<md5[:2]>/<md5>.<ext>`, known for posts whose metadata was read); ids without a
    file in the pool are left out. Returns {} when no rejected post has an image. On object storage
    `exists(rel)` answers from the store's pool and `fetch(rels)` makes only the shown files local.
    """
    if rejects.num_rows == 0 or not image_paths:
        return {}
    exists = exists or (lambda rel: (Path(pool) / rel).is_file())
    ids = rejects.column("id").to_numpy()
    reasons = rejects.column("reason").to_pylist()
    details = rejects.column("detail").to_pylist()
    have = np.array([i for i in range(len(ids)) if image_paths.get(int(ids[i]))
                     and exists(image_paths[int(ids[i])])], dtype=np.int64)
    if len(have) == 0:
        return {}
    by_reason: dict[str, list[int]] = {}
    for i in have:
        by_reason.setdefault(reasons[i], []).append(int(i))
    shown: list[int] = []
    for reason in sorted(by_reason, key=lambda r: (-len(by_reason[r]), r)):
        rows = np.asarray(by_reason[reason], dtype=np.int64)
        shown += [int(i) for i in rows[pick(ids[rows], per_reason, seed)]][:max(0, max_items - len(shown))]
    if fetch is not None:
        fetch([image_paths[int(ids[i])] for i in shown])
    tiles = [Tile(thumbnail(Path(pool) / image_paths[int(ids[i])], thumb),
                  [Line(reasons[i], RED), f"#{ids[i]}", Line(details[i] or "", MUTED)]) for i in shown]
    title = (f"ingest rejects with an image: {len(tiles)} shown of {len(have)} "
             f"({len(rejects)} rejects in all), grouped by reason")
    sheet = contact_sheet(tiles, title, thumb=thumb, caption_rows=4)
    return {"rejects by reason": save_png(sheet, out_dir, "ingest-rejects")}


def make_ingest_visuals(posts: pa.Table, rejects: pa.Table, pool: Path, out_dir: Path, *, seed: int = 0,
                        max_items: int = 24, max_groups: int = 12,
                        reject_image_paths: Mapping[int, str] | None = None) -> dict[str, str]:
    """Everything the ingest stage shows: character sheets, series sheets, the rejects sheet."""
    images = make_character_sheets(posts, pool, out_dir, seed=seed, max_items=max_items, max_groups=max_groups)
    images.update(make_series_sheets(posts, pool, out_dir, seed=seed, max_items=max_items, max_groups=max_groups))
    images.update(make_rejects_sheet(rejects, pool, out_dir, reject_image_paths or {}, seed=seed,
                                     max_items=max_items))
    return images
