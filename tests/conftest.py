"""Suite-wide: Prefect's server start-up allowance.

(The order xdist hands out test files is its own: most tests first. Fresh-clone runs on this 2-core machine: heavy
server/worker files first, 16:17 (they ran beside each other: the deployments test 253 s, 67 s alone); the README
test first, then xdist's order, 14:17; xdist's order alone, 13:29 and 16:11. The spread is the machine's; the
suite's ~25 CPU-minutes are what keeps it over 10 minutes, not the order.)
"""
from __future__ import annotations

import os

# Flows run in a test process without PREFECT_API_URL start a temporary server, as `fm` does: the same start-up
# allowance as flows/cli.py's prefect_defaults (set before any test module imports Prefect).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
