"""data_root on object storage: the pipeline against a real S3 API (moto's server on loopback)."""
from __future__ import annotations

import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest

from data_contracts.errors import ConfigError, ContractError, StageError
from data_contracts.ingest import IngestManifest
from data_contracts.manifest import MANIFEST_NAME
from data_contracts.quality import QualityManifest
from data_contracts.store import ArtifactStore, remote_pool
from pipeline_config.load import load_config
from tasks.common.stage import (
    finish_stage,
    plan_shards,
    prepare_stage,
    reopen_stage,
    run_stage,
)
from tasks.registry import stage_spec

STAGES = ["ingest", "dedup", "tag", "quality", "bucket"]
# ~96 posts: ~70 pass the demo's filters, ~60 reach tag (3 shards of 30). Every image crosses the S3 API
# (moto on loopback) several times, so the mini-booru is kept this small; the mini-booru is generated once
# per size (runtime.cache_dir).
SMALL = {"ingest.embedded.posts": 96, "tag.shard_size": 30}


def _cfg(tmp_path, endpoint: str, bucket: str, **extra):
    overrides = {"data_root": f"s3://{bucket}/runs/demo", "runtime.cache_dir": str(tmp_path / "cache"),
                 "runtime.storage_options": {"endpoint_url": endpoint}, **SMALL, **extra}
    return load_config("demo", overrides)


def test_pipeline_on_s3_commits_manifest_last_and_reruns_cached(tmp_path, s3_endpoint, s3_env):
    fs, bucket = s3_env
    cfg = _cfg(tmp_path, s3_endpoint, bucket)
    store = ArtifactStore.for_config(cfg)
    assert not store.is_local
    root = f"{bucket}/runs/demo"
    outs = {s: run_stage(stage_spec(s), cfg, store) for s in ("ingest", "dedup")}
    # Tag as on a cluster: the shards run on "another machine" (its own local cache), the merge here sees
    # their journals only through the object store.
    prepared = prepare_stage(stage_spec("tag"), cfg, store)
    shards = plan_shards(prepared)
    assert len(shards) >= 2
    worker = ArtifactStore(cfg.data_root, tmp_path / "worker-cache", cfg.runtime.storage_options)
    remote_ctx = reopen_stage(stage_spec("tag"), cfg, worker, prepared.ctx.fingerprint).ctx
    assert remote_ctx.work != prepared.ctx.work
    results = [stage_spec("tag").run_shard(remote_ctx, shard) for shard in shards]
    published = fs.find(f"{root}/tag/_work/{prepared.ctx.fingerprint}/journal")
    assert len([k for k in published if k.endswith(".done.json")]) == len(shards)
    assert not [p for p in prepared.ctx.work.rglob("*") if p.is_file()]  # nothing local before the merge
    outs["tag"] = finish_stage(prepared, results)
    outs.update({s: run_stage(stage_spec(s), cfg, store) for s in ("quality", "bucket")})
    for stage, out in outs.items():
        fp = out.manifest.fingerprint
        assert not out.cached and out.output_path == f"s3://{root}/{stage}/{fp}"
        on_s3 = json.loads(fs.cat_file(f"{root}/{stage}/{fp}/{MANIFEST_NAME}"))
        assert on_s3["fingerprint"] == fp
        keys = {k[len(f"{root}/{stage}/{fp}/"):] for k in fs.find(f"{root}/{stage}/{fp}")}
        assert {f["path"] for f in on_s3["files"]} == keys - {MANIFEST_NAME}  # every file listed, sizes below
        sizes = {k[len(f"{root}/{stage}/{fp}/"):]: v["size"] for k, v in fs.find(f"{root}/{stage}/{fp}", detail=True).items()}
        assert all(sizes[f["path"]] == f["size"] for f in on_s3["files"])
        assert json.loads(fs.cat_file(f"{root}/{stage}/CURRENT"))["fingerprint"] == fp
        assert not fs.exists(f"{root}/{stage}/_work/{fp}")  # published shard journals are gone after commit

    # Every post's image is in the pool on S3, byte-for-byte the size the posts table says.
    ingest = store.read_manifest(IngestManifest)
    posts = pq.read_table(store.path(ingest, "posts.parquet"), columns=["image_path", "file_size"]).to_pylist()
    sizes = {k[len(f"{root}/pool/"):]: v["size"] for k, v in fs.find(f"{root}/pool", detail=True).items()}
    assert posts and all(sizes.get(p["image_path"]) == p["file_size"] for p in posts)
    tag_files = {f.path for f in outs["tag"].manifest.files}
    assert "visuals/tag-added.png" in tag_files  # pictures drawn from pool images fetched from S3

    # An output folder without manifest.json is never read, even when CURRENT names it; the next run
    # removes it. A kill between the data files and the manifest leaves exactly that state.
    junk = f"{root}/quality/0123456789abcdef"
    fs.pipe(f"{junk}/quality.parquet", b"half an upload")
    fs.pipe(f"{root}/quality/CURRENT", json.dumps({"fingerprint": "0123456789abcdef"}).encode())
    fresh = ArtifactStore.for_config(cfg)
    assert not fresh.is_complete("quality", "0123456789abcdef") and fresh.current("quality") is None
    with pytest.raises(StageError, match="incomplete"):
        fresh.read_manifest(QualityManifest, "0123456789abcdef")
    with pytest.raises(StageError, match="no output"):
        fresh.read_manifest(QualityManifest)

    # Second run from a machine with nothing local (no pool mirror, no read cache): fully cached.
    tags_before = store.path(outs["tag"].manifest, "tags.parquet").read_bytes()
    for sub in ("pool", "read", "work"):
        shutil.rmtree(tmp_path / "cache" / sub, ignore_errors=True)
    again = {s: run_stage(stage_spec(s), cfg, fresh) for s in STAGES}
    assert all(o.cached for o in again.values())
    assert {s: o.manifest.fingerprint for s, o in again.items()} == {s: o.manifest.fingerprint for s, o in outs.items()}
    assert not fs.exists(junk)  # cleaned by the quality stage's prepare
    assert fresh.current("quality") == outs["quality"].manifest.fingerprint
    assert not (tmp_path / "cache" / "pool").exists() or not any((tmp_path / "cache" / "pool").rglob("*.*"))

    # A tag output whose manifest never arrived is rebuilt (images come back from the S3 pool) to the
    # same bytes; downstream outputs stay cached because the fingerprint is the same.
    fp = outs["tag"].manifest.fingerprint
    fs.rm_file(f"{root}/tag/{fp}/{MANIFEST_NAME}")
    rebuilt = run_stage(stage_spec("tag"), cfg, fresh)
    assert not rebuilt.cached and rebuilt.manifest.fingerprint == fp
    assert fresh.path(rebuilt.manifest, "tags.parquet", verify=True).read_bytes() == tags_before
    assert run_stage(stage_spec("quality"), cfg, fresh).cached


