"""Shared fixtures: one tiny SD1.5 build (builtin:tiny-sd15) per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.models.sources import resolve_model_source


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    resolve_model_source("builtin:tiny-sd15", cache)  # builds the tiny model and its identity once
    return cache
