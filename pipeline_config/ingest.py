"""Config of the ingest stage."""
from __future__ import annotations

from pipeline_config.base import Section


class IngestConfig(Section):
    pass
