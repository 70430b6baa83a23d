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


# --- issue 23: help that explains itself, `fm status`, quiet logs --------------------------------------------
def _subparsers():
    import argparse

    from flows.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_that_shows_its_default():
    missing = []
    for name, sub in _subparsers().items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest == "help":
                continue
            text = formatter._expand_help(action) if action.help else ""
            if not text:
                missing.append(f"{name} {action.dest}: no help")
            elif action.option_strings and not action.required and "default" not in text:
                missing.append(f"{name} {'/'.join(action.option_strings)}: no default in {text!r}")
    assert not missing, "\n".join(missing)


def test_run_help_lists_the_stages():
    from tasks.registry import implemented_stages

    proc = fm("run", "--help")
    assert proc.returncode == 0
    assert " -> ".join(implemented_stages()) in proc.stdout
    flat = " ".join(proc.stdout.split())  # argparse wraps to the terminal width
    assert "(default: demo)" in flat and "(default: off)" in flat


def _table(n: int):
    import pyarrow as pa

    schema = pa.schema([("id", pa.int64())])
    return pa.table({"id": list(range(n))}, schema=schema), schema


def test_status_shows_each_stage_state(tmp_path):
    """complete (fresh), stale (fingerprint differs), in progress (a work folder), locked (a held stage lock),
    missing: one row each, with rows, size, age and path."""
    import os

    from data_contracts.ingest import IngestManifest
    from data_contracts.lock import StageLock
    from data_contracts.store import ArtifactStore
    from data_contracts.tag import TagManifest
    from pipeline_config.load import load_config
    from tasks.common.stage import compute_fingerprint
    from tasks.registry import stage_spec
    from tests.stage_helpers import commit_output

    root = tmp_path / "root"
    cfg = load_config("demo", [f"data_root={root}"])
    store = ArtifactStore.for_config(cfg)
    fresh = compute_fingerprint(stage_spec("ingest"), cfg, {})
    commit_output(store, IngestManifest, {"posts.parquet": _table(3), "rejects.parquet": _table(1)},
                  fields={"source": "danbooru_api"}, fingerprint=fresh)
    commit_output(store, TagManifest, {"tags.parquet": _table(3)}, upstream={"ingest": fresh},
                  fields={"model_name": "x", "model_identity": "y", "backend": "onnx", "thresholds": {}},
                  fingerprint="0123456789abcdef")
    (root / "quality" / "_work" / "feedfacefeedface").mkdir(parents=True)
    with StageLock(store, "bucket", note="test holder"):
        proc = fm("status", "-o", f"data_root={root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines() if line.startswith(" ")
             and line.split(":")[0].strip() in ("ingest", "dedup", "tag", "quality", "bucket", "cache", "train", "eval")}
    assert "complete" in lines["ingest"] and f"{root}/ingest/{fresh}" in lines["ingest"]
    assert "missing" in lines["dedup"] and "fm run dedup" in lines["dedup"]
    assert "stale" in lines["tag"] and "upstream dedup not up to date" in lines["tag"]
    assert "in progress" in lines["quality"] and "_work/feedfacefeedface" in lines["quality"]
    assert "locked" in lines["bucket"] and f"pid {os.getpid()}" in lines["bucket"] and "test holder" in lines["bucket"]
    for stage in ("cache", "train", "eval"):
        assert "missing" in lines[stage] and f"fm run {stage}" in lines[stage]
    assert "posts=3" in proc.stdout and "tags=3" in proc.stdout  # rows of the complete and the stale output
    assert "Traceback" not in proc.stderr


def test_status_of_an_unused_data_root_writes_nothing(tmp_path):
    proc = fm("status", "-o", f"data_root={tmp_path / 'never'}")
    assert proc.returncode == 0 and "does not exist yet" in proc.stdout
    assert not (tmp_path / "never").exists()


def _run_side_by_side(commands: list[list[str]], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run the commands at once (each mostly imports heavy libraries) and return them in order, finished."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for c in commands]
    done = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def test_importing_tasks_silences_the_bitsandbytes_kernel_warning():
    """bitsandbytes' CPU backend warns on every import about an untrusted Hub kernel. Since `import tasks` defers
    bitsandbytes to its first use, the package is loaded here by that use (the 8-bit optimiser's module)."""
    code = "{}from diffusers import UNet2DConditionModel\nimport bitsandbytes\nbitsandbytes.optim"
    noisy, quiet = _run_side_by_side([[sys.executable, "-c", code.format("")],
                                      [sys.executable, "-c", code.format("import tasks; ")]])
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "kernels-community" not in quiet.stderr
    if "kernels-community" not in noisy.stderr:
        import pytest

        pytest.skip("this CPU/bitsandbytes does not emit the warning: nothing to silence here")


def test_run_environment_hides_the_shard_bars():
    """The train stage's export (transformers' save_pretrained) drew "Writing model shards" tqdm bars in the log:
    `fm run` / `fm up` set the environment that turns them off, for themselves and their flow-run processes."""
    save = ("import tempfile\nfrom transformers import CLIPTextConfig, CLIPTextModel\n"
            "cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,"
            " vocab_size=49408)\nCLIPTextModel(cfg).save_pretrained(tempfile.mkdtemp())\n")
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    quiet, noisy = _run_side_by_side([[sys.executable, "-c", "from flows.cli import quiet_third_party_output\n"
                                       "quiet_third_party_output()\n" + save], [sys.executable, "-c", save]], env=env)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Writing model shards" not in quiet.stderr and "it/s" not in quiet.stderr
    assert "Writing model shards" in noisy.stderr  # the control: without it the bar is there


def test_bitsandbytes_loads_only_when_the_8bit_optimiser_is_used():
    """diffusers imports bitsandbytes (~1.3 s of CPU a process beyond what diffusers itself imports): after
    `import tasks` it is a stand-in that imports the package on first use, and the 8-bit optimiser still steps."""
    code = ("import sys, torch, tasks\nfrom diffusers import UNet2DConditionModel\n"
            "import transformers, accelerate\n"
            "assert 'bitsandbytes.optim' not in sys.modules, 'diffusers loaded bitsandbytes'\n"
            "import bitsandbytes as bnb\n"
            "p = torch.nn.Parameter(torch.ones(64, 64)); opt = bnb.optim.AdamW8bit([p], lr=0.1)\n"
            "p.grad = torch.ones_like(p); opt.step()\n"
            "assert (p < 1).all() and 'bitsandbytes.optim' in sys.modules and bnb.__version__\n"
            "from bitsandbytes.optim import AdamW8bit\nassert AdamW8bit is bnb.optim.AdamW8bit\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]
    # the first use a submodule import (as transformers and accelerate import the optimisers): the package's own
    # __init__ runs first, or the optimiser's ops are missing
    code = ("import sys, torch, tasks\nfrom bitsandbytes.optim import AdamW8bit\n"
            "p = torch.nn.Parameter(torch.ones(64, 64)); opt = AdamW8bit([p], lr=0.1)\n"
            "p.grad = torch.ones_like(p); opt.step()\nassert (p < 1).all()\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]
