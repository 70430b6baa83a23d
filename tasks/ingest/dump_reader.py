"""The `danbooru_dump` source: post records from JSON Lines / Parquet, images from a folder or tar shards.

Metadata: `dump.posts_path` is a file (.jsonl, .jsonl.gz, .json list, .parquet) or a folder. A folder with a
`dump.json` marker (packages/minibooru/minibooru/dump.py layout, also what people build from danbooru2023) lists
its metadata files and image shards; any other folder is read as every metadata file in it, by name.
Images: `dump.images_path` (default: the dump's `images/` folder, else its `*.tar` shards):
- a folder holding `<md5>.<ext>`, `<md5[:2]>/<md5>.<ext>`, `<md5[:2]>/<md5[2:4]>/<md5>.<ext>`, `<id>.<ext>` or
  Danbooru2021's `<0id%1000>/<id>.<ext>`;
- or `.tar` shards whose members are named `<id>.<ext>` or `<md5>.<ext>` (any folder inside the tar).

Records are read in file order in batches; each batch is selected (same parse, dedupe and filters as the
API source; `queries` match with the server's tag-search semantics, a post going to the first query in
config order that matches and still has quota), journaled, then its images are copied into the pool with
the same verification as downloads. Resume: the journal keeps the record offset of the last batch.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow.parquet as pq

from data_contracts.errors import ConfigError
from pipeline_config.ingest import DumpConfig, IngestConfig
from tasks.ingest.download import (
    Outcome,
    clean_incoming,
    commit_to_pool,
    image_relpath,
    outcome_json,
    pool_has,
    temp_path,
)
from tasks.ingest.filters import PostFilter
from tasks.ingest.ledger import Ledger
from tasks.ingest.parse import Post, parse_post
from tasks.ingest.verify import verify_file
from tasks.ingest.tag_query import parse_tags

BATCH = 1000
CHUNK = 1 << 20
META_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")
DUMP_MARKER = "dump.json"
_MD5 = re.compile(r"^[0-9a-f]{32}$")


# --- metadata -----------------------------------------------------------------------------------------


def metadata_files(cfg: DumpConfig) -> tuple[list[Path], Path | None]:
    """(metadata files in read order, the dump root folder if any)."""
    if not cfg.posts_path:
        raise ConfigError("ingest.dump.posts_path is not set; point it at a JSON Lines/Parquet file or a dump folder")
    path = Path(cfg.posts_path).expanduser()
    if not path.exists():
        raise ConfigError(f"ingest.dump.posts_path {str(path)!r} does not exist")
    if path.is_file():
        return [path], path.parent
    marker = path / DUMP_MARKER
    if marker.exists():
        meta = json.loads(marker.read_text())
        return [path / rel for rel in meta.get("metadata", [])], path
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(META_SUFFIXES))
    if not files:
        raise ConfigError(f"ingest.dump.posts_path {str(path)!r} holds no {', '.join(META_SUFFIXES)} files")
    return files, path


def iter_records(files: list[Path]) -> Iterator[Any]:
    """Every post record, in file order (streamed; Parquet by row batches)."""
    for path in files:
        name = path.name
        if name.endswith(".parquet"):
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=BATCH):
                yield from batch.to_pylist()
        elif name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, Mapping) and isinstance(data.get("posts"), list):
                data = data["posts"]
            yield from (data if isinstance(data, list) else [data])
        else:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield {"_unreadable": line[:80]}  # becomes a parse_error reject, the run goes on


# --- query matching -------------------------------------------------------------------------------------


def compile_queries(tags_list: list[str]) -> list[Callable[[Post, Mapping[str, Any]], bool]]:
    """Danbooru tag-search semantics (tasks/ingest/tag_query.py, the parser the local server uses too), applied
    to parsed posts."""
    import fnmatch

    matchers = []
    for text in tags_list:
        q = parse_tags(text)

        def match(post: Post, raw: Mapping[str, Any], q=q) -> bool:
            tags = set(post.all_tags())

            def has(tag: str) -> bool:
                return any(fnmatch.fnmatchcase(t, tag) for t in tags) if "*" in tag else tag in tags

            if not all(has(t) for t in q.include) or any(has(t) for t in q.exclude):
                return False
            if q.any_of and not any(has(t) for t in q.any_of):
                return False
            if q.preds:
                view = _api_view(post, raw)
                try:
                    return all(pred(view) for pred in q.preds)
                except (KeyError, TypeError, ValueError):
                    return False
            return True

        matchers.append(match)
    return matchers


def _api_view(post: Post, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The record with normalised values under API names (what the search predicates read)."""
    created = raw.get("created_at")
    return {
        **raw, "id": post.id, "rating": post.rating, "score": post.score, "fav_count": post.fav_count,
        "image_width": post.width, "image_height": post.height, "md5": post.md5, "file_ext": post.file_ext,
        "is_deleted": post.is_deleted, "is_banned": post.is_banned, "is_pending": post.is_pending,
        "is_flagged": post.is_flagged, "parent_id": post.parent_id,
        "has_children": bool(raw.get("has_children")),
        "created_at": created if isinstance(created, str) else (post.created_at.isoformat() if post.created_at else ""),
    }


