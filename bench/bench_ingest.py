"""Ingest throughput: our crawler (async downloads + threaded verification) vs a plain sequential loop.

Both crawl the same local Danbooru-compatible server (a subprocess, like a remote site) serving a generated
mini-booru whose JPEGs average ~150 KB, and both fully verify every file (md5, full decode, size).

    .venv/bin/python bench/bench_ingest.py --posts 2000
    .venv/bin/python bench/bench_ingest.py --posts 20000 --reference-posts 1000

Prints images/s, MB/s and the peak RSS of each path (each runs in its own process, so ru_maxrss is its own),
and the ratio. The booru is generated once into --cache (≈0.05 s a post at max_side 1344). Target: ≥ 250
verified images/s on a 2-core machine, with a peak RSS that stays flat from 2k to 20k posts.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import cpu_name  # noqa: E402


def peak_rss_mib() -> float:
    """This process's own peak RSS. /proc's VmHWM starts afresh at exec; ru_maxrss would also count the
    parent's size at fork time (the bench driver holding the whole posts list)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the verify workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of another process (the server), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# --- our path ----------------------------------------------------------------------------------------------


def run_ours(url: str, work: Path, concurrency: int, workers: int, verify_mode: str = "process") -> dict:
    import pyarrow.parquet as pq

    from data_contracts.store import ArtifactStore
    from pipeline_config.load import load_config
    from tasks.common.stage import run_stage
    from tasks.ingest.stage import SPEC

    cfg = load_config({
        "data_root": str(work / "data"), "runtime": {"cache_dir": str(work / "cache")},
        "ingest": {"api": {"base_url": url, "requests_per_s": 1000, "concurrency": concurrency,
                           "login_env": "BENCH_NO_LOGIN", "api_key_env": "BENCH_NO_KEY", "timeout_s": 60},
                   "queries": [{"tags": "", "quota": 10**9}], "verify": {"workers": workers, "mode": verify_mode},
                   "filters": {"min_width": 0, "min_height": 0}, "min_per_character": 0},
    })
    store = ArtifactStore(cfg.data_root, local_cache=cfg.runtime.cache_dir)
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    out = run_stage(SPEC, cfg, store)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu0
    posts = pq.read_table(Path(out.output_path) / "posts.parquet", columns=["file_size"])
    # (RUSAGE_CHILDREN's maxrss would report the parent's size at fork time: ask the stage's own figure)
    run = out.manifest.stats["run"]
    workers_rss = (run.get("verify") or {}).get("worker_peak_rss_mib")
    split = {"verify start": (run.get("verify") or {}).get("start_seconds"), "tables": run.get("assemble_seconds"),
             "pictures": run.get("pictures_seconds")}
    return {"rss_steps_mib": run.get("rss_mib"), "crawl_seconds": run.get("crawl_seconds"), "split": split, "images": posts.num_rows, "bytes": sum(posts.column("file_size").to_pylist()), "seconds": seconds,
            "rejects": out.manifest.row_counts["rejects"], "peak_rss_mib": peak_rss_mib(),
            "worker_peak_rss_mib": workers_rss, "cpu_s": cpu}


# --- the reference path: what a straightforward script does ---------------------------------------------------


def run_reference(url: str, work: Path, limit: int) -> dict:
    import requests
    from PIL import Image

    from pipeline_config.ingest import FilterConfig
    from tasks.ingest.filters import PostFilter
    from tasks.ingest.parse import parse_post

    flt = PostFilter(FilterConfig(min_width=0, min_height=0), need_file_url=True)
    out_dir = work / "reference"
    out_dir.mkdir(parents=True, exist_ok=True)
    session = requests.Session()
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    images = nbytes = 0
    page = None
    while images < limit:
        params = {"tags": "", "limit": 200, **({"page": page} if page else {})}
        posts = session.get(f"{url}/posts.json", params=params, timeout=60).json()
        for raw in posts:
            post = parse_post(raw)
            if flt.check(post) is not None:
                continue
            resp = session.get(requests.compat.urljoin(url, post.file_url), timeout=60)
            resp.raise_for_status()
            data = resp.content
            if hashlib.md5(data).hexdigest() != post.md5:
                continue
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.size != (post.width, post.height):
                    continue
            (out_dir / f"{post.md5}.{post.file_ext}").write_bytes(data)
            images += 1
            nbytes += len(data)
            if images >= limit:
                break
        if len(posts) < 200:
            break
        page = f"b{min(p['id'] for p in posts)}"
    return {"images": images, "bytes": nbytes, "seconds": time.perf_counter() - started,
            "peak_rss_mib": peak_rss_mib(), "cpu_s": cpu_seconds() - cpu0}


