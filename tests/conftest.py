"""Suite-wide: Prefect's server start-up allowance.

(The order xdist hands out test files is its own: most tests first. Measured on this 2-core machine, handing the
heavy server/worker files out first made them run beside each other: 16:17 for the suite; the README test first,
then xdist's order: 14:17; xdist's order alone: 13:29.)
"""
from __future__ import annotations

import os

# Flows run in a test process without PREFECT_API_URL start a temporary server, as `fm` does: the same start-up
# allowance as flows/cli.py's prefect_defaults (set before any test module imports Prefect).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
