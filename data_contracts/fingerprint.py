"""Fingerprints: a stage output is keyed by everything that determines its content."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:length]


def stage_fingerprint(
    stage: str,
    contract_version: int,
    config_section: dict[str, Any],
    upstream: dict[str, str],
    code_version: str,
) -> str:
    """hash(contract version, the stage's own config section, upstream fingerprints, code version)."""
    return digest(
        {
            "stage": stage,
            "contract_version": contract_version,
            "config": config_section,
            "upstream": dict(sorted(upstream.items())),
            "code_version": code_version,
        }
    )


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
