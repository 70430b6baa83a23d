"""`fm run ingest --update` against a real mini-booru server on loopback, edited between two runs as Danbooru's users
edit posts (uploads, retags into and out of a query, an excluded tag, a rating change, a deletion, a ban, an
expunge): the update equals a from-scratch crawl of the new state, asks only for the new pages and the re-check,
downloads no file twice, survives kill -9, and says in its manifest what it extends and what changed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from data_contracts.errors import ConfigError
from data_contracts.ingest import IngestManifest
from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config
from tasks.common.stage import compute_fingerprint
from tasks.ingest.stage import SPEC
from tests.ingest.test_stage import make_cfg, run

REPO = Path(__file__).resolve().parents[2]
SERIES = "hanasaki_gakuen"
QUERIES = [{"tags": SERIES, "quota": 1000}, {"tags": "", "quota": 1000, "name": "all"}]
RECENT = 8  # the newest base posts that fall in the re-check window (crawled again in full)


def _created(post: dict) -> datetime:
    return datetime.fromisoformat(post["created_at"])


def _tables(outcome) -> tuple:
    folder = Path(outcome.output_path)
    return pq.read_table(folder / "posts.parquet"), pq.read_table(folder / "rejects.parquet")


def _cfg(root: Path, url: str, enabled: bool, recheck_days: float, queries=QUERIES, **ingest):
    settings = {"enabled": enabled, "recheck_days": recheck_days, **ingest.pop("update", {})}
    return make_cfg(root, url, queries=queries, update=settings, **ingest)


def _visible(posts: list[dict]) -> list[dict]:
    """Posts a crawl takes (a file, not deleted or banned, a kept type, no excluded tag)."""
    return [p for p in posts if p.get("md5") and not p["is_deleted"] and not p["is_banned"]
            and p["file_ext"] in ("jpg", "png", "webp") and "comic" not in p["tag_string"].split()]


def _has(post: dict, tag: str) -> bool:
    return tag in post["tag_string"].split()


class Scenario:
    """One server of its own (the edits stay in its memory), a base crawl, the edits, and a from-scratch crawl of
    the edited state: the table an update of the base must reproduce."""

    def __init__(self, booru, tmp: Path, edit, queries=QUERIES, **ingest) -> None:
        from minibooru import serve_minibooru

        self.server = serve_minibooru(booru.root)
        self.tmp, self.queries, self.ingest = tmp, queries, ingest
        posts = sorted(booru.load_posts(), key=lambda p: p["id"])
        self.recent = posts[-RECENT:]
        self.recheck_days = (datetime.now(timezone.utc) - _created(self.recent[0])).total_seconds() / 86400 + 0.01
        base_cfg = self.cfg(tmp / "base", enabled=False)
        self.base, _ = run(base_cfg)
        self.base_hits = set(self.server.stats.file_hits)
        self.base_root = Path(base_cfg.data_root)
        old = [p for p in _visible(posts) if p not in self.recent]
        self.edits = edit(self.server, old, [p for p in _visible(posts) if p in self.recent], tmp)
        self.scratch, _ = run(self.cfg(tmp / "scratch", enabled=False))
        self.expected = _tables(self.scratch)
        self.server.reset_stats()

    def cfg(self, root: Path, enabled: bool = True, **more):
        return _cfg(root, self.server.url, enabled, self.recheck_days, self.queries, **{**self.ingest, **more})

    def update_root(self, name: str) -> Path:
        """A copy of the base crawl's data root (its output, CURRENT and pool) to update."""
        root = self.tmp / name
        shutil.copytree(self.base_root, root / "data")
        return root

    def update(self, name: str, **more):
        """Update a copy of the base; returns (outcome, store)."""
        self.server.reset_stats()
        return run(self.cfg(self.update_root(name), **more))

    def close(self) -> None:
        self.server.stop()


def _uploads(server, tmp: Path, n: int, seed: int, tag: str | None = None, tagged: int = 1) -> list[int]:
    from minibooru.edits import fresh_posts

    ids = server.upload(fresh_posts(tmp / f"fresh-{seed}", n, seed=seed, max_side=256))
    for post_id in ids[:tagged] if tag else []:
        server.retag(post_id, add=[tag])  # edited after its upload, as uploaders do
    return ids


