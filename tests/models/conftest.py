"""Session fixtures: one cache dir with the tiny SD1.5 stand-in and the generated tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.models.load import load_sd15
from tasks.models.sources import resolve_model_source


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_source(model_cache):
    return resolve_model_source("builtin:tiny-sd15", model_cache)


@pytest.fixture(scope="session")
def tiny(tiny_source):
    torch.manual_seed(0)
    return load_sd15(tiny_source)


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny.tokenizer
