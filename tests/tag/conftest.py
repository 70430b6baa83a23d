"""Shared fixtures: the real WD v3 label file and a tiny SwinV2 tagger built + exported once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wd_tagger"
REAL_CSV = FIXTURES / "selected_tags_v3.csv"
REAL_CONFIG = FIXTURES / "wd-swinv2-tagger-v3.config.json"


@pytest.fixture(scope="session")
def real_csv() -> Path:
    return REAL_CSV


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """timm SwinV2 (real class, tiny dims) + safetensors + ONNX export (legacy exporter, opset 17)."""
    from tasks.tag.tiny import write_tagger_folder

    return write_tagger_folder(tmp_path_factory.mktemp("tiny_tagger"), REAL_CSV, seed=0)


@pytest.fixture(scope="session")
def tagger(tiny_folder):
    from tasks.tag.model import open_folder

    return open_folder(tiny_folder, name="tiny-test")
