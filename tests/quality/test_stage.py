"""Quality (and bucket after it) end to end on committed upstream outputs: real Parquet, real manifests."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from data_contracts.bucket import BUCKETS_SCHEMA, BucketManifest
from data_contracts.quality import QUALITY_LABELS, QUALITY_SCHEMA, QualityManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import REJECTS_SCHEMA, read_table
from pipeline_config.load import load_config
from tasks.bucket.stage import SPEC as BUCKET_SPEC
from tasks.common.stage import run_stage
from tasks.quality.stage import SPEC
from tests.quality.data import commit_ingest, commit_tags, post, random_posts

# Flat colours on a 32-level grid, one per post: a sheet's pixels then say which posts it shows. Greys
# (text, background) and colours that the bucket previews' 0.45 dimming maps onto another code are left out.
_LEVELS = range(8)
COLOURS = [tuple(32 * q + 16 for q in c) for c in itertools.product(_LEVELS, repeat=3)
           if len(set(c)) > 1 and not set(c) <= {3, 5}]


def colour(post_id: int) -> tuple[int, int, int]:
    return COLOURS[post_id % len(COLOURS)]


def write_pool_images(store: ArtifactStore, rows: list[dict]) -> None:
    """A flat-colour image at every post's image_path (what ingest would have downloaded)."""
    pool = store.pool_dir()
    for r in rows:
        path = pool / r["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), colour(r["id"])).save(path, format="JPEG", quality=100)


def ids_shown(png: Path, candidates, min_px: int = 300) -> set[int]:
    """The candidate posts whose colour covers at least min_px pixels of the picture."""
    px = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    q = np.clip(np.rint((px - 16) / 32), 0, 7).astype(np.int64)
    exact = (np.abs(px - (32 * q + 16)) <= 3).all(-1)
    counts = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2])[exact], minlength=512)
    code = {c: (c[0] - 16) // 32 * 64 + (c[1] - 16) // 32 * 8 + (c[2] - 16) // 32 for c in COLOURS}
    return {int(i) for i in candidates if counts[code[colour(int(i))]] >= min_px}


def check_pictures(store: ArtifactStore, manifest, images: dict[str, str]) -> dict[str, Image.Image]:
    """Every picture is a listed file of the committed output (sha256 checked) and a plausible PNG."""
    out = {}
    for caption, rel in images.items():
        img = Image.open(store.path(manifest, rel, verify=True))
        assert img.format == "PNG" and 480 <= img.width <= 1600 and 150 <= img.height <= 4000, (caption, img.size)
        out[caption] = img
    return out


def test_quality_stage_end_to_end_then_bucket(tmp_path):
    store = ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")
    rows = random_posts(400) + [post(7, score=None)]
    commit_ingest(store, rows)
    write_pool_images(store, rows)
    commit_tags(store, [r["id"] for r in rows[:380]] + [7])
    cfg = load_config({"quality": {"min_posts_per_year": 50}, "bucket": {"batch_size": 4, "world_size": 2}})

    out = run_stage(SPEC, cfg, store)
    assert not out.cached
    manifest = store.read_manifest(QualityManifest)
    assert manifest.method == "kmeans" and manifest.fingerprint == out.manifest.fingerprint
    assert set(manifest.upstream) == {"ingest", "tag"}
    assert sum(manifest.label_counts.values()) == manifest.row_counts["quality"] == 380
    assert list(manifest.label_counts) == list(QUALITY_LABELS)
    quality = read_table(store.path(manifest, "quality.parquet", verify=True), QUALITY_SCHEMA)
    assert quality.num_rows == 380 and set(quality.column("label").to_pylist()) == set(QUALITY_LABELS)
    rejects = read_table(store.path(manifest, "rejects.parquet"), REJECTS_SCHEMA)
    assert rejects.to_pylist() == [{"id": 7, "reason": "no_score", "detail": "score is null"}]
    assert manifest.stats["reject_reasons"] == {"no_score": 1}
    assert "quality-examples" in out.report.tables and "kmeans" in out.report.summary_md
    # pictures: the histogram and a sheet per label, each showing only (and enough of) that label's posts
    assert list(out.report.images) == ["norm_score histogram", *[f"label: {label}" for label in QUALITY_LABELS]]
    pictures = check_pictures(store, manifest, out.report.images)
    assert pictures["norm_score histogram"].size == (700, 300)
    for label in QUALITY_LABELS:
        ids = quality.filter(pc.equal(quality.column("label"), label)).column("id").to_pylist()
        shown = ids_shown(store.path(manifest, out.report.images[f"label: {label}"]), quality.column("id").to_pylist())
        assert shown <= set(ids) and len(shown) == min(24, len(ids)), label
    assert "not drawn" not in out.report.summary_md

    again = run_stage(SPEC, cfg, store)
    assert again.cached and again.manifest.fingerprint == manifest.fingerprint
    assert again.report.tables["quality-boundaries"] == out.report.tables["quality-boundaries"]
    other = run_stage(SPEC, load_config({"quality": {"method": "percentile", "min_posts_per_year": 50}}), store)
    assert other.manifest.fingerprint != manifest.fingerprint and other.manifest.method == "percentile"
    run_stage(SPEC, cfg, store)  # back to kmeans as the current output (cached)

    bucketed = run_stage(BUCKET_SPEC, cfg, store)
    bm = store.read_manifest(BucketManifest)
    assert bm.upstream["quality"] == manifest.fingerprint
    table = read_table(store.path(bm, "buckets.parquet", verify=True), BUCKETS_SCHEMA)
    assert sorted(table.column("id").to_pylist()) == sorted(quality.column("id").to_pylist())
    assert len(bm.buckets) == 17 and all(n >= 8 for n in bm.bucket_counts.values())
    assert "aspect-ratio histogram" in bucketed.report.images


def test_a_failing_picture_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    store = ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")
    rows = random_posts(200)
    commit_ingest(store, rows)  # no images in the pool: the sheets show "no image" tiles
    commit_tags(store, [r["id"] for r in rows])

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("tasks.quality.stage.make_norm_histogram", broken)
    caplog.set_level(logging.WARNING)
    out = run_stage(SPEC, load_config({"quality": {"min_posts_per_year": 50}}), store)
    assert out.manifest.row_counts["quality"] == 200
    assert "norm_score histogram pictures not drawn: OSError: No space left on device" in out.report.summary_md
    assert "norm_score histogram pictures not drawn" in caplog.text
    assert list(out.report.images) == [f"label: {label}" for label in QUALITY_LABELS]  # the others still drawn
    check_pictures(store, out.manifest, out.report.images)