# --- driver -----------------------------------------------------------------------------------------------------


def child(mode: str, args: argparse.Namespace, url: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--mode", mode, "--url", url, "--work", str(work),
           "--concurrency", str(args.concurrency), "--workers", str(args.workers), "--verify-mode", args.verify_mode,
           "--reference-posts", str(args.reference_posts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-side", type=int, default=1344, help="mini-booru max side (1344 -> ~150 KB JPEGs)")
    ap.add_argument("--cache", type=Path, default=REPO / ".data" / "bench")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="verify workers; 0 = one per core")
    ap.add_argument("--verify-mode", choices=("process", "thread"), default="process")
    ap.add_argument("--reference-posts", type=int, default=400, help="images the sequential reference fetches")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--mode", choices=("ours", "reference"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.mode == "ours":
        print(json.dumps(run_ours(args.url, args.work, args.concurrency, args.workers, args.verify_mode)))
        return
    if args.mode == "reference":
        print(json.dumps(run_reference(args.url, args.work, args.reference_posts)))
        return

    booru = args.cache / f"minibooru-{args.posts}-{args.seed}-{args.max_side}"
    print(f"mini-booru {booru} (generated on first use: ~{args.posts * 0.05 / 60:.0f} min)", flush=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "minibooru", "serve", "--dir", str(booru), "--posts", str(args.posts),
         "--seed", str(args.seed), "--max-side", str(args.max_side)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        url = ""
        for line in server.stdout:  # type: ignore[union-attr]
            if line.startswith("MINIBOORU_URL="):
                url = line.strip().split("=", 1)[1]
                break
        if not url:
            raise SystemExit("the mini-booru server did not start")
        posts = [json.loads(x) for x in (booru / "posts.jsonl").read_text().splitlines() if x.strip()]
        jpgs = [p["file_size"] for p in posts if p.get("md5") and p["file_ext"] == "jpg"]
        print(f"server {url}: {len(posts)} posts, {len(jpgs)} JPEGs, mean JPEG {sum(jpgs) / len(jpgs) / 1024:.0f} KB")
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        results = {}
        for mode in ("ours",) + (() if args.skip_reference else ("reference",)):
            work = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{mode}-"))
            server_cpu0 = proc_cpu_seconds(server.pid)
            try:
                results[mode] = child(mode, args, url, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            r = results[mode]
            r["images_per_s"] = r["images"] / r["seconds"]
            r["server_cpu_s"] = proc_cpu_seconds(server.pid) - server_cpu0
            cpu_ms = (r["cpu_s"] + r["server_cpu_s"]) / r["images"] * 1000
            print(f"{mode:>9}: {r['images']} verified images in {r['seconds']:.1f} s = {r['images_per_s']:.0f} img/s, "
                  f"{r['bytes'] / r['seconds'] / 2**20:.1f} MB/s, peak RSS {r['peak_rss_mib']:.0f} MiB"
                  + (f" (+ {r['worker_peak_rss_mib']:.0f} MiB per verify worker)" if r.get("worker_peak_rss_mib")
                     else ""), flush=True)
            if r.get("crawl_seconds"):  # the stage's own split: crawl + downloads vs fixed costs
                print(f"{'':>9}  crawl + download + verify: {r['crawl_seconds']:.1f} s = "
                      f"{r['images'] / r['crawl_seconds']:.0f} img/s; the rest {r['seconds'] - r['crawl_seconds']:.1f} s: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in r["split"].items() if v is not None), flush=True)
            if r.get("rss_steps_mib"):
                print(f"{'':>9}  RSS by step (MiB): {r['rss_steps_mib']}", flush=True)
            cores = (os.cpu_count() or 1) if mode == "ours" else 1  # the reference is one sequential loop
            print(f"{'':>9}  CPU {r['cpu_s'] / r['images'] * 1000:.2f} ms/img client + "
                  f"{r['server_cpu_s'] / r['images'] * 1000:.2f} ms/img server -> at most "
                  f"{cores * 1000 / cpu_ms:.0f} img/s on {cores} idle core(s)", flush=True)
        print(f"load average during the run: {os.getloadavg()[0]:.1f} (other work on the machine lowers img/s)")
        if "reference" in results:
            ratio = results["ours"]["images_per_s"] / results["reference"]["images_per_s"]
            print(f"ratio ours/reference: {ratio:.2f}x")
        target = results["ours"]["images_per_s"] >= 250
        print(f"target >= 250 img/s with verification: {'met' if target else 'NOT met'}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
