"""Config of the tag stage."""
from __future__ import annotations

from pipeline_config.base import Section


class TagConfig(Section):
    pass
