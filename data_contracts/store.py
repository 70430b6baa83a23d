"""The artifact store: immutable stage outputs under `<data_root>/<stage>/<fingerprint>/`.

Layout (local paths or any fsspec URL):
    <root>/<stage>/<fp>/...files..., manifest.json   complete output (manifest written last)
    <root>/<stage>/_work/<fp>/                        work in progress (local), resumable
    <root>/<stage>/CURRENT                            {"fingerprint": ...} of the current output
    <root>/pool/...                                   content-addressed data shared across runs (images)

A folder without a valid manifest is incomplete and never read. On a local root the commit is one
rename of the finished work folder; on object storage the files are uploaded first and the manifest
last, and an output folder without a manifest is removed before it is written again.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import fsspec

from data_contracts.errors import ContractError, StageError
from data_contracts.fingerprint import sha256_file
from data_contracts.manifest import MANIFEST_NAME, FileEntry, StageManifest, parse_manifest

M = TypeVar("M", bound=StageManifest)
CURRENT_NAME = "CURRENT"
WORK_DIR = "_work"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, then rename (readers see old or new, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def list_files(folder: Path) -> list[FileEntry]:
    """Every file under folder (except the manifest and temp files) with size and sha256."""
    entries = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == MANIFEST_NAME or path.name.endswith(".tmp"):
            continue
        rel = path.relative_to(folder).as_posix()
        entries.append(FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(str(path))))
    return entries


class ArtifactStore:
    def __init__(self, root: str, local_cache: str | Path = ".data/cache") -> None:
        self.root_url = str(root).rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.root_url)
        self.is_local = self.fs.protocol in ("file", "local") or "file" in tuple(self.fs.protocol)
        self.local_cache = Path(local_cache)
        if self.is_local:
            Path(self._root).mkdir(parents=True, exist_ok=True)

    # --- paths -----------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self._root, *parts])

    def output_path(self, stage: str, fingerprint: str) -> str:
        return self._join(stage, fingerprint)

    def output_url(self, stage: str, fingerprint: str) -> str:
        path = self.output_path(stage, fingerprint)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def pool_dir(self) -> Path:
        """Local folder for content-addressed data shared across runs (downloaded images)."""
        if not self.is_local:
            # Object storage: stage pools in the local cache; stages upload what they publish.
            return self.local_cache / "pool"
        return Path(self._join("pool"))

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        if self.is_local:
            return Path(self._join(stage, WORK_DIR, fingerprint))
        return self.local_cache / "work" / stage / fingerprint

    # --- reading ---------------------------------------------------------------------------
    def is_complete(self, stage: str, fingerprint: str) -> bool:
        return self.fs.exists(self._join(stage, fingerprint, MANIFEST_NAME))

    def read_manifest(self, cls: type[M], fingerprint: str | None = None) -> M:
        stage = cls.STAGE
        fp = fingerprint or self.current(stage)
        if fp is None:
            raise StageError(
                f"stage {stage!r} has no output under {self.root_url}/{stage}; run `fm run {stage}` first"
            )
        where = f"{self.root_url}/{stage}/{fp}/{MANIFEST_NAME}"
        try:
            text = self.fs.cat_file(self._join(stage, fp, MANIFEST_NAME)).decode()
        except FileNotFoundError as exc:
            raise StageError(f"{where} does not exist: the output is incomplete; rerun `fm run {stage}`") from exc
        return parse_manifest(text, cls, where)

    def current(self, stage: str) -> str | None:
        try:
            raw = json.loads(self.fs.cat_file(self._join(stage, CURRENT_NAME)))
        except FileNotFoundError:
            return None
        fp = raw.get("fingerprint")
        return fp if fp and self.is_complete(stage, fp) else None

    def set_current(self, stage: str, fingerprint: str) -> None:
        body = json.dumps({"fingerprint": fingerprint, "updated_at": datetime.now(timezone.utc).isoformat()})
        self._write_small(self._join(stage, CURRENT_NAME), body)

    def path(self, manifest: StageManifest, rel: str, verify: bool = False) -> Path:
        """A local path to a file of a complete output (downloaded once from object storage)."""
        entry = manifest.file(rel)
        if self.is_local:
            local = Path(self._join(manifest.stage, manifest.fingerprint, rel))
        else:
            local = self.local_cache / "read" / manifest.stage / manifest.fingerprint / rel
            if not local.exists() or local.stat().st_size != entry.size:
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(local.name + f".{uuid.uuid4().hex[:6]}.tmp")
                self.fs.get_file(self._join(manifest.stage, manifest.fingerprint, rel), str(tmp))
                os.replace(tmp, local)
                verify = True
        if not local.exists():
            raise ContractError(f"{manifest.stage}/{manifest.fingerprint}: listed file {rel} is missing ({local})")
        if local.stat().st_size != entry.size:
            raise ContractError(
                f"{local}: size expected {entry.size} bytes (manifest), found {local.stat().st_size} — "
                "the file was truncated or replaced; rerun the stage with --force"
            )
        if verify and sha256_file(str(local)) != entry.sha256:
            raise ContractError(
                f"{local}: sha256 expected {entry.sha256} (manifest), found another — the file is corrupt; "
                "rerun the stage with --force"
            )
        return local

    # --- writing ---------------------------------------------------------------------------
    def begin(self, stage: str, fingerprint: str, resume: bool) -> Path:
        """The local work folder for an output; kept across kills when the stage can resume."""
        work = self.work_dir(stage, fingerprint)
        if work.exists() and not resume:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        return work

    def commit(self, manifest: M, work: Path) -> M:
        """List every file with size + sha256, write the manifest last, publish atomically."""
        manifest.files = list_files(work)
        stage, fp = manifest.stage, manifest.fingerprint
        if self.is_local:
            atomic_write_text(work / MANIFEST_NAME, manifest.to_json())
            final = Path(self._join(stage, fp))
            if final.exists():  # --force over a complete output: move the old one aside first
                trash = final.with_name(f".old-{fp}-{uuid.uuid4().hex[:8]}")
                os.replace(final, trash)
                os.replace(work, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(work, final)
        else:
            final = self._join(stage, fp)
            if self.fs.exists(final):
                self.fs.rm(final, recursive=True)
            for entry in manifest.files:
                self.fs.put_file(str(work / entry.path), f"{final}/{entry.path}")
            self._write_small(f"{final}/{MANIFEST_NAME}", manifest.to_json())
            shutil.rmtree(work, ignore_errors=True)
        self.set_current(stage, fp)
        return manifest

    def clean_incomplete(self, stage: str, keep: set[str]) -> list[str]:
        """Remove work folders and manifest-less outputs other than `keep` (those may still resume)."""
        removed: list[str] = []
        if self.is_local:
            stage_dir = Path(self._join(stage))
            for child in (stage_dir / WORK_DIR).glob("*") if (stage_dir / WORK_DIR).exists() else []:
                if child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(str(child))
            for child in stage_dir.glob(".old-*"):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(str(child))
        stage_path = self._join(stage)
        if self.fs.exists(stage_path):
            for child in self.fs.ls(stage_path, detail=False):
                name = child.rstrip("/").rsplit("/", 1)[-1]
                if name in keep or name in (WORK_DIR, CURRENT_NAME) or name.startswith("."):
                    continue
                if self.fs.isdir(child) and not self.fs.exists(f"{child}/{MANIFEST_NAME}"):
                    self.fs.rm(child, recursive=True)
                    removed.append(child)
        return removed

    def _write_small(self, path: str, text: str) -> None:
        if self.is_local:
            atomic_write_text(Path(path), text)
        else:
            with self.fs.open(path, "w") as fh:
                fh.write(text)
