"""Config of the cache stage."""
from __future__ import annotations

from pipeline_config.base import Section


class CacheConfig(Section):
    pass
