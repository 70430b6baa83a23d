"""Config of the train stage."""
from __future__ import annotations

from pipeline_config.base import Section


class TrainConfig(Section):
    pass