# --- images ---------------------------------------------------------------------------------------------


class FolderImages:
    def __init__(self, root: Path) -> None:
        self.root = root

    def find(self, post: Post) -> Callable[[], io.BufferedIOBase] | None:
        md5, ext, pid = post.md5 or "", post.file_ext or "", post.id
        for rel in (f"{md5}.{ext}", f"{md5[:2]}/{md5}.{ext}", f"{md5[:2]}/{md5[2:4]}/{md5}.{ext}", f"{pid}.{ext}",
                    f"{pid % 1000:04d}/{pid}.{ext}"):
            path = self.root / rel
            if path.is_file():
                return lambda path=path: open(path, "rb")
        return None


class TarImages:
    """Index of tar shard members (header scan once; numpy arrays keep it small for millions of files)."""

    def __init__(self, shards: list[Path]) -> None:
        self.shards = shards
        ids, where, offsets, sizes = [], [], [], []
        self.by_md5: dict[str, tuple[int, int, int]] = {}
        for si, shard in enumerate(shards):
            with tarfile.open(shard, "r:") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    stem = member.name.rsplit("/", 1)[-1].split(".", 1)[0]
                    if stem.isdigit():
                        ids.append(int(stem))
                        where.append(si)
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
                    elif _MD5.match(stem.lower()):
                        self.by_md5[stem.lower()] = (si, member.offset_data, member.size)
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.where = np.asarray(where, dtype=np.int32)[order]
        self.offsets = np.asarray(offsets, dtype=np.int64)[order]
        self.sizes = np.asarray(sizes, dtype=np.int64)[order]

    def find(self, post: Post) -> Callable[[], io.BufferedIOBase] | None:
        hit: tuple[int, int, int] | None = None
        i = int(np.searchsorted(self.ids, post.id))
        if i < len(self.ids) and int(self.ids[i]) == post.id:
            hit = (int(self.where[i]), int(self.offsets[i]), int(self.sizes[i]))
        elif post.md5 and post.md5 in self.by_md5:
            hit = self.by_md5[post.md5]
        if hit is None:
            return None
        shard, offset, size = self.shards[hit[0]], hit[1], hit[2]

        def open_member() -> io.BufferedIOBase:
            fh = open(shard, "rb")
            fh.seek(offset)
            return _Slice(fh, size)  # type: ignore[return-value]

        return open_member


class _Slice(io.RawIOBase):
    """A read-only window [offset, offset+size) of an open file."""

    def __init__(self, fh: io.BufferedReader, size: int) -> None:
        self.fh, self.left = fh, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.fh.close()
        super().close()


def image_source(cfg: DumpConfig, root: Path | None) -> FolderImages | TarImages:
    if cfg.images_path:
        path = Path(cfg.images_path).expanduser()
        if not path.exists():
            raise ConfigError(f"ingest.dump.images_path {str(path)!r} does not exist")
    elif root is not None and (root / "images").is_dir():
        path = root / "images"
    elif root is not None and any(root.glob("*.tar")):
        path = root
    else:
        raise ConfigError("ingest.dump.images_path is not set and the dump has no images/ folder or .tar shards "
                          "next to its metadata; set ingest.dump.images_path")
    if path.is_file() and path.name.endswith(".tar"):
        return TarImages([path])
    shards = sorted(path.glob("*.tar"))
    if root is not None and (root / DUMP_MARKER).exists() and not cfg.images_path:
        listed = json.loads((root / DUMP_MARKER).read_text()).get("image_shards") or []
        shards = [root / rel for rel in listed] or shards
    return TarImages(shards) if shards else FolderImages(path)


# --- import -----------------------------------------------------------------------------------------------


def import_file(opener: Callable[[], io.BufferedIOBase], post: Post, pool: Path, max_pixels: int) -> Outcome:
    """Copy one dump image into the pool: hash on the way, verify, atomic rename (runs in a worker thread)."""
    rel = pool_has(pool, post)
    if rel:
        return Outcome(True, image_path=rel)
    rel = image_relpath(post.md5 or "", post.file_ext or "")
    tmp = temp_path(pool, post.md5 or "")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5()
    size = 0
    try:
        with opener() as src, open(tmp, "wb") as dst:
            while block := src.read(CHUNK):
                digest.update(block)
                dst.write(block)
                size += len(block)
        reject = verify_file(tmp, post, digest.hexdigest(), max_pixels)
        if reject is not None:
            return Outcome(False, reject.reason, reject.detail, fetched_bytes=size, attempts=1)
        commit_to_pool(tmp, pool, rel)
        return Outcome(True, image_path=rel, fetched_bytes=size, attempts=1)
    except OSError as exc:
        return Outcome(False, "truncated" if size else "missing_image", f"reading the dump failed: {exc}")
    finally:
        tmp.unlink(missing_ok=True)