def _everyday_edits(server, old: list[dict], recent: list[dict], tmp: Path) -> dict:
    """Uploads, an old post retagged into the series, one given an excluded tag, a rating change, a deletion, a ban,
    and among the recent uploads an expunge and a retag out of the series."""
    in_series = [p for p in old if _has(p, SERIES)]
    outside = [p for p in old if not _has(p, SERIES)]
    out_of_series = next(p for p in recent if _has(p, SERIES))
    edits = {"into_series": outside[0]["id"], "comic": outside[1]["id"], "deleted": in_series[0]["id"],
             "rating": in_series[1]["id"], "banned": outside[2]["id"],
             "expunged": next(p for p in recent if p is not out_of_series)["id"], "out_of_series": out_of_series["id"]}
    server.retag(edits["into_series"], add=[SERIES])
    server.retag(edits["comic"], add=["comic"])
    server.delete(edits["deleted"])
    server.retag(edits["rating"], rating="e" if server.post(edits["rating"])["rating"] != "e" else "g")
    server.ban(edits["banned"])
    server.expunge(edits["expunged"])
    server.retag(edits["out_of_series"], remove=[SERIES])
    edits["uploads"] = _uploads(server, tmp, 8, seed=11, tag=SERIES)
    return edits


@pytest.fixture(scope="module")
def scenario(minibooru, tmp_path_factory):
    s = Scenario(minibooru, tmp_path_factory.mktemp("update"), _everyday_edits)
    yield s
    s.close()


def test_update_equals_a_from_scratch_crawl_and_asks_only_for_what_is_new(scenario):
    s = scenario
    root = s.update_root("equal")
    cfg = s.cfg(root)
    out, store = run(cfg)
    posts, rejects = _tables(out)
    exp_posts, exp_rejects = s.expected
    assert posts.equals(exp_posts), "posts.parquet differs from a from-scratch crawl of the new state"
    assert rejects.equals(exp_rejects), "rejects.parquet differs from a from-scratch crawl of the new state"

    # a new output, extending the base, with a fingerprint of its own
    manifest: IngestManifest = out.manifest
    assert manifest.fingerprint not in (s.base.manifest.fingerprint, s.scratch.manifest.fingerprint)
    assert store.current("ingest") == manifest.fingerprint
    record = manifest.update_record()
    assert record.extends == s.base.manifest.fingerprint == record.lineage
    assert manifest.lineage() == s.base.manifest.fingerprint
    assert record.snapshot == manifest.stats["snapshot"] and record.complete
    series, everything = record.queries[SERIES], record.queries["all"]
    reasons = record.removed_reasons
    assert {"deleted", "banned", "excluded_tag", "gone", "other_query"} <= set(reasons), reasons
    assert series.removed.get("deleted") == 1 and series.removed.get("other_query") == 1  # retagged out -> "all"
    assert everything.removed.get("other_query") == 1  # retagged into the series: the first query takes it
    assert series.added >= 2 and everything.added >= 1 and series.changed >= 1  # uploads, retag in, rating
    assert record.images["downloaded"] == len([u for u in s.edits["uploads"] if u in set(posts["id"].to_pylist())])

    # only the new pages and the re-check: a<id> walks, order:change pages, id: batches; never a crawl from page 1
    asked = list(s.server.stats.api_queries)
    walks = [q for q in asked if q["page"].startswith("a")]
    changes = [q for q in asked if "order:change" in q["tags"]]
    by_id = [q for q in asked if " id:" in f" {q['tags']}"]
    assert len(walks) + len(changes) + len(by_id) == len(asked), asked
    assert walks and changes and not [q for q in asked if q["page"].startswith("b")]
    assert sum(record.requests.values()) == len(asked)
    # no file fetched twice: the update downloaded only files the base never had
    fetched = set(s.server.stats.file_hits)
    assert fetched and not fetched & s.base_hits and fetched <= set(s.edits["uploads"])

    # a second update right away: nothing added or removed, nothing downloaded, it extends the first
    s.server.reset_stats()
    again, _ = run(cfg)
    assert again.manifest.fingerprint != manifest.fingerprint
    second = again.manifest.update_record()
    assert second.extends == manifest.fingerprint and second.lineage == s.base.manifest.fingerprint
    assert not second.removed_reasons and all(q.added == 0 for q in second.queries.values())
    assert not s.server.stats.file_hits and _tables(again)[0].equals(exp_posts)


