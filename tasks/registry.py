"""The implemented stages in DAG order. A stage appears here only once it really exists."""
from __future__ import annotations

import importlib

from tasks.common.stage import StageSpec

DAG_ORDER = ("ingest", "tag", "quality", "bucket", "cache", "train", "eval")
# stage -> module exposing SPEC; add a stage here when its implementation lands.
_MODULES: dict[str, str] = {
    "ingest": "tasks.ingest.stage",
    "tag": "tasks.tag.stage",
    "quality": "tasks.quality.stage",
    "bucket": "tasks.bucket.stage",
    "cache": "tasks.cache.stage",
    "train": "tasks.train.stage",
    "eval": "tasks.eval.stage",
}


def implemented_stages() -> list[str]:
    return [s for s in DAG_ORDER if s in _MODULES]


def stage_spec(name: str) -> StageSpec:
    if name not in _MODULES:
        raise KeyError(name)
    return importlib.import_module(_MODULES[name]).SPEC
