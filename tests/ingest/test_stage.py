"""The ingest stage end to end over real HTTP: dedupe, rejects, stats, faults, secrets, embedded mode."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_contracts.errors import ConfigError, StageError
from data_contracts.ingest import POSTS_SCHEMA, REJECTS, IngestManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table
from pipeline_config.ingest import FilterConfig
from pipeline_config.load import load_config
from tasks.common import visuals as v
from tasks.common.stage import run_stage
from tasks.ingest.filters import PostFilter
from tasks.ingest.ledger import Ledger
from tasks.ingest.parse import parse_post
from tasks.ingest.stage import SPEC

FAST_API = {"requests_per_s": 1000, "concurrency": 4, "timeout_s": 5, "max_retries": 3, "backoff_s": 0.01,
            "backoff_max_s": 0.05, "slowdown_s": 0.1, "page_limit": 20,
            "login_env": "BF_TEST_NO_LOGIN", "api_key_env": "BF_TEST_NO_KEY"}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_cfg(root: Path, base_url: str, **ingest):
    tree = {"data_root": str(root / "data"), "runtime": {"cache_dir": str(root / "cache")},
            "ingest": _merge({"api": {**FAST_API, "base_url": base_url}, "verify": {"mode": "thread"},
                              "filters": {"min_width": 0, "min_height": 0}, "min_per_character": 5}, ingest)}
    return load_config(tree)


def run(cfg, **kw):
    store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
    return run_stage(SPEC, cfg, store, **kw), store


def outputs(outcome, store):
    folder = Path(outcome.output_path)
    posts = read_table(folder / "posts.parquet", POSTS_SCHEMA)
    rejects = read_table(folder / "rejects.parquet", REJECTS)
    return posts, rejects, store.pool_dir()


def check_pictures(store, manifest, images: dict[str, str]) -> None:
    """Every picture is a listed file of the committed output (sha256 checked) and a plausible PNG."""
    for caption, rel in images.items():
        img = Image.open(store.path(manifest, rel, verify=True))
        assert img.format == "PNG" and 480 <= img.width <= 1600 and 150 <= img.height <= 4000, (caption, img.size)


def first_tile_matches(png: Path, image: Path) -> bool:
    """The sheet's first thumbnail is this image (below a title of one or two lines)."""
    px = np.asarray(Image.open(png).convert("RGB")).astype(int)
    expected = np.asarray(v.thumbnail(image)).astype(int)
    lh = v.line_height()
    tops = [lines * lh + 2 * v.PAD for lines in (1, 2)]
    return min(np.abs(px[y:y + v.THUMB, v.PAD:v.PAD + v.THUMB] - expected).mean() for y in tops) < 1.0


def expected_split(minibooru, cfg):
    """Independent reading of the booru: which posts pass the filters and why the others do not."""
    flt = PostFilter(cfg.ingest.filters, need_file_url=True)
    ok, why = set(), {}
    for raw in minibooru.load_posts():
        post = parse_post(raw)
        rej = flt.check(post)
        if rej:
            why[post.id] = rej.reason
        else:
            ok.add(post.id)
    return ok, why