def test_sharded_update_downloads_only_new_files_on_the_workers(scenario):
    """Under Dask/Ray the requests and the selection run before the shards; kept posts are not in any shard."""
    s = scenario
    s.server.reset_stats()
    out, _ = run(s.cfg(s.update_root("sharded"), shard_posts=3), sharded=True)
    posts, rejects = _tables(out)
    assert posts.equals(s.expected[0]) and rejects.equals(s.expected[1])
    assert set(s.server.stats.file_hits) <= set(s.edits["uploads"])
    record = out.manifest.update_record()
    assert out.manifest.stats["run"]["shards"]["count"] == -(-record.images["downloaded"] // 3)  # new files only
    assert record.images["reused"] + record.images["downloaded"] == posts.num_rows


def _old_removals(server, old: list[dict], recent: list[dict], tmp: Path) -> dict:
    """What order:change cannot show: an old post retagged out of the series, an old post expunged."""
    out_of_series = next(p for p in old if _has(p, SERIES))["id"]
    expunged = next(p for p in old if not _has(p, SERIES))["id"]
    server.retag(out_of_series, remove=[SERIES])
    server.expunge(expunged)
    return {"out_of_series": out_of_series, "expunged": expunged, "uploads": _uploads(server, tmp, 3, seed=12)}


def test_older_removals_are_found_by_id_with_recheck_known_or_without_room_for_order(minibooru, tmp_path):
    """tag_limit 1 leaves the series query no room for order:change: its known posts are re-fetched by id (the
    retag out is seen); recheck_known re-fetches the older posts of the tagless query too (the expunge is seen)."""
    s = Scenario(minibooru, tmp_path, _old_removals, api={"tag_limit": 1}, update={"recheck_known": True})
    try:
        out, _ = s.update("u")
        posts, rejects = _tables(out)
        assert posts.equals(s.expected[0]) and rejects.equals(s.expected[1])
        record = out.manifest.update_record()
        assert record.queries[SERIES].removed == {"other_query": 1} and record.queries["all"].removed == {"gone": 1}
        assert record.recheck_known and not record.complete and "no room for order:change" in record.notes[0]
        asked = list(s.server.stats.api_queries)
        assert not [q for q in asked if "order:change" in q["tags"] and SERIES in q["tags"]]
        assert [q for q in asked if q["tags"].startswith(f"{SERIES} id:")] and [q for q in asked
                                                                                 if q["tags"].startswith("id:")]
        # without recheck_known the tagless query cannot see the old expunge: kept, and the manifest says how
        plain, _ = s.update("v", update={"recheck_known": False})
        assert s.edits["expunged"] in set(_tables(plain)[0]["id"].to_pylist())
        assert not plain.manifest.update_record().recheck_known
    finally:
        s.close()


QUOTA_QUERIES = [{"tags": SERIES, "quota": 6}, {"tags": "starlit_stage", "quota": 4}, {"tags": "", "name": "all"}]


def _quota_edits(server, old: list[dict], recent: list[dict], tmp: Path) -> dict:
    """The series loses two of the posts its quota had taken (it must reach further down); starlit_stage gets two
    uploads (its quota then leaves its oldest taken posts to the later query)."""
    taken = [p for p in sorted(old + recent, key=lambda p: -p["id"]) if _has(p, SERIES)][:6]
    for post in taken[1:3]:
        server.delete(post["id"])
    return {"deleted": [p["id"] for p in taken[1:3]],
            "uploads": _uploads(server, tmp, 2, seed=13, tag="starlit_stage", tagged=2)}


def test_quotas_reach_further_down_and_offer_what_they_leave_to_later_queries(minibooru, tmp_path):
    # recheck_days 0: only the posts above each query's newest known one are walked again; pages of 5: the change
    # walk stops at its first page, so the series must walk on below what it knew (page=b<id>)
    s = Scenario(minibooru, tmp_path, _quota_edits, queries=QUOTA_QUERIES, update={"recheck_days": 0},
                 api={"page_limit": 5})
    try:
        out, _ = s.update("u")
        posts, rejects = _tables(out)
        assert posts.equals(s.expected[0]) and rejects.equals(s.expected[1])
        record = out.manifest.update_record()
        assert record.requests.get("older", 0) >= 1 and record.requests.get("offer", 0) >= 1, record.requests
        assert record.queries["starlit_stage"].removed.get("other_query", 0) >= 1  # left to "all"
        per_query = {row["query"]: row for row in out.manifest.stats["per_query"]}
        assert per_query[SERIES]["posts"] == 6 and per_query["starlit_stage"]["posts"] == 4
    finally:
        s.close()


def test_cli_and_deployments_take_update(monkeypatch, tmp_path):
    import inspect

    from flows import cli
    from flows.fm import fm, run_overrides

    args = cli.build_parser().parse_args(["run", "ingest", "--update", "-o", "seed=3"])
    assert args.update and args.stages == ["ingest"]
    assert run_overrides(args.override, args.update) == ["seed=3", "ingest.update.enabled=true"]
    assert run_overrides(None, False) == []
    assert load_config("demo", run_overrides([], True)).ingest.update.enabled
    assert inspect.signature(fm.fn).parameters["update"].default is False  # -p update=true on every deployment
    assert cli.main(["run", "tag", "--update", "--no-preflight", "-o", f"data_root={tmp_path}"]) == 2


def test_tag_after_an_update_keeps_the_rows_of_unchanged_posts(scenario, tmp_path, monkeypatch):
    """tag on the base, then on the update (dedup keeping every post): the tagger sees only the posts whose image or Danbooru tags are
    new, and the rows equal those of the same tag run without anything to reuse (tag_weight included: it is
    recomputed over every row; probabilities up to float noise)."""
    from tasks.common.stage import run_stage
    from tasks.tag import core as tag_core
    from tasks.tag.stage import SPEC as TAG
    from tasks.tag.tiny import LABELS_FILE, write_tagger_folder

    s = scenario
    tagger = write_tagger_folder(tmp_path / "tagger", LABELS_FILE, seed=0, with_onnx=False)  # no export: faster
    tag = load_config({"tag": {"model": str(tagger), "backend": "torch", "shard_size": 16, "batch_size": 8,
                               "device": "cpu"}}).tag
    tagged: list[int] = []
    real = tag_core.tag_shard
    monkeypatch.setattr("tasks.tag.stage.tag_shard",
                        lambda posts, *a, **k: (tagged.extend(posts["id"].to_pylist()), real(posts, *a, **k))[1])
    root = s.update_root("tagged")
    outs = {}
    for enabled in (False, True):  # the base, then the update
        cfg = s.cfg(root, enabled=enabled).model_copy(update={"tag": tag})
        store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
        tagged.clear()
        ingest = run_stage(SPEC, cfg, store)
        outs[enabled] = [ingest, _keep_all(store, ingest.manifest), run_stage(TAG, cfg, store)]
    ingest, _, out = outs[True]
    assert ingest.manifest.update_record() is not None
    _status(s.cfg(root, enabled=False), store, update=ingest.manifest)
    rows = pq.read_table(Path(out.output_path) / "tags.parquet")
    assert set(tagged) <= set(s.edits["uploads"]) and 0 < len(tagged) < rows.num_rows
    assert out.manifest.stats["reused_rows"] == {"rows": rows.num_rows - len(tagged),
                                                 "from": outs[False][2].manifest.fingerprint}
    # the reference: the same tag output built again with nothing to reuse (the base's tag output gone)
    shutil.rmtree(outs[False][2].output_path)
    tagged.clear()
    again = run_stage(TAG, cfg, store, force=True)
    assert len(tagged) == rows.num_rows and "reused_rows" not in again.manifest.stats
    _same_rows(rows, pq.read_table(Path(again.output_path) / "tags.parquet"))


def test_cache_after_an_update_encodes_only_new_images(scenario, tmp_path):
    """The data stages on the base, then on the update (dedup keeping every post): the cache stage encodes only the
    samples whose image or geometry is new, keeps the other latents of the base's cache output, and writes the
    chunks a cache run without anything to reuse writes, byte for byte; `cache.reuse: false` encodes everything."""
    from tasks.common.stage import run_stage
    from tasks.registry import stage_spec
    from tasks.tag.tiny import LABELS_FILE, write_tagger_folder

    s = scenario
    tagger = write_tagger_folder(tmp_path / "tagger", LABELS_FILE, seed=0, with_onnx=False)
    demo = load_config("demo")
    sections = {"tag": load_config({"tag": {"model": str(tagger), "backend": "torch", "shard_size": 64,
                                            "device": "cpu"}}).tag,
                "quality": demo.quality, "bucket": demo.bucket, "cache": demo.cache}
    root = s.update_root("cached")
    outs = {}
    for enabled in (False, True):  # the base, then the update
        cfg = s.cfg(root, enabled=enabled).model_copy(update=sections)
        store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
        ingest = run_stage(SPEC, cfg, store)
        _keep_all(store, ingest.manifest)
        outs[enabled] = {stage: run_stage(stage_spec(stage), cfg, store) for stage in ("tag", "quality", "bucket",
                                                                                         "cache")}
    base, out = outs[False]["cache"], outs[True]["cache"]
    rows, stats = out.manifest.row_counts["chunks"], out.manifest.stats
    assert stats["reused_latents"]["from"] == base.manifest.fingerprint
    reused = stats["reused_latents"]["rows"]
    assert 0 < stats["images_this_run"] < rows and reused + stats["images_this_run"] == rows
    assert stats["images_this_run"] <= len(s.edits["uploads"])  # the uploads; every other image and crop unchanged
    # the reference: the same output built again with reuse off (every image encoded)
    kept = _latents(Path(out.output_path))
    off = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"reuse": False})})
    again = run_stage(stage_spec("cache"), off, store, force=True)
    assert again.manifest.fingerprint == out.manifest.fingerprint  # reuse is not part of the fingerprint
    assert again.manifest.stats["images_this_run"] == rows and "reused_latents" not in again.manifest.stats
    fresh = _latents(Path(again.output_path))
    assert sorted(fresh) == sorted(kept)  # the same samples in the same chunks; the latents equal up to the
    for key, value in fresh.items():  # VAE's batch-to-batch rounding (an fp16 ulp; tests/cache/test_stage.py)
        assert np.abs(kept[key] - value).max() <= 2e-3 * max(1.0, np.abs(value).max()), key


