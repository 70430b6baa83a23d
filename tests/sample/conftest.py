"""Shared fixtures: one tiny SD1.5 (built by tasks.models, loaded through the real loaders) per session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample-cache")


@pytest.fixture(scope="session")
def tiny(model_cache):
    from tasks.sample.main import load_for_sampling

    return load_for_sampling("builtin:tiny-sd15", cache_dir=model_cache, device="cpu")
