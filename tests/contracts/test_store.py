import json
import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from data_contracts.errors import ContractError, StageError
from data_contracts.fingerprint import stage_fingerprint
from data_contracts.ingest import IngestManifest
from data_contracts.manifest import MANIFEST_NAME
from data_contracts.quality import QUALITY_SCHEMA, QualityManifest
from data_contracts.store import ArtifactStore
from data_contracts.tables import read_table, write_table

QUALITY_ROWS = pa.table({"id": [1, 2], "year": [2020, 2021], "norm_score": [0.1, 0.9],
                         "label": ["bad score", "masterpiece"], "cluster": [1, 3]})


def _manifest(fp="abc", **kw):
    return QualityManifest(stage="quality", contract_version=1, fingerprint=fp, config_digest="d",
                           code_version="1", method="kmeans", **kw)


def test_commit_then_read_round_trip(tmp_path):
    store = ArtifactStore(str(tmp_path))
    work = store.begin("quality", "abc", resume=False)
    write_table(QUALITY_ROWS, work / "quality.parquet", QUALITY_SCHEMA)
    committed = store.commit(_manifest(row_counts={"quality": 2}), work)
    assert not work.exists()
    assert store.current("quality") == "abc"
    again = store.read_manifest(QualityManifest)
    assert again == committed
    entry = again.file("quality.parquet")
    assert entry.size == (tmp_path / "quality" / "abc" / "quality.parquet").stat().st_size
    table = read_table(store.path(again, "quality.parquet", verify=True), QUALITY_SCHEMA)
    assert table.column("label").to_pylist() == ["bad score", "masterpiece"]


def test_commit_on_a_local_root_refuses_files_that_exist_only_elsewhere(tmp_path):
    """`published` files live on object storage only; on a local root every file must be in the work folder,
    or the manifest would list a file nobody can read."""
    from data_contracts.manifest import FileEntry

    store = ArtifactStore(str(tmp_path))
    work = store.begin("quality", "abc", resume=False)
    write_table(QUALITY_ROWS, work / "quality.parquet", QUALITY_SCHEMA)
    ghost = FileEntry(path="chunks/part-0.parquet", size=10, sha256="0" * 64)
    with pytest.raises(StageError, match="chunks/part-0.parquet"):
        store.commit(_manifest(), work, published={"chunks/part-0.parquet.0000": ghost})
    assert store.current("quality") is None and work.exists()  # nothing committed; the work can resume
    here = store.commit(_manifest(), work)
    assert [f.path for f in here.files] == ["quality.parquet"]


def test_commit_on_object_storage_copies_published_files_and_refuses_a_clash(tmp_path):
    """Files another machine published (under content-addressed names) are copied into the output on the
    store and listed with the size and sha256 given; a published file that is also in the work folder is
    refused (which bytes are meant?). fsspec's in-memory filesystem stands in for the object store."""
    import hashlib

    import fsspec

    from data_contracts.manifest import FileEntry

    fsspec.filesystem("memory").store.clear()
    store = ArtifactStore("memory://bucket/root", tmp_path / "cache")
    work = store.begin("quality", "abc", resume=False)
    write_table(QUALITY_ROWS, work / "quality.parquet", QUALITY_SCHEMA)
    data = b"chunk bytes"
    sha = hashlib.sha256(data).hexdigest()
    store.fs.pipe_file(f"bucket/root/quality/_work/abc/chunks/c.parquet.{sha[:16]}", data)
    entry = FileEntry(path="chunks/c.parquet", size=len(data), sha256=sha)
    clash = FileEntry(path="quality.parquet", size=1, sha256="0" * 64)
    with pytest.raises(StageError, match="quality.parquet"):
        store.commit(_manifest(), work, published={"other.parquet.0000": clash})
    assert not store.fs.exists("bucket/root/quality/abc/manifest.json")
    m = store.commit(_manifest(), work, published={f"chunks/c.parquet.{sha[:16]}": entry})
    assert [f.path for f in m.files] == ["chunks/c.parquet", "quality.parquet"]
    assert store.path(m, "chunks/c.parquet", verify=True).read_bytes() == data
    assert not store.fs.exists("bucket/root/quality/_work/abc")  # the published copies went with the work folder