def _latents(folder: Path) -> dict:
    """(chunk path, id) -> latent mean (float32) of every row of a cache output."""
    found = {}
    for part in sorted(folder.glob("chunks/*/*.parquet")):
        for row in pq.read_table(part, columns=["id", "latent_mean"]).to_pylist():
            found[(str(part.relative_to(folder)), row["id"])] = np.frombuffer(row["latent_mean"], np.float16).astype(
                np.float32)
    return found


def _status(plain, store: ArtifactStore, update: IngestManifest) -> None:
    """`fm status` counts an update of the config's crawl as complete."""
    from flows.cli import stage_status

    row = next(r for r in stage_status(plain, store) if r["stage"] == "ingest")
    assert row["state"] == "complete" and row["fingerprint"] == update.fingerprint and "an update" in row["note"]


def test_a_run_without_update_takes_the_newest_snapshot_and_force_crawls_from_scratch(scenario, caplog):
    """After an update, a run without --update uses it (not the older from-scratch crawl), so the later stages see
    the newest data; --force crawls the config from scratch again, and that crawl is then the newest."""
    s = scenario
    update, store = s.update("follow")
    plain = s.cfg(s.tmp / "follow", enabled=False)
    base = store.read_manifest(IngestManifest, update.manifest.update_record().lineage)
    assert base.fingerprint == s.base.manifest.fingerprint
    store.set_current("ingest", base.fingerprint)  # as after a run of the stages before the update
    with caplog.at_level("INFO"):
        again, _ = run(plain)
    assert again.cached and again.manifest.fingerprint == update.manifest.fingerprint
    assert store.current("ingest") == update.manifest.fingerprint
    assert any("newest snapshot" in r.getMessage() and update.manifest.fingerprint in r.getMessage()
               for r in caplog.records)
    s.server.reset_stats()
    forced, _ = run(plain, force=True)
    assert not forced.cached and forced.manifest.fingerprint == base.fingerprint
    assert _tables(forced)[0].equals(s.expected[0])  # the edited server's state, crawled from scratch
    assert run(plain)[0].manifest.fingerprint == base.fingerprint  # the re-crawl is now the newest snapshot


