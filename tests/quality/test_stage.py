"""Quality (and bucket after it) end to end on committed upstream outputs: real Parquet, real manifests."""
from __future__ import annotations

from data_contracts.bucket import BUCKETS_SCHEMA, BucketManifest
from data_contracts.quality import QUALITY_LABELS, QUALITY_SCHEMA, QualityManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import REJECTS_SCHEMA, read_table
from pipeline_config.load import load_config
from tasks.bucket.stage import SPEC as BUCKET_SPEC
from tasks.common.stage import run_stage
from tasks.quality.stage import SPEC
from tests.quality.data import commit_ingest, commit_tags, post, random_posts


def test_quality_stage_end_to_end_then_bucket(tmp_path):
    store = ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")
    rows = random_posts(400) + [post(7, score=None)]
    commit_ingest(store, rows)
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
