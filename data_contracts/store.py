"""The artifact store: immutable stage outputs under `<data_root>/<stage>/<fingerprint>/`.

Layout (local paths or any fsspec URL):
    <root>/<stage>/<fp>/...files..., manifest.json   complete output (manifest written last)
    <root>/<stage>/_work/<fp>/                        work in progress, resumable (see below)
    <root>/<stage>/CURRENT                            {"fingerprint": ...} of the current output
    <root>/pool/...                                   content-addressed data shared across runs (images)

A folder without a valid manifest is incomplete and never read. On a local root the commit is one
rename of the finished work folder; on object storage the files are uploaded first and the manifest
last, and an output folder without a manifest is removed before it is written again.

Object storage (any fsspec URL that is not a local path, e.g. s3://bucket/prefix):
- a stage works in a local folder under `<local_cache>/work/<root slug>/`; files that other machines must
  see before the commit (the journal of a sharded stage) are published with `work_put` to
  `<root>/<stage>/_work/<fp>/` and read back with `work_get`; large published files (a sharded cache's
  chunks, published under content-addressed names) need not come back at all: `commit(published=...)` copies
  them into the output on the store (server-side) with the size and sha256 their writer recorded;
- the pool lives on the store; `pool_dir()` is this machine's local mirror of it. Writers publish with
  `pool_put`, readers make files local with `pool_fetch` / `pool_get` (downloaded once, checked by size);
- outputs are read through a local download cache (`path`), verified against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, TypeVar

import fsspec

from data_contracts.errors import ContractError, StageError
from data_contracts.fingerprint import sha256_file
from data_contracts.manifest import (
    MANIFEST_NAME,
    FileEntry,
    StageManifest,
    parse_manifest,
)

M = TypeVar("M", bound=StageManifest)
CURRENT_NAME = "CURRENT"
WORK_DIR = "_work"
POOL_DIR = "pool"
TRANSFER_THREADS = 16  # concurrent object-store transfers (each is mostly waiting on the network)

# Local pool mirror folder -> the object-store-backed store it mirrors. Lets code that only holds the
# pool folder (the ingest downloader) publish into the store: see `remote_pool`.
_REMOTE_POOLS: dict[Path, "ArtifactStore"] = {}


def remote_pool(folder: str | Path) -> "ArtifactStore | None":
    """The object-store-backed store whose local pool mirror is `folder`; None for a plain local pool."""
    return _REMOTE_POOLS.get(Path(folder))


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


def _move_into(src: Path, final: Path) -> None:
    """Atomic rename into place, creating the folder (again, if someone removed it meanwhile)."""
    try:
        os.replace(src, final)
    except FileNotFoundError:
        if not Path(src).exists():
            raise
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, final)


def _local_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


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
    def __init__(self, root: str, local_cache: str | Path = ".data/cache",
                 storage_options: Mapping[str, Any] | None = None) -> None:
        """root: a local folder or an fsspec URL; storage_options: fsspec arguments for it (endpoint,
        region...; credentials come from the environment, never from here)."""
        self.root_url = str(root).rstrip("/")
        options = dict(storage_options or {})
        if fsspec.core.split_protocol(self.root_url)[0] not in (None, "file", "local"):
            # Other processes (workers, other runs) change the store under us: never answer from a
            # cached directory listing (a stale one would hide a manifest that was just written).
            options.setdefault("use_listings_cache", False)
        self.fs, self._root = fsspec.core.url_to_fs(self.root_url, **options)
        self.is_local = self.fs.protocol in ("file", "local") or "file" in tuple(self.fs.protocol)
        self.local_cache = Path(local_cache).absolute()
        # Local caches of different roots never mix (two buckets may hold the same fingerprint).
        self._slug = "" if self.is_local else (
            re.sub(r"[^A-Za-z0-9]+", "-", self.root_url)[:48].strip("-") + "-"
            + hashlib.sha256(self.root_url.encode()).hexdigest()[:8])
        self._lock = threading.Lock()
        self._pool_sizes: dict[str, int] | None = None  # object storage: rel -> size, listed once
        self._mirror: Path | None = None  # object storage: the local pool mirror, once made
        if self.is_local:
            Path(self._root).mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_config(cls, cfg: Any) -> "ArtifactStore":
        """The store a pipeline config names (data_root, runtime.cache_dir, runtime.storage_options)."""
        runtime = cfg.runtime
        return cls(cfg.data_root, runtime.cache_dir, getattr(runtime, "storage_options", None) or None)

    # --- paths -----------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self._root, *parts])

    def output_path(self, stage: str, fingerprint: str) -> str:
        return self._join(stage, fingerprint)

    def output_url(self, stage: str, fingerprint: str) -> str:
        path = self.output_path(stage, fingerprint)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def work_dir(self, stage: str, fingerprint: str) -> Path:
        """The local work folder of an output in progress."""
        if self.is_local:
            return Path(self._join(stage, WORK_DIR, fingerprint))
        return self.local_cache / "work" / self._slug / stage / fingerprint

    def work_url(self, stage: str, fingerprint: str) -> str:
        """Where other machines see the published files of an output in progress."""
        path = self._join(stage, WORK_DIR, fingerprint)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # --- the pool: content-addressed files shared by every run on this root ----------------------
    def pool_dir(self) -> Path:
        """The local folder of the pool: the pool itself on a local root; on object storage this machine's
        mirror of `<root>/pool/` (files appear there through pool_put / pool_fetch / pool_get)."""
        if self.is_local:
            return Path(self._join(POOL_DIR))
        if self._mirror is None:
            folder = self.local_cache / POOL_DIR / self._slug
            folder.mkdir(parents=True, exist_ok=True)
            _REMOTE_POOLS[folder] = self
            self._mirror = folder
        return self._mirror

    def pool_url(self, rel: str = "") -> str:
        """The pool (or one of its files) as a path/URL on the store."""
        path = self._join(POOL_DIR, rel) if rel else self._join(POOL_DIR)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def pool_index(self) -> dict[str, int]:
        """Object storage only: rel -> size of every pool file, from one listing per store (kept current by
        pool_put). Far cheaper than one HEAD request per file when a crawl asks about each post."""
        if self.is_local:
            raise ValueError("pool_index is for object storage; a local pool answers pool_size directly")
        with self._lock:
            if self._pool_sizes is None:
                base = self._join(POOL_DIR)
                found = self.fs.find(base, detail=True) if self.fs.exists(base) else {}
                self._pool_sizes = {
                    name[len(base) + 1:]: int(info.get("size") or 0)
                    for name, info in found.items() if info.get("type", "file") == "file"
                }
            return self._pool_sizes

    def pool_size(self, rel: str) -> int | None:
        """Size of a pool file on the store; None when it is not there."""
        if self.is_local:
            return _local_size(self.pool_dir() / rel)
        return self.pool_index().get(rel)

    def pool_has(self, rel: str, size: int | None = None) -> bool:
        """Whether the pool holds `rel` (of `size` bytes, when given and non-zero)."""
        found = self.pool_size(rel)
        if found is not None and (not size or found == size):
            return True
        if not self.is_local:
            local = self.pool_dir() / rel
            have = _local_size(local)
            if have is not None and (not size or have == size):
                self._pool_upload(local, rel)  # a verified mirror copy that never reached the store
                return True
        return False

    def pool_put(self, local_file: str | Path, rel: str) -> Path:
        """Publish a complete, verified file as pool file `rel`; the file is moved (temp files welcome).

        Local root: one atomic rename into the pool. Object storage: one upload (a single PUT, so readers
        see all of it or nothing), then the file becomes this machine's mirror copy. Returns that local path.
        """
        local_file = Path(local_file)
        final = self.pool_dir() / rel
        if not self.is_local:
            self._pool_upload(local_file, rel)
        if local_file != final:
            _move_into(local_file, final)
        return final

    def _pool_upload(self, local_file: Path, rel: str) -> None:
        size = local_file.stat().st_size
        self.fs.put_file(str(local_file), self._join(POOL_DIR, rel))
        index = self.pool_index()
        with self._lock:
            index[rel] = size

    def pool_fetch(self, rels: Iterable[str], sizes: Iterable[int | None] | None = None) -> Path:
        """Make pool files readable under pool_dir() and return that folder.

        Object storage: each file missing from the mirror (or of another size than `sizes` says) is
        downloaded once to a temp name, checked by size, then renamed into place. Files the pool does not
        hold stay missing, exactly as on a local root, so readers report them the same way.
        """
        folder = self.pool_dir()
        if self.is_local:
            return folder
        rels = list(rels)
        want = list(sizes) if sizes is not None else [None] * len(rels)
        todo = []
        for rel, size in zip(rels, want):
            have = _local_size(folder / rel)
            if have is not None and size and have != size:
                (folder / rel).unlink(missing_ok=True)  # a stale copy: never read it
                have = None
            if have is None:
                todo.append((rel, size))
        if todo:
            with ThreadPoolExecutor(min(TRANSFER_THREADS, len(todo))) as pool:
                list(pool.map(lambda item: self._pool_download(folder, *item), todo))
        return folder

    def _pool_download(self, folder: Path, rel: str, size: int | None) -> None:
        final = folder / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.fs.get_file(self._join(POOL_DIR, rel), str(tmp))
            got = tmp.stat().st_size
            if size and got != size:
                raise ContractError(f"{self.pool_url(rel)}: {got} bytes, expected {size} (posts table); "
                                    "rerun `fm run ingest --force`")
            _move_into(tmp, final)
        except FileNotFoundError:
            pass  # not in the pool: the reader reports it as a missing file
        finally:
            tmp.unlink(missing_ok=True)

    def pool_get(self, rel: str, size: int | None = None) -> Path:
        """A local path to one pool file (downloaded once on object storage, checked by size)."""
        path = self.pool_fetch([rel], [size]) / rel
        if not path.is_file():
            raise ContractError(f"{self.pool_url(rel)} is not in the pool; rerun `fm run ingest --force`")
        return path

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
            local = self.local_cache / "read" / self._slug / manifest.stage / manifest.fingerprint / rel
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
                f"the file was truncated or replaced; rerun `fm run {manifest.stage} --force`"
            )
        if verify and sha256_file(str(local)) != entry.sha256:
            raise ContractError(
                f"{local}: sha256 expected {entry.sha256} (manifest), found another — the file is corrupt; "
                f"rerun `fm run {manifest.stage} --force`"
            )
        return local

    # --- writing ---------------------------------------------------------------------------
    def begin(self, stage: str, fingerprint: str, resume: bool) -> Path:
        """The local work folder for an output; kept across kills when the stage can resume."""
        work = self.work_dir(stage, fingerprint)
        if not resume:
            if work.exists():
                shutil.rmtree(work)
            if not self.is_local:
                self._rm_remote(self._join(stage, WORK_DIR, fingerprint))
        work.mkdir(parents=True, exist_ok=True)
        return work

    def work_put(self, stage: str, fingerprint: str, rel: str, as_rel: str | None = None) -> None:
        """Publish a finished file of the work folder so other machines see it (a no-op on a local root,
        where the work folder already is under the root), under `as_rel` when given. Publish the file that
        marks a step done last."""
        if not self.is_local:
            self.fs.put_file(str(self.work_dir(stage, fingerprint) / rel),
                             self._join(stage, WORK_DIR, fingerprint, as_rel or rel))

    def work_get(self, stage: str, fingerprint: str, rel: str, refresh: bool = False) -> Path | None:
        """A file of the work folder, downloaded when another machine published it; None when nobody has.
        refresh: download the published copy even when a local one exists (a local copy may be a killed
        run's partial file that another machine has since finished); the local one stays if none is published."""
        local = self.work_dir(stage, fingerprint) / rel
        if (local.is_file() and not refresh) or self.is_local:
            return local if local.is_file() else None
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._join(stage, WORK_DIR, fingerprint, rel), str(tmp))
            _move_into(tmp, local)
        except FileNotFoundError:
            return local if local.is_file() else None
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def work_published_size(self, stage: str, fingerprint: str, rel: str) -> int | None:
        """The size of a file another machine published to the work folder, without downloading it;
        None on a local root (nothing is published there) or when nobody has published it."""
        if self.is_local:
            return None
        path = self._join(stage, WORK_DIR, fingerprint, rel)
        self.fs.invalidate_cache(path)  # a listing cached before the other machine's upload would say "missing"
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def _rm_remote(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def commit(self, manifest: M, work: Path, published: Mapping[str, FileEntry] | None = None,
               replace: bool = False) -> M:
        """List every file with size + sha256, write the manifest last, publish atomically.

        replace: a forced rebuild may replace a complete output of the same fingerprint; otherwise a complete
        output that appeared meanwhile (another run committed first) is kept, this work is dropped, and the
        manifest in place is returned.

        published: output files that exist only in the store's work folder, by the name other machines
        published them under (`work_put(..., as_rel=...)`, content-addressed so the bytes behind a name never
        change) -> their entry (output path, size and sha256 their writer recorded). They are copied into the
        output on the store without passing through this machine. Object storage only; a local file of the
        same output path is an error (which of the two is meant?)."""
        stage, fp = manifest.stage, manifest.fingerprint
        if not replace and self.is_complete(stage, fp):
            kept = self.read_manifest(type(manifest), fp)
            shutil.rmtree(work, ignore_errors=True)
            self.set_current(stage, fp)
            return kept
        local = list_files(work)
        have = {e.path for e in local}
        published = dict(published or {})
        if published and self.is_local:
            first = next(iter(published.values())).path
            raise StageError(f"{manifest.stage}: {len(published)} output file(s) are neither in {work} nor published "
                             f"(e.g. {first}); rerun the stage to write them")
        clash = sorted(have & {e.path for e in published.values()})
        if clash:
            raise StageError(f"{manifest.stage}: {clash[0]} is both in the work folder and published by another "
                             "machine; rerun the stage to resolve it")
        manifest.files = sorted(local + list(published.values()), key=lambda e: PurePosixPath(e.path))
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
            self._rm_remote(final)
            if local:
                self.fs.put([str(work / e.path) for e in local], [f"{final}/{e.path}" for e in local])
            if published:  # server-side copies (S3 CopyObject, GCS rewrite): no download, no second upload
                work_remote = self._join(stage, WORK_DIR, fp)
                self.fs.copy([f"{work_remote}/{src}" for src in published],
                             [f"{final}/{e.path}" for e in published.values()])
            self._write_small(f"{final}/{MANIFEST_NAME}", manifest.to_json())  # last: now it is complete
            shutil.rmtree(work, ignore_errors=True)
            self._rm_remote(self._join(stage, WORK_DIR, fp))
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
        if not self.is_local and self.fs.exists(f"{stage_path}/{WORK_DIR}"):
            for child in self.fs.ls(f"{stage_path}/{WORK_DIR}", detail=False):
                if child.rstrip("/").rsplit("/", 1)[-1] not in keep:
                    self._rm_remote(child)
                    removed.append(child)
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
