"""The dedup stage on a committed ingest output: real pictures and their edits, real Parquet, real hashing
processes; then the tag stage sees only the kept posts."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts.dedup import DEDUP_SCHEMA, DedupManifest
from data_contracts.ingest import POSTS_SCHEMA, IngestManifest
from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config
from tasks.common.journal import read_records
from tasks.common.stage import prepare_stage, run_stage
from tasks.dedup import stage as dedup_stage
from tests.dedup.images import crop, encode, hue_shift, scene_image
from tests.stage_helpers import commit_output

# post id -> (picture seed, edit, score, parent_id): 1001 a re-encode of 1000 with a higher score (it is kept),
# 1002 a colour variant of 1000 whose parent is 1000, 1003 a 3 % crop of 1000; 1004-1007 distinct pictures;
# 1008 is not an image, 1009 is missing from the pool.
POSTS = {
    1000: (11, None, 10, None),
    1001: (11, "jpeg70", 25, None),
    1002: (11, "hue", 5, 1000),
    1003: (11, "crop", 3, None),
    1004: (12, None, 8, None),
    1005: (13, None, 8, None),
    1006: (14, None, 8, None),
    1007: (15, None, 8, None),
    1008: (None, "broken", 1, None),
    1009: (16, "missing", 1, None),
}


def _bytes(seed: int | None, edit: str | None) -> bytes:
    if edit == "broken":
        return b"<html>503 Service Unavailable</html>"
    img = scene_image(seed, 640, 800)
    if edit == "jpeg70":
        return encode(img, "JPEG", 70)
    if edit == "hue":
        return encode(hue_shift(img, 90), "PNG")
    if edit == "crop":
        return encode(crop(img, 0.03, "r"), "JPEG", 92)
    return encode(img, "PNG")


def _ingest(store: ArtifactStore) -> IngestManifest:
    pool = store.pool_dir()
    (pool / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for post_id, (seed, edit, score, parent) in POSTS.items():
        rel = f"images/{post_id}.png"
        data = _bytes(seed, edit) if edit != "missing" else b""
        if edit != "missing":
            (pool / rel).write_bytes(data)
        rows.append({"id": post_id, "md5": f"{post_id:032x}", "created_at": datetime(2024, 1, 1, tzinfo=timezone.utc),
                     "score": score, "up_score": score, "down_score": 0, "fav_count": 1, "rating": "g", "width": 640,
                     "height": 800, "file_ext": "png", "file_size": len(data), "source": "", "parent_id": parent,
                     "tags_general": ["solo"], "tags_character": ["hatsune_miku"], "tags_copyright": ["vocaloid"],
                     "tags_artist": ["artist_a"], "tags_meta": [], "image_path": rel, "query": "x"})
    table = pa.Table.from_pylist(rows, schema=POSTS_SCHEMA)
    return commit_output(store, IngestManifest, {"posts.parquet": (table, POSTS_SCHEMA)},
                         fields={"source": "danbooru_api", "queries": ["x"]})


def _cfg(tmp_path, **dedup):
    return load_config({"data_root": str(tmp_path / "data"), "runtime": {"cache_dir": str(tmp_path / "cache")},
                        "dedup": {"workers": 2, **dedup}})


@pytest.fixture()
def env(tmp_path):
    store = ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "cache")
    return store, _ingest(store)


def _rows(store, manifest) -> dict[int, dict]:
    table = pq.read_table(store.path(manifest, "dedup.parquet"))
    assert table.schema.equals(DEDUP_SCHEMA, check_metadata=False)
    return {r["id"]: r for r in table.to_pylist()}


def test_groups_keep_the_best_post_and_reject_the_rest(env, tmp_path):
    store, ingest = env
    out = run_stage(dedup_stage.SPEC, _cfg(tmp_path), store)
    manifest = out.manifest
    assert isinstance(manifest, DedupManifest) and manifest.upstream == {"ingest": ingest.fingerprint}
    rows = _rows(store, manifest)
    group = {i for i, r in rows.items() if r["group_id"] == 1001}
    assert group == {1000, 1001, 1002, 1003}  # the re-encode, the colour variant (parent link) and the crop
    assert rows[1001]["kept"] and rows[1001]["distance"] == 0  # highest score of its group
    assert not any(rows[i]["kept"] for i in (1000, 1002, 1003))
    assert all(rows[i]["group_size"] == 4 for i in group)
    assert all(rows[i]["kept"] and rows[i]["group_size"] == 1 for i in (1004, 1005, 1006, 1007))
    # not hashable: kept (tag and cache judge the file), no hash, counted by reason
    assert rows[1008]["kept"] and rows[1008]["phash"] is None and rows[1009]["phash"] is None
    assert manifest.stats["not_hashed"] == {"undecodable_image": 1, "image_missing": 1}
    rejects = {r["id"]: r for r in pq.read_table(store.path(manifest, "rejects.parquet")).to_pylist()}
    assert set(rejects) == {1000, 1002, 1003}
    assert all(r["reason"] == "near_duplicate" and "of post 1001" in r["detail"] for r in rejects.values())
    assert manifest.groups == 1 and manifest.duplicates == 3 and manifest.max_distance == 6
    assert manifest.stats["kept"] == 7
    # the Prefect UI's pictures: the group sheet and the distance histogram, real PNGs
    assert set(out.report.images) == {"near-duplicate groups", "near-duplicate pair distances"}
    for rel in out.report.images.values():
        assert store.path(manifest, rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 near-duplicate groups" in out.report.summary_md and "could not be hashed" in out.report.summary_md
    assert not (store.path(manifest, "dedup.parquet").parent / dedup_stage.HASH_JOURNAL).exists()
    assert run_stage(dedup_stage.SPEC, _cfg(tmp_path), store).cached


def test_max_distance_zero_and_disabled(env, tmp_path):
    store, _ = env
    strict = _rows(store, run_stage(dedup_stage.SPEC, _cfg(tmp_path, max_distance=0, parent_distance=0),
                                    store).manifest)
    dropped = [r for r in strict.values() if not r["kept"]]
    assert all(r["distance"] == 0 for r in dropped)  # only hash-equal pictures (a re-encode often is)
    assert len(dropped) < 3 and strict[1002]["kept"]  # the colour variant is 1+ bits away: kept without its link
    off = run_stage(dedup_stage.SPEC, _cfg(tmp_path, enabled=False), store)
    rows = _rows(store, off.manifest)
    assert all(r["kept"] and r["phash"] is None for r in rows.values()) and off.manifest.duplicates == 0
    assert "disabled" in off.report.summary_md


def test_a_killed_run_hashes_only_the_blocks_it_had_not_journaled(env, tmp_path, monkeypatch):
    store, _ = env
    monkeypatch.setattr(dedup_stage, "HASH_BLOCK", 4)
    cfg = _cfg(tmp_path)
    calls: list[int] = []
    real = dedup_stage.hash_files

    def dying(paths, **kwargs):
        calls.append(len(paths))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while hashing the second block")
        return real(paths, **kwargs)

    monkeypatch.setattr(dedup_stage, "hash_files", dying)
    with pytest.raises(KeyboardInterrupt):
        run_stage(dedup_stage.SPEC, cfg, store)
    work = prepare_stage(dedup_stage.SPEC, cfg, store).ctx.work
    journaled = list(read_records(work / dedup_stage.HASH_JOURNAL))
    assert [r["start"] for r in journaled] == [0]
    with open(work / dedup_stage.HASH_JOURNAL, "a") as fh:
        fh.write('{"start": 4, "first_id": 10')  # a record torn by the kill
    calls.clear()
    monkeypatch.setattr(dedup_stage, "hash_files", lambda paths, **kw: calls.append(len(paths)) or real(paths, **kw))
    resumed = run_stage(dedup_stage.SPEC, cfg, store).manifest
    assert calls == [4, 2]  # blocks 4-7 and 8-9 only
    fresh_root = tmp_path / "fresh"
    fresh = ArtifactStore(str(fresh_root / "data"), local_cache=fresh_root / "cache")
    _ingest(fresh)
    whole = run_stage(dedup_stage.SPEC, _cfg(fresh_root), fresh).manifest
    assert store.path(resumed, "dedup.parquet").read_bytes() == fresh.path(whole, "dedup.parquet").read_bytes()


def test_tag_sees_only_the_kept_posts(env, tmp_path):
    from tasks.tag import stage as tag_stage
    from tasks.tag.tiny import write_tagger_folder
    from tests.tag.conftest import REAL_CSV

    store, _ = env
    folder = write_tagger_folder(tmp_path / "tagger", REAL_CSV, seed=0)
    cfg = load_config({"data_root": str(tmp_path / "data"), "runtime": {"cache_dir": str(tmp_path / "cache")},
                       "dedup": {"workers": 2}, "tag": {"model": str(folder)}})
    run_stage(dedup_stage.SPEC, cfg, store)
    tag = run_stage(tag_stage.SPEC, cfg, store).manifest
    tagged = set(pq.read_table(store.path(tag, "tags.parquet"), columns=["id"]).column("id").to_pylist())
    rejected = {r["id"]: r["reason"] for r in pq.read_table(store.path(tag, "rejects.parquet")).to_pylist()}
    assert tagged == {1001, 1004, 1005, 1006, 1007}
    assert rejected == {1008: "undecodable_image", 1009: "image_missing"}  # the same reason codes as dedup counted


def test_the_config_refuses_a_parent_distance_below_max_distance():
    with pytest.raises(Exception, match="parent_distance"):
        load_config({"dedup": {"max_distance": 8, "parent_distance": 4}})
    assert json.loads(load_config({}).dedup.model_dump_json())["max_distance"] == 6


def test_an_update_decodes_only_new_files_and_equals_a_fresh_run(env, tmp_path, monkeypatch):
    """After an ingest update, hashes of files an earlier dedup output hashed are reused (the pool path holds the
    md5); a post whose image changed has a new file and is hashed again; the output equals a fresh store's."""
    store, _ = env
    run_stage(dedup_stage.SPEC, _cfg(tmp_path), store)  # the dedup of the first crawl

    def updated(target: ArtifactStore) -> IngestManifest:
        first = _ingest(target)  # the same pool files (a fresh store needs them too)
        posts = pq.read_table(target.path(first, "posts.parquet")).to_pylist()
        posts = [p for p in posts if p["id"] != 1005]  # deleted on Danbooru
        pool = target.pool_dir()
        for post_id, seed in ((1004, 18), (1010, 17)):  # 1004 replaced by another picture, 1010 uploaded
            data = encode(scene_image(seed, 640, 800), "PNG")
            rel = f"images/{post_id}-{seed}.png"
            (pool / rel).write_bytes(data)
            row = dict(next(p for p in posts if p["id"] == 1004), id=post_id, image_path=rel, file_size=len(data))
            posts = [p for p in posts if p["id"] != post_id] + [row]
        table = pa.Table.from_pylist(sorted(posts, key=lambda p: p["id"]), schema=POSTS_SCHEMA)
        return commit_output(target, IngestManifest, {"posts.parquet": (table, POSTS_SCHEMA)},
                             fields={"source": "danbooru_api", "queries": ["x"]}, fingerprint="update1")

    updated(store)
    calls: list[list[str]] = []
    real = dedup_stage.hash_files
    monkeypatch.setattr(dedup_stage, "hash_files", lambda paths, **kw: calls.append(list(paths)) or real(paths, **kw))
    again = run_stage(dedup_stage.SPEC, _cfg(tmp_path), store).manifest
    decoded = sorted(p.rsplit("/", 1)[-1] for c in calls for p in c)
    # the two new files, and the two the first run could not hash (broken, missing): nothing it hashed
    assert decoded == ["1004-18.png", "1008.png", "1009.png", "1010-17.png"]
    fresh_root = tmp_path / "fresh"
    fresh = ArtifactStore(str(fresh_root / "data"), local_cache=fresh_root / "cache")
    updated(fresh)
    monkeypatch.setattr(dedup_stage, "hash_files", real)
    whole = run_stage(dedup_stage.SPEC, _cfg(fresh_root), fresh).manifest
    assert store.path(again, "dedup.parquet").read_bytes() == fresh.path(whole, "dedup.parquet").read_bytes()
