"""What a stage publishes to Prefect: one report page per stage with its pictures inline (data: URIs of small
thumbnails within a size budget), its tables (first rows) and the manifest path, plus a few keyed summaries;
progress artifacts that end at 100 % or say "failed". The page needs no file server: it holds the pictures.
"""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_contracts.bucket import BucketManifest
from flows.publish import (
    REPORT_MAX_BYTES,
    REPORT_TABLE_ROWS,
    THUMB_WIDTH,
    markdown_table,
    report_markdown,
)
from tasks.common.stage import StageOutcome, StageReport

ROOT = Path(__file__).resolve().parents[2]
DATA_URI = re.compile(r"!\[([^\]]*)\]\((data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+))\)")


def outcome(folder: Path, report: StageReport) -> StageOutcome:
    manifest = BucketManifest(stage="bucket", contract_version=BucketManifest.CONTRACT_VERSION, fingerprint="fp0001",
                              config_digest="test", code_version="test", row_counts={"buckets": 3})
    return StageOutcome(manifest, False, report, str(folder), 1.5)


def decode(uri_b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri_b64))).convert("RGB")


def test_report_inlines_pictures_as_thumbnails_without_any_file_server(tmp_path):
    out = tmp_path / "elsewhere" / "bucket" / "fp0001"  # a data_root no file server serves
    out.mkdir(parents=True)
    Image.new("RGB", (1600, 400), (231, 17, 201)).save(out / "wide.png")
    Image.new("RGB", (200, 100), (17, 201, 231)).save(out / "small.png")
    report = StageReport(summary_md="two pictures", images={"wide [sheet]": "wide.png", "small": "small.png"})
    md = report_markdown(outcome(out, report))
    found = DATA_URI.findall(md)
    assert [alt for alt, *_ in found] == ["wide (sheet)", "small"]
    wide, small = (decode(b64) for *_, b64 in found)
    assert wide.size == (THUMB_WIDTH, 160)  # scaled to the thumbnail width, aspect kept
    assert small.size == (200, 100)  # never scaled up
    assert np.abs(np.asarray(wide).astype(int) - (231, 17, 201)).max() <= 3
    assert np.abs(np.asarray(small).astype(int) - (17, 201, 231)).max() <= 3
    # no link a browser would have to fetch: no file:// URLs, no loopback server
    assert "file://" not in md and "http://" not in md
    assert f"`{out}/manifest.json`" in md and "two pictures" in md


