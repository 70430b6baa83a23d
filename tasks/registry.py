"""The implemented stages in DAG order. A stage appears here only once it really exists."""
from __future__ import annotations

import difflib
import importlib

from data_contracts.errors import ConfigError
from tasks.common.stage import StageSpec

DAG_ORDER = ("ingest", "dedup", "tag", "quality", "bucket", "cache", "train", "eval")
# stage -> module exposing SPEC; add a stage here when its implementation lands.
_MODULES: dict[str, str] = {
    "ingest": "tasks.ingest.stage",
    "dedup": "tasks.dedup.stage",
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


def check_stage(name: str) -> str:
    """The stage name, or a ConfigError naming the stages and the closest one."""
    if name in _MODULES:
        return name
    close = difflib.get_close_matches(name, list(_MODULES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown stage {name!r}; {hint}stages: {', '.join(implemented_stages())}")


def select_stages(stages: list[str] | str | None) -> list[str]:
    """Requested stages in DAG order (none or "all": every stage); unknown names are config errors."""
    if not stages or stages == ["all"] or stages == "all":
        return implemented_stages()
    wanted = {check_stage(s) for s in ([stages] if isinstance(stages, str) else stages)}
    return [s for s in implemented_stages() if s in wanted]
