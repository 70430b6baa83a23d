"""Suite-wide: the longest test files are collected first, so that `make test`'s two xdist workers
(`-n auto --dist loadfile`: a file stays on one worker, with its module fixtures) start on them and do not
end with one worker alone on a multi-minute file while the other idles."""
from __future__ import annotations

import pytest

# Measured on 2 cores (longest first); any other file keeps its collection order after these.
LONGEST_FILES = (
    "tests/docs/test_readme_commands.py",
    "tests/flows/test_deployments.py",
    "tests/scale/test_sharded.py",
    "tests/eval/test_ab.py",
    "tests/scale/test_object_store.py",
    "tests/scale/test_gpu_limit.py",
    "tests/train/test_distributed.py",
    "tests/scale/test_shard_workers.py",
    "tests/eval/test_stage.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: file order kept