def test_api_source_dedupes_across_queries_and_rejects_with_reasons(minibooru, minibooru_server, tmp_path):
    char = "shiraishi_yuki_(hanasaki_gakuen)"
    cfg = make_cfg(tmp_path, minibooru_server.url, queries=[
        {"tags": char, "quota": 1000, "name": "yuki"},
        {"tags": "hanasaki_gakuen", "quota": 1000},
        {"tags": "", "quota": 1000, "name": "everything"},
    ])
    outcome, store = run(cfg)
    posts, rejects, pool = outputs(outcome, store)
    ok, why = expected_split(minibooru, cfg)
    ids = posts.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == ok
    assert len(set(posts.column("md5").to_pylist())) == len(ids)
    assert {r["id"]: r["reason"] for r in rejects.to_pylist()} == why
    assert {"deleted", "banned", "restricted", "unsupported_ext", "excluded_tag"} <= set(why.values())
    # the first query that found a post owns it; later queries count it as a duplicate
    by_id = {r["id"]: r for r in posts.to_pylist()}
    for raw in minibooru.load_posts():
        if raw["id"] in by_id and char in raw["tag_string_character"].split():
            assert by_id[raw["id"]]["query"] == "yuki"
        elif raw["id"] in by_id and "hanasaki_gakuen" in raw["tag_string_copyright"].split():
            assert by_id[raw["id"]]["query"] == "hanasaki_gakuen"
    per_query = {row["query"]: row for row in outcome.manifest.stats["per_query"]}
    n_yuki = sum(1 for r in minibooru.load_posts() if char in r["tag_string_character"].split())
    assert per_query["hanasaki_gakuen"]["duplicates"] == n_yuki
    assert per_query["everything"]["fetched"] == minibooru.n_posts
    # every row's image is verified in the pool
    for row in posts.to_pylist():
        data = (pool / row["image_path"]).read_bytes()
        assert hashlib.md5(data).hexdigest() == row["md5"] and len(data) == row["file_size"]
    # stats and report tables agree with the table
    m: IngestManifest = outcome.manifest
    assert m.source == "danbooru_api" and m.queries == ["yuki", "hanasaki_gakuen", "everything"]
    assert m.row_counts == {"posts": len(ids), "rejects": len(why)}
    assert sum(m.reject_reasons.values()) == len(why)
    assert sum(m.stats["per_rating"].values()) == sum(m.stats["per_year"].values()) == len(ids)
    chars = Counter(c for row in posts.column("tags_character").to_pylist() for c in row)
    assert m.stats["per_character"] == dict(chars)
    tables = outcome.report.tables
    assert set(tables) == {"per_query", "per_character", "per_rating", "per_year", "rejects_by_reason"}
    # the one asked-for character is the one checked against min_per_character
    assert m.stats["characters_below_min"] == ({char: chars[char]} if chars[char] < 5 else {})
    assert all(r["target"] == (r["character"] == char) for r in tables["per_character"])
    assert "verified posts" in outcome.report.summary_md
    assert not (Path(outcome.output_path) / "journal").exists()
    # pictures: a contact sheet per character and per series (the 12 largest), best score first; no reject
    # has an image here (metadata rejects are never downloaded), so no rejects sheet
    images = outcome.report.images
    series = Counter(s for row in posts.column("tags_copyright").to_pylist() for s in row)
    largest = {kind: sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:12]
               for kind, counts in (("character", chars), ("series", series))}
    assert list(images) == [f"{kind}: {tag}" for kind in ("character", "series") for tag, _ in largest[kind]]
    check_pictures(store, m, images)
    tag, n = largest["character"][0]
    assert n <= 24  # all of them on the sheet: the best-scored one is the first tile
    best = max((r for r in posts.to_pylist() if tag in r["tags_character"]), key=lambda r: (r["score"], -r["id"]))
    assert first_tile_matches(store.path(m, images[f"character: {tag}"]), pool / best["image_path"])
    assert "not drawn" not in outcome.report.summary_md


def test_quota_stops_the_crawl_early(minibooru_server, tmp_path):
    cfg = make_cfg(tmp_path, minibooru_server.url, queries=[{"tags": "", "quota": 7}], api={"page_limit": 5})
    outcome, store = run(cfg)
    posts, _, _ = outputs(outcome, store)
    row = outcome.manifest.stats["per_query"][0]
    assert row["taken"] == 7 and row["quota_met"] and posts.num_rows == 7
    assert len(minibooru_server.stats.api_queries) == row["pages"] < 12  # did not walk the whole booru


