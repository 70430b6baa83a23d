"""The embedded default: `api.base_url: "embedded:minibooru"` crawls a generated mini-booru over real HTTP.

The mini-booru is generated once into `<runtime.cache_dir>/minibooru-<posts>-<seed>-<max_side>` (plus
`-<aspect>` and `-nd<near_duplicates>` where they are not the defaults; reused by later runs) and served on a
free loopback port only while the stage runs. Nothing else differs from a crawl of danbooru.donmai.us: same
client, paging, retries, verification.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from data_contracts.errors import ConfigError
from pipeline_config.ingest import EMBEDDED_URL, EmbeddedConfig, IngestConfig
from tasks.ingest.parse import Post

log = logging.getLogger("booruflow.ingest")


def minibooru_dir(cache_dir: str | Path, cfg: EmbeddedConfig) -> Path:
    suffix = "" if cfg.aspect == "classic" else f"-{cfg.aspect}"  # two aspects in one cache_dir never clash
    if cfg.near_duplicates:
        suffix += f"-nd{cfg.near_duplicates:g}"
    return Path(cache_dir) / f"minibooru-{cfg.posts}-{cfg.seed}-{cfg.max_side}{suffix}"


def _minibooru():
    """The mini-booru package (demo and tests only, packages/minibooru): a clear message where it is missing."""
    try:
        import minibooru
    except ImportError as exc:
        raise ConfigError(
            f"ingest.api.base_url {EMBEDDED_URL!r} needs the mini-booru demo package, which is not installed: "
            "`pip install -e packages/minibooru` from the booruflow checkout (`make demo` does it), or point "
            "ingest.api.base_url at a Danbooru server") from exc
    return minibooru


def generator_version() -> int:
    """The mini-booru generator's version: a new one generates other posts, so it is part of the fingerprint."""
    return _minibooru().GENERATOR_VERSION


def ensure_minibooru(cache_dir: str | Path, cfg: EmbeddedConfig) -> Path:
    """Generate the mini-booru unless a complete one is already cached; returns its folder."""
    generate_minibooru = _minibooru().generate_minibooru

    folder = minibooru_dir(cache_dir, cfg)
    booru = generate_minibooru(folder, cfg.posts, cfg.seed, max_side=cfg.max_side, aspect=cfg.aspect,
                               near_duplicates=cfg.near_duplicates)
    return Path(booru.root)


@contextlib.contextmanager
def api_endpoint(cfg: IngestConfig, cache_dir: str | Path) -> Iterator[tuple[str, bool]]:
    """(base URL to crawl, embedded?) for the duration of the block."""
    if cfg.api.base_url != EMBEDDED_URL:
        yield cfg.api.base_url, False
        return
    serve_minibooru = _minibooru().serve_minibooru
    folder = ensure_minibooru(cache_dir, cfg.embedded)
    with serve_minibooru(folder, host="127.0.0.1", port=0, tag_limit=cfg.api.tag_limit) as server:
        log.info("ingest: serving the embedded mini-booru %s at %s", folder.name, server.url)
        yield server.url, True


def served_by(post: Post, base_url: str) -> Post:
    """The post with its file URL on `base_url`'s host: the embedded mini-booru that answered the crawl (an
    earlier run, another process, another port) is gone; the same files are served here."""
    if not post.file_url:
        return post
    here = urlsplit(base_url)
    return dataclasses.replace(post, file_url=urlsplit(post.file_url)._replace(scheme=here.scheme,
                                                                                netloc=here.netloc).geturl())
