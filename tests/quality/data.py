"""Realistic upstream tables for quality/bucket tests: ingest posts and tag-stage rows (real schemas)."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from data_contracts.ingest import IngestManifest, POSTS_SCHEMA
from data_contracts.store import ArtifactStore
from data_contracts.tag import TAGS_SCHEMA, TagManifest
from tests.stage_helpers import commit_output

_SIZES = [(768, 1024), (1024, 768), (1200, 1200), (850, 1200), (2048, 1024), (600, 1800), (1000, 1000),
          (1536, 2048), (900, 700), (3000, 800)]


def post(id: int, *, year: int | None = 2020, score: int | None = 10, fav: int | None = None,
         down: int | None = -1, width: int | None = 768, height: int | None = 1024) -> dict:
    """One posts.parquet row; up_score = score - down_score as on Danbooru."""
    created = None if year is None else datetime(year, 6, 1, tzinfo=timezone.utc)
    up = None if score is None or down is None else score - down
    return {
        "id": id, "md5": f"{id:032x}", "created_at": created, "score": score, "up_score": up,
        "down_score": down, "fav_count": fav if fav is not None else (None if score is None else max(0, 2 * score)),
        "rating": "g", "width": width, "height": height, "file_ext": "jpg", "file_size": 100_000,
        "source": "", "parent_id": None, "tags_general": ["1girl"], "tags_character": [], "tags_copyright": [],
        "tags_artist": [], "tags_meta": [], "image_path": f"ab/{id}.jpg", "query": "test",
    }


def random_posts(n: int, seed: int = 0, years: tuple[int, ...] = (2012, 2016, 2020, 2023)) -> list[dict]:
    """Scores inflate over the years (x ~1.6 per step) like Danbooru's; favs and votes correlate."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = i % len(years)
        base = rng.lognormal(mean=1.5 + 0.5 * k, sigma=0.8)
        score = int(base)
        down = -int(rng.poisson(0.3 + 0.1 * k))
        fav = int(base * rng.uniform(1.2, 2.5))
        w, h = _SIZES[int(rng.integers(len(_SIZES)))]
        rows.append(post(1000 + i, year=years[k], score=score, fav=fav, down=down, width=w, height=h))
    return rows


def posts_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=POSTS_SCHEMA)


def tags_table(ids, tag_weight=None) -> pa.Table:
    ids = list(ids)
    weights = tag_weight if tag_weight is not None else [1.0] * len(ids)
    return pa.Table.from_pylist(
        [
            {"id": i, "general": ["1girl"], "character": [], "added": [], "disputed": [],
             "rating_probs": [0.9, 0.05, 0.03, 0.02], "rating": "general", "tag_weight": w}
            for i, w in zip(ids, weights)
        ],
        schema=TAGS_SCHEMA,
    )


def commit_ingest(store: ArtifactStore, rows: list[dict]):
    return commit_output(store, IngestManifest, {"posts.parquet": (posts_table(rows), POSTS_SCHEMA)},
                         fields={"source": "danbooru_api"})


def commit_tags(store: ArtifactStore, ids, tag_weight=None):
    return commit_output(
        store, TagManifest, {"tags.parquet": (tags_table(ids, tag_weight), TAGS_SCHEMA)},
        fields={"model_name": "tiny", "model_identity": "0" * 64, "backend": "onnx",
                "thresholds": {"general": 0.35, "character": 0.85}},
    )
