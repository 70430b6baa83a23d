"""Suite-wide: Prefect's server start-up allowance, and the order test files are handed to xdist workers.

`make test` runs whole files per worker (`--dist loadfile`) on 2 cores. A file is handed to a worker when it has
at most 2 tests left, in collection order (pyproject's addopts turn off xdist's own reordering, which hands out
the files with the most tests first and so left the one-test end-to-end files, minutes each, for the end). The
longest files go first, longest first, so that the last files handed out are short ones and both workers finish
together; every other file keeps its place, and the tests within a file keep theirs.
"""
from __future__ import annotations

import os

# Flows run in a test process without PREFECT_API_URL start a temporary server, as `fm` does: the same start-up
# allowance as flows/cli.py's prefect_defaults (set before any test module imports Prefect).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Seconds each took in a full run on 2 cores (pytest -n 2 --dist loadfile), longest first. Estimates: a file
# missing here (or renamed) just keeps its collection order after these.
LONGEST_FIRST = (
    "tests/docs/test_readme_commands.py",  # ~430 (every README command: fm run demo, fm up, served runs)
    "tests/scale/test_sharded_ray.py",  # ~140 (a local Ray instance; slow when the other core is busy)
    "tests/flows/test_up.py",  # ~45-120
    "tests/flows/test_deployments.py",  # ~100
    "tests/scale/test_sharded.py",  # ~75
    "tests/eval/test_stage.py",  # ~50 (with the eval chain it shares with test_ab.py)
    "tests/scale/test_shard_workers.py",  # ~50
    "tests/scale/test_object_store.py",  # ~50
    "tests/scale/test_gpu_limit.py",  # ~50
    "tests/train/test_distributed.py",  # ~45
    "tests/train/test_compile_cache.py",  # ~45
    "tests/flows/test_cli.py",  # ~40
    "tests/study/test_study_e2e.py",  # ~30
    "tests/flows/test_publish.py",  # ~30
    "tests/train/test_export.py",  # ~30
    "tests/eval/test_ab.py",  # ~25
    "tests/cache/test_stage.py",  # ~25
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable sort
