"""Config of the bucket stage."""
from __future__ import annotations

from pipeline_config.base import Section


class BucketConfig(Section):
    pass
