"""Check a committed output against its manifest: every file there, intact, nothing unlisted, row counts true.

Row counts are matched to tables by name: a count `k` is the rows of `k.parquet`, or of every Parquet file
under `k/` (the cache's `chunks/`); a count with neither is reported, since the manifest then promises rows
that no file holds (the state two racing commits once left behind).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from data_contracts.errors import ContractError
from data_contracts.manifest import MANIFEST_NAME, StageManifest
from data_contracts.store import ArtifactStore


@dataclass
class Verification:
    files: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # count name -> rows found in its tables
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def table_files(manifest: StageManifest, count: str) -> list[str]:
    """The listed Parquet files that hold the rows of row count `count`."""
    single = f"{count}.parquet"
    if any(f.path == single for f in manifest.files):
        return [single]
    return [f.path for f in manifest.files_under(f"{count}/") if f.path.endswith(".parquet")]


def verify_output(store: ArtifactStore, manifest: StageManifest, *, checksums: bool = True) -> Verification:
    """Every problem of a committed output, in words (an empty list: it is complete and consistent)."""
    out = Verification()
    local: dict[str, Path] = {}
    for entry in manifest.files:
        try:
            local[entry.path] = store.path(manifest, entry.path, verify=checksums)
            out.files += 1
        except ContractError as exc:
            out.problems.append(str(exc))
    if store.is_local:
        folder = Path(store.output_path(manifest.stage, manifest.fingerprint))
        listed = {f.path for f in manifest.files} | {MANIFEST_NAME}
        extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file() and p.relative_to(folder).as_posix() not in listed)
        if extra:
            out.problems.append(f"{len(extra)} file(s) in {folder} are not in the manifest (e.g. {extra[0]}): "
                                "the folder was changed after its commit")
    for count, expected in manifest.row_counts.items():
        paths = table_files(manifest, count)
        if not paths:
            if expected:
                out.problems.append(f"row count {count!r} = {expected} but the manifest lists no {count}.parquet "
                                    f"nor Parquet files under {count}/")
            continue
        try:
            found = sum(pq.ParquetFile(local[p]).metadata.num_rows for p in paths)
        except KeyError:
            continue  # a missing file: already reported above
        except Exception as exc:  # noqa: BLE001 - an unreadable table is a finding, not a crash
            out.problems.append(f"{count}: cannot read its table(s) ({type(exc).__name__}: {exc})")
            continue
        out.rows[count] = found
        if found != expected:
            out.problems.append(f"row count {count!r}: manifest says {expected}, its table(s) hold {found}")
    return out
