"""The danbooru_dump source equals the danbooru_api source on the same posts (JSONL+folder, Parquet+tar)."""
from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest

from data_contracts.errors import ConfigError
from tasks.ingest.dump_reader import iter_records, metadata_files
from minibooru import serve_minibooru, write_dump
from tests.ingest.test_stage import make_cfg, outputs, run

QUERIES = [{"tags": "shiraishi_yuki_(hanasaki_gakuen)", "quota": 1000, "name": "yuki"},
           {"tags": "hanasaki_gakuen -comic", "quota": 1000}, {"tags": "rating:g,s", "quota": 1000}]


@pytest.fixture(scope="module")
def api_result(minibooru, tmp_path_factory):
    with serve_minibooru(minibooru.root) as server:
        cfg = make_cfg(tmp_path_factory.mktemp("api"), server.url, queries=QUERIES)
        outcome, store = run(cfg)
    return outputs(outcome, store), outcome


def _sorted(table):
    return table.take(pc.sort_indices(table, sort_keys=[("id", "ascending")]))


def _pool_files(pool: Path) -> dict[str, int]:
    return {p.relative_to(pool).as_posix(): p.stat().st_size for p in (pool / "images").rglob("*")
            if p.is_file() and ".incoming" not in p.parts}


@pytest.mark.parametrize("fmt,images", [("jsonl", "folder"), ("parquet", "tar")])
def test_dump_equals_api(minibooru, api_result, tmp_path, fmt, images):
    (api_posts, api_rejects, api_pool), api_outcome = api_result
    dump = write_dump(minibooru.root, tmp_path / "dump", fmt=fmt, images=images, shard_size=16)
    cfg = make_cfg(tmp_path, "embedded:minibooru", source="danbooru_dump", queries=QUERIES,
                   dump={"posts_path": str(dump)})
    outcome, store = run(cfg)
    posts, rejects, pool = outputs(outcome, store)
    assert posts.num_rows == api_posts.num_rows > 20
    assert _sorted(posts).equals(_sorted(api_posts))  # every column, the owning query included
    as_set = lambda t: {(r["id"], r["reason"], r["query"]) for r in t.to_pylist()}  # noqa: E731
    assert as_set(rejects) == as_set(api_rejects)
    assert _pool_files(pool) == _pool_files(api_pool)
    assert outcome.manifest.source == "danbooru_dump"
    assert outcome.manifest.stats["per_character"] == api_outcome.manifest.stats["per_character"]
    per_q = lambda o: [(r["query"], r["taken"], r["posts"]) for r in o.manifest.stats["per_query"]]  # noqa: E731
    assert per_q(outcome) == per_q(api_outcome)


def test_dump_missing_and_corrupt_images_are_rejects(minibooru, tmp_path):
    dump = write_dump(minibooru.root, tmp_path / "dump", fmt="jsonl", images="folder")
    files = sorted((dump / "images").glob("*.jpg"))
    files[0].unlink()
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])
    cfg = make_cfg(tmp_path, "embedded:minibooru", source="danbooru_dump",
                   dump={"posts_path": str(dump / "metadata"), "images_path": str(dump / "images")})
    outcome, store = run(cfg)
    _, rejects, _ = outputs(outcome, store)
    by_reason = {}
    for r in rejects.to_pylist():
        by_reason.setdefault(r["reason"], set()).add(r["detail"])
    assert "missing_image" in by_reason and "truncated" in by_reason
    assert outcome.manifest.row_counts["posts"] > 0


def test_dump_config_errors(tmp_path):
    cfg = make_cfg(tmp_path, "embedded:minibooru", source="danbooru_dump")
    with pytest.raises(ConfigError, match="posts_path is not set"):
        run(cfg)
    cfg = make_cfg(tmp_path, "embedded:minibooru", source="danbooru_dump", dump={"posts_path": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match="does not exist"):
        run(cfg)


def test_reader_streams_every_format(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n\n{"id": 2}\nnot json\n')
    (tmp_path / "b.json").write_text('{"posts": [{"id": 3}]}')
    files, root = metadata_files(make_cfg(tmp_path, "embedded:minibooru").ingest.dump.model_copy(
        update={"posts_path": str(tmp_path)}))
    assert [f.name for f in files] == ["a.jsonl", "b.json"] and root == tmp_path
    records = list(iter_records(files))
    assert [r.get("id") for r in records] == [1, 2, None, 3]  # the unreadable line becomes a parse_error reject
