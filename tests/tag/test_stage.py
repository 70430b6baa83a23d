"""The tag stage end to end on a committed ingest output (real Parquet, real images, real ONNX Runtime)."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_contracts.errors import StageError
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.store import ArtifactStore
from data_contracts.tag import TAGS_SCHEMA, TagManifest
from pipeline_config.load import load_config
from tasks.common.stage import run_stage
from tasks.dedup import stage as dedup_stage
from tasks.tag import core as tag_core
from tasks.tag import stage as tag_stage
from tests.stage_helpers import commit_output

CHARS = ["hatsune_miku"] * 5 + ["kagamine_rin"] * 2 + ["rare_girl"] + [[]] * 0
ARTISTS = ["artist_a"] * 6 + ["artist_b", "artist_c"]


def _image_bytes(kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.integers(0, 256, (1, 1, 3)) + rng.normal(0, 30, (96, 72, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "png":
        Image.fromarray(np.dstack([arr, np.full(arr.shape[:2], 200, np.uint8)]), "RGBA").save(buf, "PNG")
    elif kind == "webp":
        Image.fromarray(arr).save(buf, "WEBP", quality=90)
    else:
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _ingest(store: ArtifactStore, n_good: int = 8) -> IngestManifest:
    pool = store.pool_dir()
    rows = []
    kinds = ["jpg", "png", "webp"]
    for i in range(n_good + 3):
        post_id = 1000 + i
        kind = kinds[i % 3]
        rel = f"images/{post_id}.{kind}"
        (pool / "images").mkdir(parents=True, exist_ok=True)
        data = _image_bytes(kind, i)
        if i == n_good:        # truncated JPEG
            data = _image_bytes("jpg", i)[:300]
            rel = f"images/{post_id}.jpg"
        elif i == n_good + 1:  # not an image
            data = b"<html>503 Service Unavailable</html>"
        if i != n_good + 2:    # the last one is missing from the pool
            (pool / rel).write_bytes(data)
        char = CHARS[i] if i < len(CHARS) else "hatsune_miku"
        rows.append({
            "id": post_id, "md5": f"{post_id:032x}", "created_at": datetime(2024, 1, 1, tzinfo=timezone.utc),
            "score": 10, "up_score": 10, "down_score": 0, "fav_count": 5, "rating": "g", "width": 72,
            "height": 96, "file_ext": kind, "file_size": len(data), "source": "", "parent_id": None,
            "tags_general": ["solo", "twintails", "blue_hair", "not_a_wd_tag"],
            "tags_character": [char], "tags_copyright": ["vocaloid"],
            "tags_artist": [ARTISTS[i] if i < len(ARTISTS) else "artist_a"], "tags_meta": ["highres"],
            "image_path": rel, "query": "vocaloid",
        })
    table = pa.Table.from_pylist(rows, schema=POSTS_SCHEMA)
    return commit_output(store, IngestManifest, {"posts.parquet": (table, POSTS_SCHEMA)},
                         fields={"source": "danbooru_api", "queries": ["vocaloid"]})


@pytest.fixture()
def env(tmp_path, tiny_folder):
    store = ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")
    ingest = _ingest(store)
    cfg = load_config({"data_root": str(tmp_path / "data"), "runtime": {"cache_dir": str(tmp_path / "cache")},
                       "tag": {"model": str(tiny_folder), "shard_size": 4, "batch_size": 3,
                               "blacklist": ["twintails"]}})
    run_stage(dedup_stage.SPEC, cfg, store)  # tag reads the posts dedup kept (here: all: distinct noise images)
    return store, ingest, cfg


def test_stage_end_to_end(env, tiny_folder):
    store, ingest, cfg = env
    out = run_stage(tag_stage.SPEC, cfg, store)
    manifest = out.manifest
    assert isinstance(manifest, TagManifest) and manifest.upstream["ingest"] == ingest.fingerprint and set(manifest.upstream) == {"ingest", "dedup"}
    assert manifest.backend == "onnx"  # CPU + model.onnx present -> ONNX Runtime
    from data_contracts.fingerprint import sha256_file
    assert manifest.model_identity == sha256_file(str(tiny_folder / "model.onnx"))
    assert manifest.thresholds["general"] == 0.35 and manifest.thresholds["character"] == 0.85
    assert manifest.row_counts == {"tags": 8, "rejects": 3}
    assert {f.path for f in manifest.files} == {"tags.parquet", "rejects.parquet", "summary.json", "report.json",
                                                "visuals/tag-added.png", "visuals/tag-disputed.png"}

    tags = pq.read_table(store.path(manifest, "tags.parquet"))
    assert tags.schema.equals(TAGS_SCHEMA)
    assert tags["id"].to_pylist() == list(range(1000, 1008))
    w = np.array(tags["tag_weight"].to_pylist())
    assert w.mean() == pytest.approx(1.0, abs=1e-6) and w.min() >= 0.5 and w.max() <= 2.0
    by_id = {r["id"]: r for r in tags.to_pylist()}
    assert by_id[1007]["tag_weight"] > by_id[1000]["tag_weight"]  # rare_girl + artist_c beat miku + artist_a
    row = by_id[1000]
    assert row["general"][:3] == ["solo", "blue_hair", "not_a_wd_tag"]  # Danbooru kept, blacklist gone
    assert "twintails" not in row["general"]
    assert "1girl" in row["general"] and "1girl" in {a["tag"] for a in row["added"]}
    assert row["character"] == ["hatsune_miku"]
    assert row["rating"] in ("general", "sensitive", "questionable", "explicit")
    assert len(row["rating_probs"]) == 4 and not {"general", "sensitive"} & set(row["general"])
    assert "not_a_wd_tag" not in {d["tag"] for d in row["disputed"]}

    rejects = pq.read_table(store.path(manifest, "rejects.parquet")).to_pylist()
    assert [(r["id"], r["reason"]) for r in rejects] == [
        (1008, "truncated_image"), (1009, "undecodable_image"), (1010, "image_missing")]
    assert rejects[2]["detail"] == "images/1010.png does not exist"  # pool-relative, like the cache stage's
    assert not [r for r in rejects if str(store.pool_dir()) in r["detail"]], rejects

    report = out.report
    assert "8 images tagged, 3 rejected" in report.summary_md
    for name in ("weight_histogram", "top_weight_concepts", "bottom_weight_concepts", "top_added_tags",
                 "rating_counts", "reject_reasons"):
        assert report.tables[name], name
    assert report.tables["top_weight_concepts"][0]["concept"] in ("rare_girl", "artist_b", "artist_c")
    assert not (store.work_dir("tag", manifest.fingerprint)).exists()

    again = run_stage(tag_stage.SPEC, cfg, store)  # same fingerprint: cached
    assert again.cached and again.manifest.fingerprint == manifest.fingerprint


def test_torch_backend_gives_the_same_tags(env):
    store, _, cfg = env
    onnx = run_stage(tag_stage.SPEC, cfg, store).manifest
    cfg_t = cfg.model_copy(update={"tag": cfg.tag.model_copy(update={"backend": "torch"})})
    torch_m = run_stage(tag_stage.SPEC, cfg_t, store).manifest
    assert torch_m.backend == "torch" and torch_m.fingerprint != onnx.fingerprint
    a = pq.read_table(store.path(onnx, "tags.parquet")).to_pylist()
    b = pq.read_table(store.path(torch_m, "tags.parquet")).to_pylist()
    assert [(r["general"], r["character"], r["rating"]) for r in a] == [(r["general"], r["character"], r["rating"]) for r in b]
    np.testing.assert_allclose([r["rating_probs"] for r in a], [r["rating_probs"] for r in b], atol=1e-5)


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_a_deleted_pool_image_is_rejected_as_image_missing_by_its_pool_path(env, monkeypatch, pipeline):
    """Both pipelines (the GPU one runs on the CPU here) write the cache stage's reason code and name the
    image by its pool-relative path, never this machine's pool folder."""
    import torch

    from tasks.tag.gpu_pipeline import run_pipeline

    store, _, cfg = env
    pool = store.pool_dir()
    (pool / "images" / "1003.jpg").unlink()  # a complete JPEG: the GPU path would decode it in a batch
    if pipeline == "gpu":
        def gpu_on_cpu(folder, cfg, items, backend):
            def predict(x: torch.Tensor) -> torch.Tensor:  # RGB NCHW 0-255 -> the backend's uint8 NHWC input
                return torch.from_numpy(backend.predict(x.permute(0, 2, 3, 1).to(torch.uint8).numpy()))
            return run_pipeline(items, predict, backend.input_size, "cpu", batch_size=cfg.batch_size, workers=2)

        monkeypatch.setattr(tag_core, "tag_batches", gpu_on_cpu)
    out = run_stage(tag_stage.SPEC, cfg, store)
    rejects = {r["id"]: r for r in pq.read_table(store.path(out.manifest, "rejects.parquet")).to_pylist()}
    assert set(rejects) == {1003, 1008, 1009, 1010}
    for pid, ext in ((1003, "jpg"), (1010, "png")):
        assert rejects[pid]["reason"] == "image_missing"
        assert rejects[pid]["detail"] == f"images/{pid}.{ext} does not exist"
    for r in rejects.values():
        assert str(pool) not in r["detail"] and not r["detail"].startswith("/"), r


