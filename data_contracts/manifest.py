"""The base manifest every stage writes last into its output folder."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_contracts.errors import ContractError

MANIFEST_NAME = "manifest.json"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # relative to the stage output folder, '/'-separated
    size: int
    sha256: str


class StageManifest(BaseModel):
    """Typed artifact contract of one stage output. Subclasses add stage-specific fields."""

    model_config = ConfigDict(extra="forbid")
    STAGE: ClassVar[str] = ""
    CONTRACT_VERSION: ClassVar[int] = 0
    # The files downstream stages consume (fnmatch globs; `*` crosses folders): their sha256s are the output's
    # content identity in downstream fingerprints (data_contracts.fingerprint.content_id).
    CONTENT: ClassVar[tuple[str, ...]] = ("*.parquet", "*.safetensors", "diffusers/*")

    stage: str
    contract_version: int
    fingerprint: str
    upstream: dict[str, str] = Field(default_factory=dict)  # stage -> fingerprint
    config_digest: str
    code_version: str
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    row_counts: dict[str, int] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    files: list[FileEntry] = Field(default_factory=list)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise ContractError(f"{self.stage} manifest {self.fingerprint} lists no file {path!r}")

    def files_under(self, prefix: str) -> list[FileEntry]:
        return [f for f in self.files if f.path.startswith(prefix)]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def parse_manifest(text: str, cls: type[StageManifest], where: str) -> StageManifest:
    """Parse and check a manifest against the contract class; one clear message on mismatch."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ContractError(f"{where}: manifest must be a JSON object")
    if cls.STAGE and raw.get("stage") != cls.STAGE:
        raise ContractError(f"{where}: field 'stage' expected {cls.STAGE!r}, found {raw.get('stage')!r}")
    found = raw.get("contract_version")
    if cls.CONTRACT_VERSION and found != cls.CONTRACT_VERSION:
        raise ContractError(
            f"{where}: field 'contract_version' expected {cls.CONTRACT_VERSION}, found {found!r} — "
            f"this output was written by another version of the {cls.STAGE} stage; rerun `fm run {cls.STAGE} --force`"
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ContractError(f"{where}: field {loc!r}: {first['msg']}") from exc
