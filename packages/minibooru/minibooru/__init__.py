"""The mini-booru: a generated Danbooru look-alike (posts, images, tags, ground truth), a Danbooru-compatible
local HTTP server with switchable faults, and an offline dump writer. Used by tests, benchmarks and `make demo`.

    booru = generate_minibooru(path, n_posts=300, seed=0, max_side=768)
    with serve_minibooru(booru.root) as server:       # server.url, server.faults, server.stats
        ...
    write_dump(booru.root, dump_dir, fmt="parquet", images="tar")

Standalone: `python -m minibooru serve --posts N --seed S --port P --dir D`.
"""
from .dump import POST_PARQUET_SCHEMA, write_dump
from .generate import (
    ARTISTS,
    CHARACTERS,
    GENERATOR_VERSION,
    SERIES,
    MiniBooru,
    generate_minibooru,
    hide_file_fields,
    image_url,
)
from .server import Faults, MiniBooruServer, ServerStats, parse_tags, serve_minibooru

__all__ = [
    "ARTISTS", "CHARACTERS", "GENERATOR_VERSION", "SERIES", "POST_PARQUET_SCHEMA", "Faults", "MiniBooru", "MiniBooruServer", "ServerStats",
    "generate_minibooru", "hide_file_fields", "image_url", "parse_tags", "serve_minibooru", "write_dump",
]
