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


def content_id(manifest: Any) -> str:
    """An upstream output as a downstream fingerprint sees it: its fingerprint plus the digest of the sha256s
    of the files downstream stages consume (`manifest.CONTENT`, globs; the manifest already holds the hashes).
    Equal content, equal id; a forced rebuild that made other data gives another id. Reports, pictures,
    TensorBoard files and run bookkeeping (timings) are not content."""
    import fnmatch

    patterns = manifest.CONTENT
    data = sorted((f.path, f.sha256) for f in manifest.files
                  if any(fnmatch.fnmatchcase(f.path, p) for p in patterns))
    return f"{manifest.fingerprint}.{digest(data, 12)}"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
