"""The Prefect UI shows a stage's report with its pictures while no file server runs: real server, headless Chromium.

A bucket contact sheet of two solid-colour images is made by tasks/bucket/visuals.py into a stage output
folder under a data root, a flow run publishes the outcome through flows/publish.publish_outcome (the
`fm-<stage>-report` markdown artifact), naming a data file server that is down (as after `fm up` stopped),
and Chromium renders the report's UI page. The screenshot must contain both colours in blocks the size of a
thumbnail: only the picture inside the artifact itself, served by the Prefect server's own origin, can put
them there.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.publish import artifact_key

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (apt-get install chromium; .ci/run installs it)")

COLOURS = [(231, 17, 201), (17, 201, 231)]  # not in Prefect's palette
CAPTION = "bucket 64x64"

PUBLISH = r"""
import json, sys
from prefect import flow
from data_contracts.bucket import BucketManifest
from flows.publish import publish_outcome
from tasks.common.stage import StageOutcome, StageReport

args = json.loads(sys.argv[1])

@flow(name="ui-screenshot")
def publish():
    manifest = BucketManifest(stage="bucket", contract_version=BucketManifest.CONTRACT_VERSION,
                              fingerprint=args["fingerprint"], config_digest="test", code_version="test")
    outcome = StageOutcome(manifest, False, StageReport(images=args["images"]), args["output"], 0.0)
    return publish_outcome(outcome, files=(args["url"], args["root"]))

print("MADE=" + json.dumps(publish()))
"""


def dead_url() -> str:
    """The address of a file server that is not running (a port nobody listens on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def make_stage_output(data_root: Path) -> tuple[Path, dict[str, str]]:
    """A bucket output folder with the bucket stage's contact sheet of two solid-colour images."""
    import pyarrow as pa

    from data_contracts.bucket import BUCKETS_SCHEMA
    from data_contracts.ingest import POSTS_SCHEMA
    from tasks.bucket.visuals import make_bucket_sheets

    pool = data_root / "pool"
    (pool / "images").mkdir(parents=True)
    posts, buckets = [], []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (120, 120), colour).save(pool / "images" / f"{i}.png")
        posts.append({"id": i + 1, "md5": f"{i}", "image_path": f"images/{i}.png", "width": 120, "height": 120})
        buckets.append({"id": i + 1, "width": 120, "height": 120, "bucket_w": 64, "bucket_h": 64, "resize_w": 64,
                        "resize_h": 64, "crop_left": 0, "crop_top": 0, "crop_right": 64, "crop_bottom": 64,
                        "flip": False})
    out = data_root / "bucket" / "fp0001"
    images = make_bucket_sheets(pa.Table.from_pylist(buckets, BUCKETS_SCHEMA),
                                pa.Table.from_pylist(posts, POSTS_SCHEMA), pool, out)
    assert list(images) == [CAPTION]
    return out, images


def api_post(api_url: str, path: str, body: dict) -> list | dict:
    req = urllib.request.Request(f"{api_url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def colour_pixels(png: Path, colour: tuple[int, int, int]) -> int:
    px = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(px - np.array(colour)).max(-1) <= 3).sum())


def test_prefect_ui_renders_a_stage_report_with_its_pictures_while_the_file_server_is_down(prefect_env, tmp_path):
    data_root = tmp_path / "data"
    out, images = make_stage_output(data_root)
    url = dead_url()
    args = {"fingerprint": "fp0001", "images": images, "output": str(out), "url": url, "root": str(data_root)}
    env = dict(prefect_env, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", PUBLISH, json.dumps(args)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    made = json.loads(run.stdout.split("MADE=")[-1])
    key = artifact_key("fm", "bucket", "report")
    assert made[key] == "markdown"
    assert not any("-img-" in k for k in made), made  # no per-picture cards any more

    api_url = prefect_env["PREFECT_API_URL"]
    # The session's server also holds other tests' bucket reports under this key: this run's names its output.
    found = [a for a in api_post(api_url, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})
             if str(out) in (a.get("data") or "")]
    assert len(found) == 1 and found[0]["type"] == "markdown"
    assert "](data:image/" in found[0]["data"]  # the picture travels inside the artifact

    page = f"{api_url.removesuffix('/api')}/artifacts/artifact/{found[0]['id']}"
    shot = tmp_path / "ui.png"
    counts: list[int] = []
    for budget in (10_000, 30_000):  # a loaded machine may need longer for the SPA to fetch
        shot.unlink(missing_ok=True)
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}",
                        f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars",
                        f"--virtual-time-budget={budget}", page],
                       capture_output=True, timeout=90, env=dict(os.environ, HOME=str(tmp_path)))
        assert shot.is_file(), f"chromium wrote no screenshot of {page}"
        counts = [colour_pixels(shot, c) for c in COLOURS]
        if min(counts) >= 100 * 100:
            break
    # Each thumbnail is 160 x 160 px of its colour (less a 2-px crop-box outline): at least 100 x 100 each.
    assert min(counts) >= 100 * 100, f"screenshot {shot} shows {counts} px of {COLOURS}: the picture did not render"
