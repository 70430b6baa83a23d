"""The bucket stage end to end on committed ingest + quality outputs (real Parquet, real manifests)."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from data_contracts.bucket import BUCKETS_SCHEMA, BucketManifest
from data_contracts.errors import ContractError, StageError
from data_contracts.quality import QUALITY_SCHEMA, QualityManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import REJECTS_SCHEMA, read_table
from pipeline_config.load import load_config
from tasks.bucket.stage import SPEC
from tasks.common.stage import run_stage
from tasks.common.visuals import BOX
from tests.bucket.test_core import KOHYA_512
from tests.quality.data import commit_ingest, post, random_posts
from tests.quality.test_stage import check_pictures, colour, ids_shown, write_pool_images
from tests.stage_helpers import commit_output


def _commit_quality(store, ids, fp=None):
    table = pa.table({"id": ids, "year": [2020] * len(ids), "norm_score": [0.5] * len(ids),
                      "label": ["good score"] * len(ids), "cluster": [2] * len(ids)})
    return commit_output(store, QualityManifest, {"quality.parquet": (table, QUALITY_SCHEMA)},
                         fields={"method": "kmeans", "label_counts": {"good score": len(ids)}}, fingerprint=fp)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def assert_crop_drawn(px: np.ndarray, rgb: tuple[int, int, int], row: dict) -> None:
    """In a flat-colour post's preview, the undimmed pixels fill the crop box (inside its 2-px outline)."""
    kept = (np.abs(px - rgb).max(-1) <= 3)
    dimmed = (np.abs(px - np.rint(np.asarray(rgb) * 0.45)).max(-1) <= 3)
    x0, y0, x1, y1 = _bbox(kept | dimmed)
    near = np.zeros_like(kept)
    near[max(0, y0 - 3):y1 + 4, max(0, x0 - 3):x1 + 4] = True
    ix0, iy0, ix1, iy1 = _bbox(kept | dimmed | (near & (np.abs(px - BOX).max(-1) <= 3)))  # the whole resized image
    sx, sy = (ix1 - ix0 + 1) / row["resize_w"], (iy1 - iy0 + 1) / row["resize_h"]
    kx0, ky0, kx1, ky1 = _bbox(kept)
    expect = (ix0 + row["crop_left"] * sx + 2, iy0 + row["crop_top"] * sy + 2,
              ix0 + row["crop_right"] * sx - 3, iy0 + row["crop_bottom"] * sy - 3)
    assert np.allclose((kx0, ky0, kx1, ky1), expect, atol=1.5), (row, (kx0, ky0, kx1, ky1), expect)


TREE = {"bucket": {"batch_size": 6, "world_size": 2, "crop": "random", "flip_prob": 0.5}}


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")


def test_bucket_stage_end_to_end(store):
    rows = random_posts(300) + [post(1, width=100, height=120), post(2, width=None, height=None)]
    commit_ingest(store, rows)
    write_pool_images(store, rows)
    ids = [r["id"] for r in rows if r["id"] != 1000] + [999_999]  # 1000 not a survivor; 999999 unknown
    _commit_quality(store, ids)
    cfg = load_config(TREE)

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
    # pictures: the histogram and one crop-box sheet per bucket (the 12 fullest), each showing only that
    # bucket's posts, with the crop box outlined
    pictures = check_pictures(store, m, out.report.images)
    assert pictures.pop("aspect-ratio histogram").size == (700, 300)
    fullest = sorted(m.bucket_counts.items(), key=lambda kv: (-kv[1], [int(v) for v in kv[0].split("x")]))[:12]
    assert list(pictures) == [f"bucket {name}" for name, _ in fullest]
    bucket_of = {r["id"]: f"{r['bucket_w']}x{r['bucket_h']}" for r in table.to_pylist()}
    for name, count in fullest:
        png = store.path(m, out.report.images[f"bucket {name}"])
        shown = ids_shown(png, bucket_of, min_px=150)
        assert {bucket_of[i] for i in shown} == {name} and len(shown) == min(16, count), name
        px = np.asarray(Image.open(png).convert("RGB")).astype(int)
        assert (np.abs(px - BOX).max(-1) < 30).sum() >= 4 * 100 * min(16, count), name  # >= 100 box px a tile
    assert "not drawn" not in out.report.summary_md
    first = f"bucket {fullest[0][0]}"  # more samples than a sheet holds: the seed picks which
    assert fullest[0][1] > 16
    sheet = store.path(m, out.report.images[first]).read_bytes()
    shown = ids_shown(store.path(m, out.report.images[first]), bucket_of, min_px=150)
    px = np.asarray(Image.open(store.path(m, out.report.images[first])).convert("RGB")).astype(int)
    by_id = {r["id"]: r for r in table.to_pylist()}
    for i in shown:  # the box sits where buckets.parquet says this post is cropped (random crop)
        assert_crop_drawn(px, colour(i), by_id[i])

    again = run_stage(SPEC, cfg, store)
    assert again.cached and again.report.images == out.report.images
    same = read_table(store.path(again.manifest, "buckets.parquet"), BUCKETS_SCHEMA)
    forced = run_stage(SPEC, cfg, store, force=True)
    assert not forced.cached
    assert read_table(store.path(forced.manifest, "buckets.parquet"), BUCKETS_SCHEMA).equals(same)
    assert store.path(forced.manifest, out.report.images[first]).read_bytes() == sheet  # same seed, same bytes
    reseeded = run_stage(SPEC, load_config({**TREE, "seed": 1}), store, force=True)
    other = ids_shown(store.path(reseeded.manifest, reseeded.report.images[first]), bucket_of, min_px=150)
    assert len(other) == len(shown) and other != shown


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


def test_a_failing_picture_is_a_warning_not_a_failure(store, monkeypatch, caplog):
    rows = random_posts(100)
    commit_ingest(store, rows)
    write_pool_images(store, rows)
    _commit_quality(store, [r["id"] for r in rows])

    def broken(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr("tasks.bucket.stage.make_bucket_sheets", broken)
    caplog.set_level(logging.WARNING)
    out = run_stage(SPEC, load_config({}), store)
    assert out.manifest.row_counts["buckets"] == 100
    assert "bucket sheets pictures not drawn: MemoryError: cannot allocate" in out.report.summary_md
    assert "bucket sheets pictures not drawn" in caplog.text
    assert list(out.report.images) == ["aspect-ratio histogram"]
    check_pictures(store, out.manifest, out.report.images)