def test_report_stays_within_its_size_budget(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for i in range(12):  # noise compresses badly: 12 of them cannot all fit at full thumbnail size
        Image.fromarray(rng.integers(0, 255, (900, 900, 3), dtype=np.uint8)).save(tmp_path / f"n{i}.png")
        images[f"noise {i}"] = f"n{i}.png"
    md = report_markdown(outcome(tmp_path, StageReport(images=images)))
    assert len(md.encode()) <= REPORT_MAX_BYTES
    inlined = DATA_URI.findall(md)
    assert len(inlined) >= 6, "the budget should hold several smaller thumbnails"
    noted = [f"noise {i}" for i in range(12) if f"**noise {i}** — not inlined, over the page's size budget" in md]
    assert len(inlined) + len(noted) == 12  # every picture is either shown or named
    assert all(decode(b64).width <= THUMB_WIDTH for *_, b64 in inlined)

    # a smaller budget, with full-size links through a file server lengthening every caption
    small = report_markdown(outcome(tmp_path, StageReport(images=images)), files=("http://127.0.0.1:4210", str(tmp_path)),
                            max_bytes=200_000)
    assert len(small.encode()) <= 200_000 and DATA_URI.search(small)
    assert "[full size](http://127.0.0.1:4210/n0.png)" in small


def test_report_tables_are_capped_markdown_tables(tmp_path):
    rows = [{"tag": f"a|b {i}", "count": i, "share": i / 3, "empty": None} for i in range(60)]
    md = report_markdown(outcome(tmp_path, StageReport(tables={"tags": rows, "none": []})))
    assert "### tags (60 rows)" in md and "### none" not in md
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| tag | count | share |"  # the column empty in every shown row is left out
    assert lines[2] == "| a\\|b 0 | 0 | 0 |" and lines[3] == "| a\\|b 1 | 1 | 0.3333 |"
    assert sum(1 for line in lines if line.startswith("| a")) == REPORT_TABLE_ROWS
    assert f"first {REPORT_TABLE_ROWS} of 60 rows" in table


def test_a_missing_picture_is_a_note_not_a_failure(tmp_path):
    md = report_markdown(outcome(tmp_path, StageReport(images={"gone": "nope.png"})))
    assert "**gone** — not inlined, unreadable (FileNotFoundError): `nope.png`" in md


# ---------------------------------------------------------------------------------------------- real server
FM = r"""
import json, sys
from flows.fm import fm
for args in json.loads(sys.argv[1]):
    state = fm(config="demo", stages=args["stages"], overrides=args["overrides"], return_state=True)
    print("RUN=" + json.dumps({"id": str(state.state_details.flow_run_id), "completed": state.is_completed()}),
          flush=True)
"""


def run_fm(env: dict[str, str], runs: list[tuple[list[str], list[str]]]) -> list[dict]:
    """`fm(...)` for each (stages, overrides), one after the other in one fresh Python process (Prefect and the
    stages imported once) against the server in env; each run's flow run id and whether it completed."""
    args = [{"stages": stages, "overrides": overrides} for stages, overrides in runs]
    proc = subprocess.run([sys.executable, "-c", FM, json.dumps(args)],
                          env=dict(env, PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    found = [json.loads(line.split("RUN=", 1)[1]) for line in proc.stdout.splitlines() if "RUN=" in line]
    assert len(found) == len(runs), proc.stdout[-3000:] + proc.stderr[-3000:]
    return found


def run_artifacts(api_url: str, flow_run_id: str) -> dict[str, dict]:
    req = urllib.request.Request(f"{api_url}/artifacts/filter", method="POST",
                                 data=json.dumps({"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        found = json.loads(resp.read())
    return {a["key"]: a for a in found if a.get("key")}


@pytest.mark.integration
def test_a_run_publishes_one_report_per_stage_and_progress_that_finishes(prefect_env, tmp_path):
    api_url = prefect_env["PREFECT_API_URL"]
    overrides = [f"data_root={tmp_path / 'data'}", f"runtime.cache_dir={tmp_path / 'cache'}",
                 "ingest.embedded.posts=60", "ingest.embedded.max_side=384", "tag.shard_size=16"]
    # the stages, then tag again (complete output: cached), then bucket (its upstream, quality, was never built)
    run, again, failed = run_fm(prefect_env, [(["ingest", "dedup", "tag"], overrides), (["tag"], overrides),
                                              (["bucket"], overrides)])
    assert run["completed"]
    arts = run_artifacts(api_url, run["id"])
    for stage in ("ingest", "tag"):
        keys = sorted(k for k in arts if k.startswith(f"fm-{stage}-"))
        tables = [k for k in keys if arts[k]["type"] == "table"]
        assert len(tables) == 1, keys  # the main table only: every table is inside the report
        assert set(keys) == {f"fm-{stage}-report", f"fm-{stage}-summary", f"fm-{stage}-manifest",
                             f"fm-{stage}-progress", *tables}
        progress = arts[f"fm-{stage}-progress"]
        assert progress["data"] == 100.0 and progress["description"] == f"{stage}: done", progress
        report = arts[f"fm-{stage}-report"]
        assert report["type"] == "markdown" and f"{tmp_path / 'data'}/{stage}/" in report["data"]
        assert len(report["data"].encode()) <= REPORT_MAX_BYTES
    assert DATA_URI.search(arts["fm-ingest-report"]["data"]), "the ingest contact sheets are not inline"

    assert again["completed"]  # complete output: cached, still 100 %
    progress = run_artifacts(api_url, again["id"])["fm-tag-progress"]
    assert progress["data"] == 100.0 and "cached" in progress["description"]

    assert not failed["completed"]  # its upstream (quality) was never built
    progress = run_artifacts(api_url, failed["id"])["fm-bucket-progress"]
    assert "failed" in progress["description"] and "quality" in progress["description"], progress
