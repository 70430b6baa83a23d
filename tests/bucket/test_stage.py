"""The bucket stage end to end on committed ingest + quality outputs (real Parquet, real manifests)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from data_contracts.bucket import BUCKETS_SCHEMA, BucketManifest
from data_contracts.errors import ContractError, StageError
from data_contracts.quality import QUALITY_SCHEMA, QualityManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import REJECTS_SCHEMA, read_table
from pipeline_config.load import load_config
from tasks.bucket.stage import SPEC
from tasks.common.stage import run_stage
from tests.bucket.test_core import KOHYA_512
from tests.quality.data import commit_ingest, post, random_posts
from tests.stage_helpers import commit_output


def _commit_quality(store, ids, fp=None):
    table = pa.table({"id": ids, "year": [2020] * len(ids), "norm_score": [0.5] * len(ids),
                      "label": ["good score"] * len(ids), "cluster": [2] * len(ids)})
    return commit_output(store, QualityManifest, {"quality.parquet": (table, QUALITY_SCHEMA)},
                         fields={"method": "kmeans", "label_counts": {"good score": len(ids)}}, fingerprint=fp)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")


def test_bucket_stage_end_to_end(store):
    rows = random_posts(300) + [post(1, width=100, height=120), post(2, width=None, height=None)]
    commit_ingest(store, rows)
    ids = [r["id"] for r in rows if r["id"] != 1000] + [999_999]  # 1000 not a survivor; 999999 unknown
    _commit_quality(store, ids)
    cfg = load_config({"bucket": {"batch_size": 6, "world_size": 2, "crop": "random", "flip_prob": 0.5}})

    out = run_stage(SPEC, cfg, store)
    m = store.read_manifest(BucketManifest)
    assert [tuple(b) for b in m.buckets] == KOHYA_512
    table = read_table(store.path(m, "buckets.parquet", verify=True), BUCKETS_SCHEMA)
    assert table.num_rows == 299 == m.row_counts["buckets"] == sum(m.bucket_counts.values())
    assert all(n >= 12 for n in m.bucket_counts.values())
    assert 1000 not in table.column("id").to_pylist()
    for r in table.to_pylist():
        assert f"{r['bucket_w']}x{r['bucket_h']}" in m.bucket_counts
        assert 0 <= r["crop_left"] and r["crop_right"] <= r["resize_w"] and r["crop_right"] - r["crop_left"] == r["bucket_w"]
        assert 0 <= r["crop_top"] and r["crop_bottom"] <= r["resize_h"] and r["crop_bottom"] - r["crop_top"] == r["bucket_h"]
    rejects = {r["id"]: r["reason"] for r in read_table(store.path(m, "rejects.parquet"), REJECTS_SCHEMA).to_pylist()}
    assert rejects == {1: "too_small", 2: "bad_size", 999_999: "no_metadata"}
    assert m.stats["reject_reasons"] == {"bad_size": 1, "no_metadata": 1, "too_small": 1}
    hist = out.report.tables["bucket-aspect-histogram"]
    assert sum(r["count"] for r in hist) == 299
    bucket_rows = out.report.tables["bucket-table"]
    assert len(bucket_rows) == 17 and sum(r["count"] for r in bucket_rows) == 299
    assert sum(r["assigned"] for r in bucket_rows) == 299
    png = store.path(m, out.report.images["aspect-ratio histogram"], verify=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = run_stage(SPEC, cfg, store)
    assert again.cached
    same = read_table(store.path(again.manifest, "buckets.parquet"), BUCKETS_SCHEMA)
    forced = run_stage(SPEC, cfg, store, force=True)
    assert not forced.cached
    assert read_table(store.path(forced.manifest, "buckets.parquet"), BUCKETS_SCHEMA).equals(same)


def test_bucket_stage_merges_small_buckets_reported_in_manifest(store):
    rows = [post(i, width=1000, height=1000) for i in range(1, 31)]
    rows += [post(i, width=1100, height=850) for i in range(31, 34)]  # 3 near 576x448
    commit_ingest(store, rows)
    _commit_quality(store, [r["id"] for r in rows])
    out = run_stage(SPEC, load_config({"bucket": {"min_bucket_samples": 8}}), store)
    assert out.manifest.bucket_counts == {"512x512": 33}
    assert out.manifest.stats["merged"] == {"576x448": "512x512"}
    row = next(r for r in out.report.tables["bucket-table"] if r["bucket"] == "576x448")
    assert row["assigned"] == 3 and row["count"] == 0 and row["merged_into"] == "512x512"


def test_no_sample_left_stops_with_advice(store):
    commit_ingest(store, [post(1, width=100, height=100)])
    _commit_quality(store, [1])
    with pytest.raises(StageError, match="min_image_side"):
        run_stage(SPEC, load_config({}), store)


def test_quality_output_without_its_table_is_a_contract_error(store):
    commit_ingest(store, [post(1)])
    commit_output(store, QualityManifest, {}, fields={"method": "kmeans"})
    with pytest.raises(ContractError, match="quality.parquet"):
        run_stage(SPEC, load_config({}), store)
