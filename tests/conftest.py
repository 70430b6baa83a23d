"""Suite-wide: Prefect's server start-up allowance, and the order test files are handed to xdist workers.

`make test` runs whole files per worker (`--dist loadfile`) on 2 cores, handing out files in the order this hook
leaves them (pyproject's addopts turn off xdist's own reordering). The README test (every documented command:
`fm run` of the demo, `fm up`, served runs; ~7 minutes) goes first, so it runs beside the many small in-process
test files; then files with more tests first, as xdist itself would order them, so the few heavy one- and
two-test files that start servers and worker processes (deployments, Ray, Dask, S3) come last. Measured on this
2-core machine: handing out the heavy files first made them run beside each other and the README test (4-6
server and worker processes on 2 cores): 16:17 for the suite, against 13:29 with xdist's own order.
"""
from __future__ import annotations

import os
from collections import Counter

# Flows run in a test process without PREFECT_API_URL start a temporary server, as `fm` does: the same start-up
# allowance as flows/cli.py's prefect_defaults (set before any test module imports Prefect).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

FIRST = ("tests/docs/test_readme_commands.py",)


def pytest_collection_modifyitems(config, items):
    files = [item.nodeid.split("::", 1)[0] for item in items]
    count = Counter(files)
    first = {path: i for i, path in enumerate(FIRST)}
    order = {id(item): (first.get(f, len(first)), -count[f], f) for item, f in zip(items, files)}
    items.sort(key=lambda item: order[id(item)])  # stable: tests within a file keep their order
