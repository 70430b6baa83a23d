"""kill -9 at several points of a real crawl (a subprocess against a slowed loopback server), then rerun:
identical posts.parquet and image set as an uninterrupted run, and no finished download is fetched twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from tests.ingest.test_stage import make_cfg, run

REPO = Path(__file__).resolve().parents[2]
CHILD = """
import json, sys
from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config
from tasks.common.stage import run_stage
from tasks.ingest.stage import SPEC
cfg = load_config(json.loads(sys.argv[1]))
out = run_stage(SPEC, cfg, ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir))
print(json.dumps({"fingerprint": out.manifest.fingerprint, "posts": out.manifest.row_counts["posts"]}))
"""


def _lines(root: Path, name: str) -> int:
    return sum(p.read_bytes().count(b"\n") for p in root.glob(f"ingest/_work/*/journal/{name}"))


def _pool_images(root: Path) -> set[str]:
    images = root / "pool" / "images"
    return {p.relative_to(images).as_posix() for p in images.rglob("*")
            if p.is_file() and ".incoming" not in p.parts} if images.exists() else set()


def _start(tree: dict, tmp: Path) -> subprocess.Popen:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), json.dumps(tree)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the crawl ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)  # verify worker processes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    gone, alive = psutil.wait_procs(workers, timeout=10)  # their stdin closed with the parent: they exit
    assert not alive, f"orphaned workers: {alive}"


def test_kill_9_then_rerun_gives_identical_output_and_no_second_download(minibooru, minibooru_server, tmp_path):
    ingest = {"queries": [{"tags": "hanasaki_gakuen", "quota": 1000}, {"tags": "", "quota": 1000, "name": "all"}],
              "api": {"page_limit": 5, "concurrency": 2}, "verify": {"mode": "process"}}
    # the uninterrupted reference run
    ref_cfg = make_cfg(tmp_path / "ref", minibooru_server.url, **ingest)
    ref, ref_store = run(ref_cfg)
    ref_posts = pq.read_table(Path(ref.output_path) / "posts.parquet")
    ref_rejects = pq.read_table(Path(ref.output_path) / "rejects.parquet")
    assert ref_posts.num_rows > 30

    # the same crawl, slowed down, killed twice: in the page crawl, then in the middle of the downloads
    minibooru_server.reset_stats()
    minibooru_server.faults.api_delay_s = 0.05
    minibooru_server.faults.slow_ids = {r["id"] for r in minibooru.load_posts()}
    minibooru_server.faults.delay_s = 0.06
    cfg = make_cfg(tmp_path / "run", minibooru_server.url, **ingest)
    tree = cfg.model_dump(mode="json")
    root = Path(cfg.data_root)
    done_at_kill: list[set[str]] = []
    hits_at_kill: list[dict[int, int]] = []

    proc = _start(tree, tmp_path)
    _kill_when(proc, lambda: _lines(root, "pages.jsonl") >= 3 and len(_pool_images(root)) >= 2)
    done_at_kill.append(_pool_images(root))
    hits_at_kill.append(dict(minibooru_server.stats.file_hits))
    assert len(done_at_kill[0]) < ref_posts.num_rows

    proc = _start(tree, tmp_path)
    _kill_when(proc, lambda: len(_pool_images(root)) >= len(done_at_kill[0]) + ref_posts.num_rows // 3)
    done_at_kill.append(_pool_images(root))
    hits_at_kill.append(dict(minibooru_server.stats.file_hits))
    assert len(done_at_kill[1]) < ref_posts.num_rows

    proc = _start(tree, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["fingerprint"] == ref.manifest.fingerprint  # data_root is not part of the fingerprint

    final = root / "ingest" / result["fingerprint"]
    assert pq.read_table(final / "posts.parquet").equals(ref_posts)
    assert pq.read_table(final / "rejects.parquet").equals(ref_rejects)
    assert _pool_images(root) == _pool_images(Path(ref_cfg.data_root))
    assert set(ref_posts.column("image_path").to_pylist()) == {f"images/{p}" for p in _pool_images(root)}
    assert not list((root / "pool" / "images" / ".incoming").iterdir())  # temp files of killed runs cleaned
    assert not (root / "ingest" / "_work").exists() or not any((root / "ingest" / "_work").iterdir())

    # no file that was complete at a kill was fetched again; at most the in-flight ones were repeated
    id_of = {f"{r['md5'][:2]}/{r['md5']}.{r['file_ext']}": r["id"] for r in minibooru.load_posts() if r.get("md5")}
    hits = minibooru_server.stats.file_hits
    for done, before in zip(done_at_kill, hits_at_kill):
        for rel in done:
            assert hits[id_of[rel]] == before[id_of[rel]], rel
    assert all(n <= 3 for n in hits.values())
    assert sum(hits.values()) <= ref_posts.num_rows + 2 * 2  # two kills x concurrency 2 in flight
    # the page crawl resumed from its cursor: no page was asked more than twice (once more after a kill)
    pages = [(q["tags"], q["page"]) for q in minibooru_server.stats.api_queries]
    assert max(pages.count(p) for p in set(pages)) <= 2
    assert len(pages) <= len(set(pages)) + 2