def test_output_without_manifest_is_never_read_and_cleaned(tmp_path):
    store = ArtifactStore(str(tmp_path))
    folder = tmp_path / "quality" / "half"
    folder.mkdir(parents=True)
    (folder / "quality.parquet").write_bytes(b"partial")
    assert not store.is_complete("quality", "half")
    with pytest.raises(StageError, match="incomplete"):
        store.read_manifest(QualityManifest, "half")
    assert store.current("quality") is None
    removed = store.clean_incomplete("quality", keep=set())
    assert any("half" in r for r in removed) and not folder.exists()


def test_kill_between_data_file_and_manifest_leaves_nothing_readable(tmp_path):
    """A real process is SIGKILLed after writing the data file, before the commit."""
    script = textwrap.dedent(f"""
        import os, signal, pyarrow as pa
        from data_contracts.store import ArtifactStore
        from data_contracts.tables import write_table
        from data_contracts.quality import QUALITY_SCHEMA
        store = ArtifactStore({str(tmp_path)!r})
        work = store.begin("quality", "fp1", resume=False)
        t = pa.table({{"id": [1], "year": [2020], "norm_score": [0.5], "label": ["good score"], "cluster": [2]}})
        write_table(t, work / "quality.parquet", QUALITY_SCHEMA)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -signal.SIGKILL
    store = ArtifactStore(str(tmp_path))
    assert not store.is_complete("quality", "fp1")
    assert store.current("quality") is None
    with pytest.raises(StageError):
        store.read_manifest(QualityManifest)
    store.clean_incomplete("quality", keep=set())
    assert not (tmp_path / "quality" / "_work" / "fp1").exists()


def test_force_rewrite_replaces_complete_output(tmp_path):
    store = ArtifactStore(str(tmp_path))
    for n in (1, 2):
        work = store.begin("quality", "abc", resume=False)
        write_table(QUALITY_ROWS.slice(0, n), work / "quality.parquet", QUALITY_SCHEMA)
        store.commit(_manifest(row_counts={"quality": n}), work, replace=True)  # a forced rebuild
    assert store.read_manifest(QualityManifest).row_counts == {"quality": 2}
    assert not list((tmp_path / "quality").glob(".old-*"))


def test_contract_version_mismatch_names_file_field_expected_found(tmp_path):
    store = ArtifactStore(str(tmp_path))
    work = store.begin("quality", "abc", resume=False)
    store.commit(_manifest(), work)
    path = tmp_path / "quality" / "abc" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["contract_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(ContractError) as err:
        store.read_manifest(QualityManifest)
    msg = str(err.value)
    assert str(path) in msg and "contract_version" in msg and "expected 1" in msg and "found 99" in msg


def test_manifest_of_another_stage_rejected(tmp_path):
    from data_contracts.manifest import parse_manifest

    raw = _manifest().to_json()
    with pytest.raises(ContractError, match="field 'stage' expected 'ingest', found 'quality'"):
        parse_manifest(raw, IngestManifest, "somewhere/manifest.json")


def test_table_schema_mismatch_names_field(tmp_path):
    good = QUALITY_ROWS.cast(QUALITY_SCHEMA)
    other = good.set_column(2, "norm_score", pa.array(["high", "low"]))
    import pyarrow.parquet as pq
    pq.write_table(other, tmp_path / "q.parquet")
    with pytest.raises(ContractError) as err:
        read_table(tmp_path / "q.parquet", QUALITY_SCHEMA)
    assert "norm_score" in str(err.value) and "float" in str(err.value) and "string" in str(err.value)


def test_truncated_file_detected_by_size_and_checksum(tmp_path):
    store = ArtifactStore(str(tmp_path))
    work = store.begin("quality", "abc", resume=False)
    write_table(QUALITY_ROWS, work / "quality.parquet", QUALITY_SCHEMA)
    manifest = store.commit(_manifest(), work)
    path = tmp_path / "quality" / "abc" / "quality.parquet"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ContractError, match="truncated"):
        store.path(manifest, "quality.parquet")
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ContractError, match="sha256"):
        store.path(manifest, "quality.parquet", verify=True)


def test_fingerprint_changes_with_every_input():
    base = dict(stage="bucket", contract_version=1, config_section={"area": 262144},
                upstream={"ingest": "a", "quality": "b"}, code_version="1")
    fp = stage_fingerprint(**base)
    assert fp == stage_fingerprint(**base)
    assert stage_fingerprint(**{**base, "upstream": {"quality": "b", "ingest": "a"}}) == fp
    for change in ({"contract_version": 2}, {"config_section": {"area": 1}}, {"code_version": "2"},
                   {"upstream": {"ingest": "a", "quality": "c"}}):
        assert stage_fingerprint(**{**base, **change}) != fp
