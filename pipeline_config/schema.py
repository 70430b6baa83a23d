"""The whole pipeline config: one section per stage plus data_root, runtime and the study (`fm study`)."""
from __future__ import annotations

from pipeline_config.base import Section
from pipeline_config.bucket import BucketConfig
from pipeline_config.cache import CacheConfig
from pipeline_config.dedup import DedupConfig
from pipeline_config.eval import EvalConfig
from pipeline_config.ingest import IngestConfig
from pipeline_config.quality import QualityConfig
from pipeline_config.runtime import RuntimeConfig
from pipeline_config.study import StudyConfig
from pipeline_config.tag import TagConfig
from pipeline_config.train import TrainConfig


class PipelineConfig(Section):
    name: str = "default"
    data_root: str = ".data/booruflow"  # local folder or any fsspec URL (s3://bucket/prefix)
    seed: int = 0
    runtime: RuntimeConfig = RuntimeConfig()
    ingest: IngestConfig = IngestConfig()
    dedup: DedupConfig = DedupConfig()
    tag: TagConfig = TagConfig()
    quality: QualityConfig = QualityConfig()
    bucket: BucketConfig = BucketConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    study: StudyConfig = StudyConfig()  # the flow-vs-ε study (tasks/study/), not a stage: in no fingerprint
