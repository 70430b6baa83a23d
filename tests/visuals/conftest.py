"""A small real world per test: images in a pool folder and contract tables (via real Parquet)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from tests.visuals import data


@dataclass
class World:
    pool: Path
    out: Path
    post_rows: list[dict]
    posts: pa.Table
    tmp: Path


@pytest.fixture()
def world(tmp_path) -> World:
    pool = tmp_path / "pool"
    rows = data.write_pool(pool)
    return World(pool=pool, out=tmp_path / "out", post_rows=rows, posts=data.posts_table(rows, tmp_path), tmp=tmp_path)
