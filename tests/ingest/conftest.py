"""Shared ingest fixtures: one generated mini-booru per test session and a real HTTP server over it.

    minibooru                 session: MiniBooru of MINIBOORU_POSTS posts (seed MINIBOORU_SEED, max_side 320)
                              with every special kind present (png/RGBA/webp/gif/mp4/zip/swf, comic, deleted,
                              banned, restricted, tiny and extreme-aspect images, parents)
    minibooru_server          a running server over it, anonymous allowed, page cap 1000; faults and stats are
                              reset before and after each test, so a test may flip `server.faults.*` freely
    minibooru_server_factory  start(**serve_minibooru kwargs) -> extra server (credentials, page_cap, faults ...),
                              stopped at teardown
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from minibooru import Faults, MiniBooru, MiniBooruServer, generate_minibooru, serve_minibooru

MINIBOORU_POSTS = 60
MINIBOORU_SEED = 7
MINIBOORU_MAX_SIDE = 320


@pytest.fixture(scope="session")
def minibooru(tmp_path_factory: pytest.TempPathFactory) -> MiniBooru:
    root: Path = tmp_path_factory.mktemp("minibooru")
    return generate_minibooru(root, MINIBOORU_POSTS, MINIBOORU_SEED, max_side=MINIBOORU_MAX_SIDE)


@pytest.fixture(scope="session")
def _minibooru_server_session(minibooru: MiniBooru) -> Iterator[MiniBooruServer]:
    with serve_minibooru(minibooru.root) as server:
        yield server


@pytest.fixture
def minibooru_server(_minibooru_server_session: MiniBooruServer) -> Iterator[MiniBooruServer]:
    server = _minibooru_server_session
    server.faults = Faults()
    server.reset_stats()
    yield server
    server.faults = Faults()
    server.reset_stats()


@pytest.fixture
def minibooru_server_factory(minibooru: MiniBooru) -> Iterator[Callable[..., MiniBooruServer]]:
    started: list[MiniBooruServer] = []

    def start(**kwargs) -> MiniBooruServer:
        server = serve_minibooru(kwargs.pop("booru_dir", minibooru.root), **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
