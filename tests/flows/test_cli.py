"""The `fm` command line as a user runs it (real subprocesses)."""
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def fm(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_bad_override_is_a_clear_error_and_exit_2():
    proc = fm("inspect", "bucket", "-o", "bucket.resolutoin=512")
    assert proc.returncode == 2
    assert "bucket.resolutoin" in proc.stderr and "resolution" in proc.stderr


def test_inspect_without_output_says_what_to_run(tmp_path):
    proc = fm("inspect", "bucket", "-o", f"data_root={tmp_path}")
    assert proc.returncode == 2 and "fm run bucket" in proc.stderr


def test_sample_writes_pngs_with_parameters(tmp_path):
    out = tmp_path / "samples"
    proc = fm("sample", "builtin:tiny-sd15", "1girl, (smile:1.2)", "--steps", "3", "--width", "64",
              "--height", "64", "--out", str(out), "--cache-dir", str(ROOT / ".data" / "cache"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = [Path(line) for line in proc.stdout.split() if line.endswith(".png")]
    assert pngs and all(p.exists() for p in pngs)
    image = Image.open(pngs[0])
    assert image.size == (64, 64)
    assert "1girl, (smile:1.2)" in image.text["parameters"] and "Steps: 3" in image.text["parameters"]


def test_run_validates_config_and_stage_names_before_anything_starts(tmp_path):
    import time

    started = time.monotonic()
    typo = fm("run", "bucket", "-o", "bucket.resolutoin=512", "-o", f"data_root={tmp_path}")
    stage = fm("run", "bukcet", "-o", f"data_root={tmp_path}")
    elapsed = time.monotonic() - started
    assert typo.returncode == 2 and "bucket.resolutoin" in typo.stderr
    assert stage.returncode == 2 and "did you mean 'bucket'" in stage.stderr
    for proc in (typo, stage):
        assert "Traceback" not in proc.stderr and "temporary server" not in proc.stdout + proc.stderr
        assert proc.stderr.count("error:") == 1  # said once
    assert elapsed < 20  # two interpreter start-ups, no Prefect server (that alone takes 8-26 s)
    assert not any(tmp_path.iterdir())  # nothing was written