def test_pool_api_on_s3(tmp_path, s3_endpoint, s3_env):
    fs, bucket = s3_env
    store = ArtifactStore(f"s3://{bucket}/p", tmp_path / "cache", {"endpoint_url": s3_endpoint})
    mirror = store.pool_dir()
    assert remote_pool(mirror) is store and remote_pool(tmp_path) is None
    assert str(mirror).startswith(str(tmp_path / "cache"))
    tmp = tmp_path / "x.part"
    tmp.write_bytes(b"0123456789")
    local = store.pool_put(tmp, "images/ab/abc.jpg")
    assert not tmp.exists() and local == mirror / "images/ab/abc.jpg" and local.read_bytes() == b"0123456789"
    assert fs.cat_file(f"{bucket}/p/pool/images/ab/abc.jpg") == b"0123456789"
    assert store.pool_has("images/ab/abc.jpg", 10) and not store.pool_has("images/ab/abc.jpg", 11)
    assert store.pool_url("images/ab/abc.jpg") == f"s3://{bucket}/p/pool/images/ab/abc.jpg"

    other = ArtifactStore(f"s3://{bucket}/p", tmp_path / "other-machine", {"endpoint_url": s3_endpoint})
    assert other.pool_size("images/ab/abc.jpg") == 10  # one listing of the pool
    got = other.pool_get("images/ab/abc.jpg", size=10)
    assert got.read_bytes() == b"0123456789" and got.parent.parent.parent == other.pool_dir()
    with pytest.raises(ContractError, match="expected 99"):
        shutil.rmtree(other.pool_dir() / "images")
        other.pool_get("images/ab/abc.jpg", size=99)
    with pytest.raises(ContractError, match="not in the pool"):
        other.pool_get("images/zz/missing.jpg")
    # pool_fetch leaves files the pool lacks missing (readers report them), fetches the rest.
    folder = other.pool_fetch(["images/ab/abc.jpg", "images/zz/missing.jpg"], [10, None])
    assert (folder / "images/ab/abc.jpg").is_file() and not (folder / "images/zz/missing.jpg").exists()

    # A verified mirror copy that never reached the store (killed between) is published, not refetched.
    (mirror / "images/cd").mkdir(parents=True)
    (mirror / "images/cd/cde.png").write_bytes(b"png!")
    assert store.pool_has("images/cd/cde.png", 4) and fs.cat_file(f"{bucket}/p/pool/images/cd/cde.png") == b"png!"

    # Work files published by one machine are read by another; begin() without resume drops them.
    work = store.begin("tag", "fp1", resume=True)
    (work / "journal").mkdir()
    (work / "journal/a.json").write_text("{}")
    store.work_put("tag", "fp1", "journal/a.json")
    assert other.work_get("tag", "fp1", "journal/a.json").read_text() == "{}"
    assert other.work_get("tag", "fp1", "journal/b.json") is None
    store.begin("tag", "fp1", resume=False)
    assert not fs.exists(f"{bucket}/p/tag/_work/fp1")


