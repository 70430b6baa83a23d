"""Config of the quality stage."""
from __future__ import annotations

from pipeline_config.base import Section


class QualityConfig(Section):
    pass