def _keep_all(store: ArtifactStore, ingest: IngestManifest):
    """A dedup output that keeps every post (the real stage hashes every image again; not what is tested here)."""
    import pyarrow as pa

    from data_contracts.dedup import DEDUP_SCHEMA, DedupManifest
    from tests.stage_helpers import commit_output

    ids = pq.read_table(store.path(ingest, "posts.parquet"), columns=["id"])["id"].to_pylist()
    table = pa.Table.from_pylist([{"id": i, "phash": None, "group_id": i, "group_size": 1, "kept": True,
                                   "distance": None} for i in ids], schema=DEDUP_SCHEMA)
    return commit_output(store, DedupManifest, {"dedup.parquet": (table, DEDUP_SCHEMA)},
                         upstream={"ingest": ingest.fingerprint}, fingerprint=f"keep-{ingest.fingerprint}")


def _same_rows(got, want) -> None:
    """Equal tag rows: tags, rating and weights exactly; probabilities to float noise (a backend need not give the
    same last bits for an image in another batch)."""
    assert got.column_names == want.column_names and got["id"].equals(want["id"])
    for name in ("general", "character", "rating", "tag_weight"):
        assert got[name].equals(want[name]), name
    for a, b in zip(got.to_pylist(), want.to_pylist()):
        assert a["rating_probs"] == pytest.approx(b["rating_probs"], abs=1e-6)
        for key in ("added", "disputed"):
            assert [d["tag"] for d in a[key]] == [d["tag"] for d in b[key]]
            assert [d["prob"] for d in a[key]] == pytest.approx([d["prob"] for d in b[key]], abs=1e-6)


