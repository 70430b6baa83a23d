"""Every stage contract in DAG order (used by the golden-schema test and `fm inspect`)."""
from __future__ import annotations

from types import ModuleType

from data_contracts import bucket, cache, dedup, eval as eval_contract, ingest, quality, tag, train

CONTRACT_MODULES: dict[str, ModuleType] = {
    m.STAGE: m for m in (ingest, dedup, tag, quality, bucket, cache, train, eval_contract)
}


def manifest_class(stage: str):
    return _manifest_classes()[stage]


def _manifest_classes():
    from data_contracts.bucket import BucketManifest
    from data_contracts.cache import CacheManifest
    from data_contracts.dedup import DedupManifest
    from data_contracts.eval import EvalManifest
    from data_contracts.ingest import IngestManifest
    from data_contracts.quality import QualityManifest
    from data_contracts.tag import TagManifest
    from data_contracts.train import TrainManifest

    return {c.STAGE: c for c in (IngestManifest, DedupManifest, TagManifest, QualityManifest, BucketManifest, CacheManifest, TrainManifest,
                                          EvalManifest)}


def schema_snapshot() -> dict[str, dict]:
    """{stage: {"contract_version": v, "schemas": {name: schema text}, "manifest": field names}}."""
    out = {}
    for stage, module in CONTRACT_MODULES.items():
        cls = manifest_class(stage)
        out[stage] = {
            "contract_version": module.CONTRACT_VERSION,
            "schemas": {name: str(schema) for name, schema in module.SCHEMAS.items()},
            "manifest": {name: str(f.annotation) for name, f in cls.model_fields.items()},
        }
    return out