def test_killed_run_resumes_from_the_journal(env, monkeypatch):
    store, _, cfg = env
    calls = []
    real = tag_stage.tag_shard

    def dying(posts, *args, **kwargs):
        calls.append(posts["id"][0].as_py())
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(posts, *args, **kwargs)

    monkeypatch.setattr(tag_stage, "tag_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tag_stage.SPEC, cfg, store)
    assert calls == [1000, 1004]
    calls.clear()
    monkeypatch.setattr(tag_stage, "tag_shard", lambda posts, *a, **k: (calls.append(posts["id"][0].as_py()),
                                                                        real(posts, *a, **k))[1])
    out = run_stage(tag_stage.SPEC, cfg, store)
    assert calls == [1004, 1008]  # shard 0 came from the journal
    assert out.manifest.row_counts == {"tags": 8, "rejects": 3}


def test_no_taggable_image_is_a_stage_error(tmp_path, tiny_folder):
    store = ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")
    _ingest(store, n_good=0)
    cfg = load_config({"data_root": str(tmp_path / "data"), "runtime": {"cache_dir": str(tmp_path / "cache")},
                       "tag": {"model": str(tiny_folder)}})
    run_stage(dedup_stage.SPEC, cfg, store)
    with pytest.raises(StageError, match="no image could be tagged"):
        run_stage(tag_stage.SPEC, cfg, store)