def test_faults_through_the_stage(minibooru, minibooru_server, tmp_path):
    cfg = make_cfg(tmp_path, minibooru_server.url, queries=[{"tags": "", "quota": 1000}],
                   api={"content_retries": 0, "max_retries": 4, "timeout_s": 2})
    ok, _ = expected_split(minibooru, cfg)
    victims = sorted(ok)[:5]
    f = minibooru_server.faults
    f.truncate_ids, f.wrong_bytes_ids, f.html_error_ids, f.missing_ids = ({victims[0]}, {victims[1]}, {victims[2]},
                                                                            {victims[3]})
    f.restricted_ids = {victims[4]}
    f.rate_limit_burst, f.retry_after_s = 2, 0  # 429s on pages and files: retried
    f.server_error_first_k = 1  # every URL's first request: 503
    outcome, store = run(cfg)
    posts, rejects, pool = outputs(outcome, store)
    reasons = {r["id"]: r["reason"] for r in rejects.to_pylist()}
    assert reasons[victims[0]] == "truncated" and reasons[victims[1]] == "md5_mismatch"
    assert reasons[victims[2]] == "not_an_image" and reasons[victims[3]] == "http_404"
    assert reasons[victims[4]] == "restricted"
    assert set(posts.column("id").to_pylist()) == ok - set(victims)
    assert outcome.manifest.stats["run"]["http"]["http_429"] == 2
    assert minibooru_server.stats.count("posts", 503) >= 1 and minibooru_server.stats.count("original", 503) >= 40


def test_api_key_never_leaks(minibooru, minibooru_server_factory, tmp_path, monkeypatch, caplog):
    key, login = "bf-SECRET-api-key-8d7f6e5a", "alice"
    server = minibooru_server_factory(credentials={login: key})
    with_files = [r["id"] for r in minibooru.load_posts() if r.get("md5") and r["file_ext"] == "jpg"]
    server.faults.html_error_ids = {with_files[0]}
    server.faults.missing_ids = {with_files[1]}
    server.faults.server_error_first_k = 1
    monkeypatch.setenv("BF_LEAK_LOGIN", login)
    monkeypatch.setenv("BF_LEAK_KEY", key)
    api = {"login_env": "BF_LEAK_LOGIN", "api_key_env": "BF_LEAK_KEY"}
    cfg = make_cfg(tmp_path, server.url, queries=[{"tags": "", "quota": 1000}], api=api)
    caplog.set_level(logging.DEBUG)
    outcome, store = run(cfg, log=logging.getLogger("booruflow.ingest"))
    assert {q["user"] for q in server.stats.api_queries} == {login}  # the key was really used
    token = base64.b64encode(f"{login}:{key}".encode()).decode()
    texts = [caplog.text] + [r.getMessage() for r in caplog.records]
    for path in Path(cfg.data_root).rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    assert len(texts) > 4
    assert not any(key in t or token in t for t in texts)
    # a refused key: the error names the variable, never the value
    monkeypatch.setenv("BF_LEAK_KEY", "bf-WRONG-key-0a1b2c3d")
    cfg = make_cfg(tmp_path / "b", server.url, queries=[{"tags": "", "quota": 10}], api=api)
    with pytest.raises(StageError) as err:
        run(cfg)
    assert "bf-WRONG-key-0a1b2c3d" not in str(err.value) and "401" in str(err.value)
    monkeypatch.delenv("BF_LEAK_KEY")
    with pytest.raises(ConfigError, match="BF_LEAK_KEY"):
        run(cfg)