def test_update_without_an_earlier_output_is_the_from_scratch_crawl(scenario, tmp_path):
    out, _ = run(scenario.cfg(tmp_path))
    assert out.manifest.fingerprint == scenario.scratch.manifest.fingerprint  # same config: same output key
    assert out.manifest.update_record() is None
    assert _tables(out)[0].equals(scenario.expected[0])


CHILD = """
import json, sys
from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config
from tasks.common.stage import run_stage
from tasks.ingest.stage import SPEC
cfg = load_config(json.loads(sys.argv[1]))
out = run_stage(SPEC, cfg, ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir))
print(json.dumps({"fingerprint": out.manifest.fingerprint}))
"""


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _downloaded(journal: Path, ids: bool = False):
    """The posts whose file a (killed) update downloaded: journaled outcomes with fetched bytes."""
    path = journal / "downloads.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    done = {rec["id"] for rec in (json.loads(line) for line in lines if line.endswith("}")) if rec.get("bytes")}
    return done if ids else len(done)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the update ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    psutil.wait_procs(workers, timeout=10)


def test_kill_9_during_the_update_then_rerun_gives_the_same_output(scenario):
    s = scenario
    root = s.update_root("killed")
    cfg = s.cfg(root)
    fingerprint = compute_fingerprint(SPEC, cfg, {})
    journal = Path(cfg.data_root) / "ingest" / "_work" / fingerprint / "journal"
    script = root / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    s.server.faults.api_delay_s = 0.1
    s.server.faults.slow_ids = set(s.edits["uploads"])
    s.server.faults.delay_s = 0.3
    s.server.reset_stats()
    try:
        for ready in (lambda: _lines(journal / "refresh.jsonl") >= 2,  # during the requests
                      lambda: _downloaded(journal) >= 1):  # during the downloads, one of them done
            proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg.model_dump(mode="json"))], cwd=REPO,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _kill_when(proc, ready)
        done_before = _downloaded(journal, ids=True)
        assert done_before and _lines(journal / "downloads.jsonl") > len(done_before)  # kept posts: no download
        hits_before = dict(s.server.stats.file_hits)
    finally:
        s.server.faults.api_delay_s, s.server.faults.slow_ids = 0.0, set()
    out, _ = run(cfg)
    assert out.manifest.fingerprint == fingerprint  # the same update resumed, not a new one
    posts, rejects = _tables(out)
    assert posts.equals(s.expected[0]) and rejects.equals(s.expected[1])
    again = {i: n - hits_before.get(i, 0) for i, n in s.server.stats.file_hits.items()}
    assert not [i for i in done_before if again.get(i)], "a finished download was fetched again"
    assert out.manifest.stats["run"]["attempts"] == 3


def test_bad_update_settings_are_clear_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.update\.recheck_days"):
        load_config("demo", ["ingest.update.recheck_days=-1"])
    with pytest.raises(ConfigError, match=r"ingest\.update\.overlap_hours"):
        load_config("demo", ["ingest.update.overlap_hours=soon"])
    with pytest.raises(ConfigError, match=r"update\.enabled.*needs source danbooru_api"):
        load_config("demo", ["ingest.update.enabled=true", "ingest.source=danbooru_dump"])
    with pytest.raises(ConfigError, match="did you mean 'recheck_days'"):
        load_config("demo", ["ingest.update.recheck_day=3"])


def test_update_settings_stay_out_of_the_from_scratch_fingerprint(tmp_path):
    plain = load_config({"data_root": str(tmp_path / "d")})
    tuned = load_config({"data_root": str(tmp_path / "d"), "ingest": {"update": {"recheck_days": 3}}})
    assert compute_fingerprint(SPEC, plain, {}) == compute_fingerprint(SPEC, tuned, {})
    assert "update" not in plain.ingest.fingerprint_dict()
    store = ArtifactStore(str(tmp_path / "d"), local_cache=tmp_path / "c")
    assert store.current("ingest") is None
