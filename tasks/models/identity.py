"""Content identity (sha256) of weight files, cached so repeated runs do not re-hash gigabytes.

The cache is a sidecar JSON under ``<cache_dir>/identity/`` keyed by the file's absolute path and
validated by (size, mtime_ns, inode): an edited or replaced file gets re-hashed, an untouched one
costs a stat. The inode catches files replaced by temp+rename within one mtime tick (coarse
filesystem clocks), which size+mtime alone would miss.
The sidecar lives in the cache dir, not next to the weights, because model folders may be read-only.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _sidecar_path(path: Path, cache_dir: Path, what: str) -> Path:
    key = hashlib.sha256(f"{path.resolve()}\0{what}".encode("utf-8")).hexdigest()[:32]
    return cache_dir / "identity" / f"{key}.json"


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True))
    os.replace(tmp, path)


def _cached_digest(path: Path, cache_dir: Path | None, what: str, compute: Callable[[Path], str]) -> str:
    """``compute(path)``, remembered in a sidecar while (size, mtime_ns, inode) stay the same."""
    path = Path(path)
    if cache_dir is None:
        return compute(path)
    st = path.stat()
    stamp = {"path": str(path.resolve()), "what": what, "size": st.st_size,
             "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    side = _sidecar_path(path, Path(cache_dir), what)
    try:
        rec = json.loads(side.read_text())
        if all(rec.get(k) == v for k, v in stamp.items()) and len(rec.get("sha256", "")) == 64:
            return rec["sha256"]
    except (OSError, ValueError):
        pass
    digest = compute(path)
    # Re-stat: if the file changed while we hashed, do not cache a digest of a moving target.
    st2 = path.stat()
    if (st2.st_size, st2.st_mtime_ns, st2.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino):
        try:
            _write_json_atomic(side, {**stamp, "sha256": digest})
        except OSError:
            pass  # a read-only cache only costs speed
    return digest


def file_identity(path: Path, cache_dir: Path | None) -> str:
    """sha256 of one file; cached by (size, mtime_ns, inode) when ``cache_dir`` is given."""
    return _cached_digest(path, cache_dir, "file", lambda p: sha256_file(p))


def tensors_identity(path: Path, prefix: str, cache_dir: Path | None) -> str:
    """sha256 over (name, dtype, shape, bytes) of the tensors under ``prefix`` in a single-file checkpoint.

    Identifies one component (e.g. the VAE, ``first_stage_model.``) independently of the others, so
    swapping the UNet of a checkpoint does not look like a new VAE.
    """
    from tasks.models.single_file import read_checkpoint  # lazy: keeps this module light

    def compute(p: Path) -> str:
        tensors = read_checkpoint(p, (prefix,))
        h = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    return _cached_digest(path, cache_dir, f"tensors:{prefix}", compute)


def files_identity(files: Iterable[tuple[str, Path]], cache_dir: Path | None) -> str:
    """Combined identity of several files: sha256 over sorted ``name\\0sha256\\n`` lines.

    One file keeps its own sha256 (so a single-file checkpoint's identity equals ``sha256sum``).
    """
    items = sorted((name, file_identity(p, cache_dir)) for name, p in files)
    if len(items) == 1:
        return items[0][1]
    h = hashlib.sha256()
    for name, digest in items:
        h.update(f"{name}\0{digest}\n".encode("utf-8"))
    return h.hexdigest()