def test_credentials_in_storage_options_are_refused():
    with pytest.raises(ConfigError, match="storage_options.secret.*environment") as err:
        load_config("demo", {"runtime.storage_options": {"endpoint_url": "http://x", "secret": "s3cr3t-value"}})
    assert "s3cr3t-value" not in str(err.value)  # the value itself is never echoed
    with pytest.raises(ConfigError, match="client_kwargs.aws_secret_access_key"):
        load_config("demo", {"runtime.storage_options": {"client_kwargs": {"aws_secret_access_key": "s"}}})
    assert load_config("demo", {"runtime.storage_options": {"endpoint_url": "http://x"}}).runtime.storage_options


def test_ingest_and_cache_shards_run_by_another_machine_over_s3(tmp_path, s3_endpoint, s3_env, monkeypatch):
    """Ingest and cache as under a Dask/Ray runner on two machines: the plan and the merge here, every shard
    on "another machine" (its own local cache and pool copy); they meet only through the object store. The
    outputs equal a one-process run on a local root.

    One cache shard races: its first machine is killed after publishing the chunk, before the journal; a
    third machine redoes it with other bytes of the same size (another GPU's rounding); the merging machine
    holds a killed attempt's same-size leftover of that chunk. The output has the third machine's bytes
    under the sha256 its journal gives."""
    fs, bucket = s3_env
    cfg = _cfg(tmp_path, s3_endpoint, bucket, **{"runtime.task_runner": "dask", "ingest.shard_posts": 48})
    store = ArtifactStore.for_config(cfg)
    worker = ArtifactStore(cfg.data_root, tmp_path / "worker-cache", cfg.runtime.storage_options)
    root = f"{bucket}/runs/demo"

    def on_two_machines(stage: str):
        spec = stage_spec(stage)
        prepared = prepare_stage(spec, cfg, store, sharded=True)  # as the flow under its Dask/Ray runner
        shards = plan_shards(prepared)
        assert len(shards) >= 2, stage
        remote = reopen_stage(spec, cfg, worker, prepared.ctx.fingerprint, sharded=True).ctx
        results = [spec.run_shard(remote, shard) for shard in shards]
        if stage == "cache":
            results[0] = race_on_a_third_machine(spec, prepared, shards[0])
        assert not fs.exists(f"{root}/{stage}/{prepared.ctx.fingerprint}")  # nothing committed before the merge
        return finish_stage(prepared, results)

    raced: dict = {}

    def race_on_a_third_machine(spec, prepared, shard):
        from tasks.cache import shards as cache_shards
        from tasks.cache.encode import LatentEncoder

        fp = prepared.ctx.fingerprint
        fs.rm(f"{root}/cache/_work/{fp}/_journal-s{shard['index']:05d}.jsonl")  # killed before the journal put
        cache_shards._STATE.clear()  # a fresh process on the third machine
        encode = LatentEncoder.__call__
        with monkeypatch.context() as m:  # other rounding: same size, other bytes
            m.setattr(LatentEncoder, "__call__", lambda self, x, compiled=True: tuple(
                t + 0.01 if i == 0 else t for i, t in enumerate(encode(self, x, compiled))))
            third = ArtifactStore(cfg.data_root, tmp_path / "third-cache", cfg.runtime.storage_options)
            result = spec.run_shard(reopen_stage(spec, cfg, third, fp, sharded=True).ctx, shard)
        cache_shards._STATE.clear()
        journal = fs.cat_file(f"{root}/cache/_work/{fp}/_journal-s{shard['index']:05d}.jsonl").decode()
        raced.update(json.loads(journal.splitlines()[-1]))
        leftover = prepared.ctx.work / shard["path"]  # the merging machine's own killed attempt, same size
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"x" * raced["bytes"])
        return result

    ingest = on_two_machines("ingest")
    # The files went to the S3 pool from the worker's copy; this machine fetched the pictures' files from there.
    pool_files = lambda cache: {p.name for p in (cache / "pool").rglob("*.*") if ".incoming" not in p.parts}  # noqa: E731
    assert len(pool_files(tmp_path / "worker-cache")) >= ingest.manifest.row_counts["posts"]
    assert 0 < len(pool_files(tmp_path / "cache")) <= ingest.manifest.row_counts["posts"]
    assert any(f.path.startswith("visuals/ingest-character") for f in ingest.manifest.files)
    for stage in ("dedup", "tag", "quality", "bucket"):
        run_stage(stage_spec(stage), cfg, store)
    fetched: list[str] = []  # what the merging machine downloads from the shards' work folder
    real_work_get = store.work_get
    store.work_get = lambda stage, fp, rel, refresh=False: fetched.append(rel) or real_work_get(stage, fp, rel, refresh)
    cache = on_two_machines("cache")
    store.work_get = real_work_get

    local_cfg = load_config("demo", {"data_root": str(tmp_path / "local"), "runtime.cache_dir": str(tmp_path / "cache"),
                                     **SMALL})
    local = ArtifactStore.for_config(local_cfg)
    ref = {s: run_stage(stage_spec(s), local_cfg, local).manifest for s in ("ingest", "dedup", "tag", "quality", "bucket",
                                                                            "cache")}
    assert ingest.manifest.fingerprint == ref["ingest"].fingerprint
    for name in ("posts.parquet", "rejects.parquet"):
        assert store.path(ingest.manifest, name).read_bytes() == local.path(ref["ingest"], name).read_bytes()
    assert cache.manifest.fingerprint == ref["cache"].fingerprint
    got, want = ({c.path: c.sha256 for c in m.chunks} for m in (cache.manifest, ref["cache"]))
    assert got.pop(raced["path"]) == raced["sha256"] != want.pop(raced["path"])  # the third machine's bytes
    assert got == want
    # The shards' chunks never came to this machine: journals only; the commit copied them on the store,
    # and they read back with the sha256 the manifest records (store.path verifies it).
    assert fetched and not [rel for rel in fetched if rel.startswith("chunks/")]
    for chunk in cache.manifest.chunks:  # the bytes are the ones the chunk list (and the reader) expects
        data = store.path(cache.manifest, chunk.path, verify=True).read_bytes()
        assert len(data) == chunk.bytes and hashlib.sha256(data).hexdigest() == chunk.sha256, chunk.path
    assert {f.path for f in cache.manifest.files} >= {c.path for c in cache.manifest.chunks}
    # The decoded-latents sheet read its rows from the chunks in place on the store.
    assert cache.manifest.stats["decode_check_samples"] > 0
    assert cache.manifest.stats["decode_psnr_db"] > cache.manifest.stats["decode_psnr_shuffled_db"]
    cache_rejects = pq.read_table(store.path(cache.manifest, "rejects.parquet"))
    assert cache_rejects.equals(pq.read_table(local.path(ref["cache"], "rejects.parquet")))
    assert not fs.exists(f"{root}/cache/_work/{cache.manifest.fingerprint}")