def test_embedded_default_runs_and_is_cached(minibooru, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    # reuse the session's generated booru: same (posts, seed, max_side) -> generate_minibooru returns it
    os.symlink(minibooru.root, cache / f"minibooru-{minibooru.n_posts}-{minibooru.seed}-{minibooru.max_side}")
    cfg = make_cfg(tmp_path, "embedded:minibooru", min_per_character=1000, verify={"mode": "process"},
                   embedded={"posts": minibooru.n_posts, "seed": minibooru.seed, "max_side": minibooru.max_side})
    first, store = run(cfg)
    posts, _, _ = outputs(first, store)
    assert not first.cached and posts.num_rows == len(expected_split(minibooru, cfg)[0])
    assert first.manifest.stats["source"] == "embedded:minibooru"
    assert "below min_per_character (1000)" in first.report.summary_md  # every character warned
    again, _ = run(cfg)
    assert again.cached and again.manifest.fingerprint == first.manifest.fingerprint


def test_empty_queries_need_the_embedded_server(tmp_path):
    cfg = make_cfg(tmp_path, "https://danbooru.donmai.us")
    with pytest.raises(ConfigError, match="queries is empty"):
        run(cfg)


def test_ledger_dedupes_md5_and_replays_after_a_torn_line(tmp_path):
    flt = PostFilter(FilterConfig(min_width=0, min_height=0), need_file_url=True)
    base = {"rating": "g", "image_width": 10, "image_height": 10, "file_ext": "jpg", "file_url": "/x.jpg"}
    raws = [{**base, "id": 3, "md5": "a" * 32}, {**base, "id": 2, "md5": "a" * 32}, {**base, "id": 1, "md5": "b" * 32},
            {**base, "id": 3, "md5": "a" * 32}, {"id": None}]
    ledger = Ledger(tmp_path, 1)
    page, consumed = ledger.select([(0, r) for r in raws], flt, "auto", [10])
    assert [p.id for _, p in page.accepted] == [3, 1] and consumed == 5
    assert [(r[1], r[2]) for r in page.rejects] == [(2, "duplicate_md5"), (0, "parse_error")]
    assert page.duplicates == 1
    ledger.commit(page, q=0, page_param=None, next_cursor="b1", done=False, n=5)
    ledger.close()
    with open(tmp_path / "pages.jsonl", "ab") as fh:
        fh.write(b'{"q": 0, "page": "b1", "acc": [[0, {"id"')  # a kill in the middle of a write
    again = Ledger(tmp_path, 1)
    assert again.queries[0].cursor == "b1" and again.queries[0].accepted == 2 and set(again.pending) == {3, 1}
    assert again.seen_ids == {1, 2, 3} and again.md5_owner == {"a" * 32: 3, "b" * 32: 1}
    again.commit(again.select([], flt, "auto", [10])[0], q=0, page_param="b1", next_cursor="b1", done=True, n=0)
    again.close()
    assert Ledger(tmp_path, 1).queries[0].done  # the torn line was cut, later records are readable


def test_pictures_show_rejects_with_an_image_and_survive_a_failure(minibooru, minibooru_server_factory, tmp_path,
                                                                    monkeypatch, caplog):
    # A re-upload: post `dup` carries the md5 of the newer post `owner`, so it is rejected as duplicate_md5 and
    # its image (the owner's file) is in the pool: the rejects sheet shows it.
    booru = tmp_path / "booru"
    shutil.copytree(minibooru.root, booru)
    ok, _ = expected_split(minibooru, make_cfg(tmp_path, "http://unused"))
    raws = minibooru.load_posts()
    jpgs = [r for r in raws if r["id"] in ok and r["file_ext"] == "jpg"]
    owner, dup = jpgs[-1], jpgs[0]
    lines = [json.dumps(r).replace(dup["md5"], owner["md5"]) if r["id"] == dup["id"] else json.dumps(r) for r in raws]
    (booru / "posts.jsonl").write_text("\n".join(lines) + "\n")
    server = minibooru_server_factory(booru_dir=booru)

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("tasks.ingest.stage.make_series_sheets", broken)
    caplog.set_level(logging.WARNING)
    outcome, store = run(make_cfg(tmp_path, server.url, queries=[{"tags": "", "quota": 1000}]))
    posts, rejects, pool = outputs(outcome, store)
    by_id = {r["id"]: r for r in rejects.to_pylist()}
    assert by_id[dup["id"]]["reason"] == "duplicate_md5" and owner["id"] in posts.column("id").to_pylist()
    images = outcome.report.images
    assert "rejects by reason" in images and images and all(c.startswith(("character: ", "rejects")) for c in images)
    check_pictures(store, outcome.manifest, images)
    owner_path = pool / f"images/{owner['md5'][:2]}/{owner['md5']}.jpg"
    assert first_tile_matches(store.path(outcome.manifest, images["rejects by reason"]), owner_path)
    # the failing series sheets: a warning in the summary and the log, the stage and other pictures stand
    assert "series pictures not drawn: OSError: No space left on device" in outcome.report.summary_md
    assert "series pictures not drawn" in caplog.text
