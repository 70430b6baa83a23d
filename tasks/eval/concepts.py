"""Which concepts are evaluated, with which prompt, against which training images.

The training set is the tag stage's output (final character tags) joined with the ingest posts (artists,
series, image files). A concept is a character or artist tag carried by at least `min_samples` of those
images; the most frequent `max_concepts` per kind are kept. Prompts follow the training template
(count tags, character, series | artist, quality tags) in rendered form (`aoi \\(series\\)`).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa

from data_contracts.errors import ContractError
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table
from data_contracts.tag import TAGS_SCHEMA, TagManifest
from tasks.captions import join_caption, split_count_tags

POST_COLUMNS = ["id", "tags_copyright", "tags_artist", "image_path"]
_SLUG = re.compile(r"[^a-z0-9]+")


@dataclass
class Concept:
    kind: str                      # character | artist | control
    tag: str                       # Danbooru tag; control: "control-<i>"
    prompt: str
    train_ids: list[int] = field(default_factory=list)   # every training image carrying the concept
    ref_ids: list[int] = field(default_factory=list)     # the ones the probe is fitted on

    @property
    def slug(self) -> str:
        return f"{self.kind}-{_SLUG.sub('-', self.tag.lower()).strip('-')[:60]}"


def posts_files(manifest: IngestManifest) -> list[str]:
    """The ingest posts table: posts.parquet or its shards (posts/*.parquet, posts-*.parquet)."""
    names = sorted(f.path for f in manifest.files if f.path.endswith(".parquet") and
                   (f.path == "posts.parquet" or f.path.startswith(("posts/", "posts-", "posts_"))))
    if not names:
        raise ContractError(f"ingest {manifest.fingerprint}: manifest lists no posts table; rerun `fm run ingest`")
    return names


def training_rows(store: ArtifactStore, ingest: IngestManifest, tag: TagManifest) -> list[dict[str, Any]]:
    """One row per tagged image: id, character, general (tag stage), copyright, artist, image_path (ingest)."""
    posts = pa.concat_tables([
        read_table(store.path(ingest, rel), POSTS_SCHEMA, f"ingest/{ingest.fingerprint}/{rel}", columns=POST_COLUMNS)
        for rel in posts_files(ingest)])
    by_id = {r["id"]: r for r in posts.to_pylist()}
    tags = read_table(store.path(tag, "tags.parquet"), TAGS_SCHEMA, f"tag/{tag.fingerprint}/tags.parquet",
                      columns=["id", "general", "character"])
    rows = []
    for r in tags.to_pylist():
        post = by_id.get(r["id"])
        if post is None:
            raise ContractError(f"tag/{tag.fingerprint}: post {r['id']} is not in ingest/{ingest.fingerprint}; "
                                "rerun `fm run tag --force`")
        rows.append({"id": r["id"], "character": r["character"] or [], "general": r["general"] or [],
                     "copyright": post["tags_copyright"] or [], "artist": post["tags_artist"] or [],
                     "image_path": post["image_path"]})
    rows.sort(key=lambda r: r["id"])
    return rows


def _most_common(items: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    counts = Counter(items)
    return min(counts, key=lambda k: (-counts[k], k)) if counts else ()


def spread(ids: Sequence[int], n: int) -> list[int]:
    """At most n ids, evenly spread over the sorted list (deterministic)."""
    ids = sorted(ids)
    if len(ids) <= n:
        return ids
    return [ids[round(i * (len(ids) - 1) / (n - 1))] for i in range(n)] if n > 1 else ids[:1]


def concept_prompt(kind: str, tag: str, rows: list[dict], quality: Sequence[str]) -> str:
    count = _most_common([tuple(split_count_tags(r["general"])[0]) for r in rows])
    if kind == "character":
        series = _most_common([tuple(r["copyright"][:1]) for r in rows])
        segments = [list(count), [tag], list(series)]
    else:
        segments = [list(count), [tag]]
    return join_caption([*segments, list(quality)])


def select_concepts(rows: list[dict], *, kinds: Sequence[str], min_samples: int, max_concepts: int,
                    reference_images: int, quality: Sequence[str]) -> list[Concept]:
    """Characters/artists with >= min_samples images, most frequent first (ties by name)."""
    out: list[Concept] = []
    for kind in kinds:
        members: dict[str, list[dict]] = {}
        for r in rows:
            for t in set(r[kind]):
                members.setdefault(t, []).append(r)
        ranked = sorted((t for t, m in members.items() if len(m) >= min_samples), key=lambda t: (-len(members[t]), t))
        for t in ranked[:max_concepts]:
            m = members[t]
            # Probe references: images showing only this character when there are enough (a duo image
            # would pull the centroid towards the other one); artists use every image.
            pool = [r for r in m if len(r["character"]) == 1] if kind == "character" else m
            if len(pool) < 2:
                pool = m
            out.append(Concept(kind, t, concept_prompt(kind, t, m, quality), [r["id"] for r in m],
                               spread([r["id"] for r in pool], reference_images)))
    return out


def control_concepts(prompts: Sequence[str], quality: Sequence[str]) -> list[Concept]:
    q = join_caption([list(quality)])
    return [Concept("control", f"control-{i}", f"{p}, {q}" if q else p) for i, p in enumerate(prompts)]