def import_posts(images: FolderImages | TarImages, posts: list[Post], pool: Path, max_pixels: int,
                 executor: ThreadPoolExecutor, record: Callable[[dict[str, Any]], None], stats: dict[str, Any]) -> None:
    """Verify and pool the dump files of `posts`; record(outcome) for each (missing files too)."""
    futures = []
    for post in posts:
        opener = images.find(post)
        if opener is None:
            record(outcome_json(post.id, post.md5, Outcome(
                False, "missing_image", f"no {post.md5}.{post.file_ext} / {post.id}.{post.file_ext} in the dump")))
            continue
        futures.append((post, executor.submit(import_file, opener, post, pool, max_pixels)))
    for post, future in futures:
        outcome = future.result()
        stats["imported" if outcome.fetched_bytes else "cached"] += 1 if outcome.ok else 0
        stats["bytes"] += outcome.fetched_bytes
        record(outcome_json(post.id, post.md5, outcome))


def import_dump_files(cfg: IngestConfig, posts: list[Post], pool: Path, record: Callable[[dict[str, Any]], None], *,
                      workers: int, images: FolderImages | TarImages | None = None) -> dict[str, Any]:
    """The file half of a sharded dump import: verify and pool these posts' files (one download shard).
    `images`: the dump's image source when the caller keeps one across shards (a tar index is built once)."""
    if images is None:
        images = image_source(cfg.dump, metadata_files(cfg.dump)[1])
    clean_incoming(pool)
    stats: dict[str, Any] = {"imported": 0, "cached": 0, "bytes": 0}
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest-dump") as executor:
        import_posts(images, posts, pool, cfg.verify.max_pixels, executor, record, stats)
    return stats


def import_dump(cfg: IngestConfig, ledger: Ledger, pool: Path, plan: list[tuple[str, str, int]], *,
                progress: Callable[[float, str], None], log: logging.Logger, workers: int,
                download: bool = True) -> dict[str, Any]:
    """Read the dump's records into the ledger and (download=True) pool each taken post's file as its batch
    is journalled. download=False is the metadata pass of a sharded ingest: the files come later, by shard."""
    files, root = metadata_files(cfg.dump)
    images = image_source(cfg.dump, root)
    quotas = [quota for _, _, quota in plan]
    matchers = compile_queries([tags for _, tags, _ in plan]) if cfg.queries else None
    post_filter = PostFilter(cfg.filters, need_file_url=False)
    if download:
        clean_incoming(pool)
    stats = {"imported": 0, "cached": 0, "bytes": 0, "records": ledger.dump_offset}

    def finish(items: list[tuple[int, Post]], executor: ThreadPoolExecutor) -> None:
        if download:
            import_posts(images, [post for _, post in items], pool, cfg.verify.max_pixels, executor,
                         ledger.record_outcome, stats)

    with ThreadPoolExecutor(workers, thread_name_prefix="ingest-dump") as executor:
        finish(list(ledger.pending.values()), executor)
        if ledger.dump_done:
            return stats
        records = iter_records(files)
        offset = 0
        for _ in range(ledger.dump_offset):  # resume: skip what the journal already holds
            next(records, None)
            offset += 1
        exhausted = False
        while not exhausted:
            batch: list[tuple[int, Any]] = []
            seen_by_q: dict[int, int] = {}
            while len(batch) < BATCH:
                raw = next(records, None)
                if raw is None:
                    exhausted = True
                    break
                qi = _route(raw, matchers, ledger, quotas, cfg.legacy_ratings)
                if qi is not None:
                    batch.append((qi, raw))
                    seen_by_q[qi] = seen_by_q.get(qi, 0) + 1
                offset += 1
            page, _ = ledger.select(batch, post_filter, cfg.legacy_ratings, quotas)
            full = all(q.accepted >= quota for q, quota in zip(ledger.queries, quotas))
            ledger.commit(page, q=None, page_param=offset - len(batch), next_cursor=offset,
                          done=exhausted or full, n=len(batch),
                          extra={"seen_by_q": seen_by_q, "dup_by_q": dict(page.dup_by_q)})
            finish(page.accepted, executor)
            stats["records"] = offset
            taken = sum(q.accepted for q in ledger.queries)
            progress(0.99 if exhausted else min(0.95, taken / max(1, min(sum(quotas), 10**12))),
                     f"{offset} dump records read, {taken} posts taken")
            if full:
                break
    log.info("ingest dump: %d records read, %d images imported, %d already in the pool", stats["records"],
             stats["imported"], stats["cached"])
    return stats


def _route(raw: Any, matchers, ledger: Ledger, quotas: list[int], legacy: str) -> int | None:
    """Index of the first query that matches the record and still has quota (0 without queries)."""
    if matchers is None:
        return 0
    try:
        post = parse_post(raw, legacy)
    except (ValueError, TypeError):
        return 0  # no id: let select() write the parse_error reject under the first query
    for qi, match in enumerate(matchers):
        if ledger.queries[qi].accepted < quotas[qi] and match(post, raw if isinstance(raw, Mapping) else {}):
            return qi
    return None


__all__ = ["import_dump", "import_dump_files", "import_posts", "iter_records", "metadata_files", "image_source"]
