"""Preflight (`fm check`, and the same checks at the start of `fm run`): each problem is one line that says
what to change, found before any server, crawl or model load starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from flows.preflight import (
    check_credentials,
    check_data_root,
    check_devices,
    estimate_bytes,
    has_errors,
    preflight,
    probe_danbooru,
    sd_model_finding,
    tagger_finding,
)
from pipeline_config.load import load_config
from tests.flows.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def fm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DANBOORU_LOGIN", "DANBOORU_API_KEY")}
    return {**env, **extra}


def _lines(text: str, mark: str, check: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(mark) and line[2:].split()[0] == check]


# --- fm check on the command line -----------------------------------------------------------------------------
def test_check_demo_passes_offline(tmp_path):
    proc = fm("check", "-c", "demo", "-o", f"data_root={tmp_path / 'root'}", "--offline", env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("config", "stages", "data_root", "disk", "tag.model", "cache.model", "train.model"):
        assert _lines(proc.stdout, "✓", check), f"no ✓ {check} line:\n{proc.stdout}"
    assert "✗" not in proc.stdout and "0 error(s)" in proc.stdout
    assert not (tmp_path / "root").exists()  # a check writes nothing


def test_check_names_each_problem_on_its_own_line(tmp_path):
    """A missing model, one credential of two, and CUDA asked for on a machine without it: exit 1, one ✗ each."""
    missing = tmp_path / "models" / "nai.safetensors"
    proc = fm("check", "-c", "demo", "-o", f"data_root={tmp_path}", "-o", f"train.model={missing}",
              "-o", "ingest.api.base_url=http://127.0.0.1:9", "-o", "runtime.device=cuda",
              env=_env(DANBOORU_LOGIN="someone"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    model = _lines(proc.stdout, "✗", "train.model")
    assert model and f"{missing} does not exist" in model[0] and "-o train.model=PATH" in model[0]
    cred = _lines(proc.stdout, "✗", "credentials")
    assert cred and "DANBOORU_API_KEY" in cred[0] and "only one" in cred[0]
    import torch

    if torch.cuda.is_available():
        assert _lines(proc.stdout, "✓", "runtime.device")
    else:
        cuda = _lines(proc.stdout, "✗", "runtime.device")
        assert cuda and "no CUDA device" in cuda[0] and "runtime.device=auto" in cuda[0]
    assert _lines(proc.stdout, "✓", "cache.model")  # the other model is fine and says so
    assert "Traceback" not in proc.stdout + proc.stderr


def test_check_config_typo_is_one_line_not_a_traceback():
    proc = fm("check", "-o", "bucket.resolutoin=512")
    assert proc.returncode == 1
    line = _lines(proc.stdout, "✗", "config")
    assert line and "bucket.resolutoin" in line[0] and "resolution" in line[0]
    assert "Traceback" not in proc.stderr


def test_run_stops_on_a_preflight_error_before_prefect_starts(tmp_path):
    started = time.monotonic()
    proc = fm("run", "train", "-o", f"data_root={tmp_path}", "-o", f"train.model={tmp_path / 'nope.safetensors'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert _lines(proc.stderr, "✗", "train.model") and "preflight found 1 problem" in proc.stderr
    assert "temporary server" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30  # one interpreter start-up, no Prefect
    assert not any(tmp_path.iterdir())


def test_run_prints_no_preflight_lines_when_all_is_well(tmp_path):
    """The demo's checks pass: `fm run` says nothing about them (a clean log), and --help lists the stages."""
    from flows.cli import run_preflight

    cfg = load_config("demo", [f"data_root={tmp_path}"])
    assert run_preflight(cfg, ["ingest", "tag", "train"]) is True
    bad = load_config("demo", [f"data_root={tmp_path}", f"tag.model={tmp_path / 'none'}"])
    assert run_preflight(bad, ["tag"]) is False


# --- the checks one by one ------------------------------------------------------------------------------------
def _sd_file(path: Path, prefixes: tuple[str, ...]) -> Path:
    save_file({f"{p}weight": np.zeros(2, dtype=np.float32) for p in prefixes}, str(path))
    return path


def test_sd_model_layouts(tmp_path):
    full = _sd_file(tmp_path / "full.safetensors",
                    ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
    assert sd_model_finding("train.model", str(full)).level == "ok"
    unet_only = _sd_file(tmp_path / "unet.safetensors", ("model.diffusion_model.",))
    finding = sd_model_finding("train.model", str(unet_only))
    assert finding.level == "error" and "VAE/CLIP" in finding.message
    vae_only = _sd_file(tmp_path / "vae.safetensors", ("first_stage_model.",))
    assert sd_model_finding("cache.model", str(vae_only), needs=("VAE",)).level == "ok"  # the cache loads the VAE
    assert "UNet/CLIP" in sd_model_finding("train.model", str(vae_only)).message
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    assert sd_model_finding("cache.model", str(junk)).level == "error"
    assert sd_model_finding("cache.model", str(tmp_path / "model.gguf")).level == "error"  # missing
    odd = tmp_path / "model.gguf"
    odd.write_bytes(b"x")
    assert "extension" in sd_model_finding("cache.model", str(odd)).message
    assert sd_model_finding("train.model", "builtin:tiny-sd15").level == "ok"


def test_diffusers_folder_layout(tmp_path):
    folder = tmp_path / "diffusers"
    for sub in ("unet", "vae", "text_encoder"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text("{}")
        (folder / sub / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (folder / "model_index.json").write_text("{}")
    assert sd_model_finding("train.model", str(folder)).level == "ok"
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    finding = sd_model_finding("train.model", str(folder))
    assert finding.level == "error" and "vae/*.safetensors" in finding.message
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "not a diffusers model" in sd_model_finding("train.model", str(plain)).message


def test_tagger_folder_layout(tmp_path):
    folder = tmp_path / "tagger"
    folder.mkdir()
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n")
    finding = tagger_finding("tag.model", str(folder))
    assert finding.level == "error" and "model.onnx" in finding.message
    assert tagger_finding("tag.model", "builtin:tiny-wd-swinv2").level == "ok"
    assert tagger_finding("tag.model", str(tmp_path / "gone")).level == "error"
    assert tagger_finding("tag.model", "SmilingWolf/wd-swinv2-tagger-v3").level == "warn"  # a Hub id: fetched later


def test_devices_only_when_cuda_is_asked_for():
    cfg = load_config("demo", ["runtime.device=cuda", "tag.device=cuda"])
    calls = []

    def no_gpu():
        calls.append(1)
        return 0, "torch x, a CPU-only build"

    found = check_devices(cfg, ["tag", "train"], probe=no_gpu)
    assert [f.check for f in found] == ["tag.device", "runtime.device"] and has_errors(found)
    assert "train" in found[1].message and "CPU-only" in found[1].message
    assert check_devices(cfg, ["ingest", "quality"], probe=no_gpu) == []  # no GPU stage selected
    assert check_devices(load_config("demo"), ["train"], probe=no_gpu) == [] and len(calls) == 1
    ok = check_devices(cfg, ["train"], probe=lambda: (2, "2 x H100"))
    assert [f.level for f in ok] == ["ok"]


def test_credentials_both_or_neither():
    cfg = load_config("demo", ["ingest.api.base_url=https://danbooru.example"])
    assert check_credentials(cfg, ["ingest"], env={"DANBOORU_LOGIN": "a", "DANBOORU_API_KEY": "k"})[0].level == "ok"
    assert check_credentials(cfg, ["ingest"], env={})[0].level == "warn"
    one = check_credentials(cfg, ["ingest"], env={"DANBOORU_API_KEY": "k"})
    assert one[0].level == "error" and "DANBOORU_LOGIN" in one[0].message
    assert check_credentials(cfg, ["tag"], env={}) == []  # ingest not selected
    assert check_credentials(load_config("demo"), ["ingest"], env={}) == []  # embedded mini-booru


def test_disk_estimate_and_warning(tmp_path):
    real = load_config("nai-v2-fm")
    need, parts = estimate_bytes(real, ["ingest", "cache", "train"])
    assert need > 260_000 * 1e6 and any("260,000" in p for p in parts)
    cfg = load_config("demo", [f"data_root={tmp_path / 'a' / 'b'}"])
    assert [f.level for f in check_data_root(cfg, ["ingest"])] == ["ok", "ok"]
    low = check_data_root(cfg, ["ingest"], min_free=1e18)
    assert low[1].level == "warn" and "free" in low[1].message
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = check_data_root(load_config("demo", [f"data_root={blocker / 'root'}"]), ["ingest"])
    assert bad[0].level == "error" and "data_root" in bad[0].message


# --- the probe request -----------------------------------------------------------------------------------------
class _Booru(BaseHTTPRequestHandler):
    status, body, seen = 200, b"[]", []

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def booru():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Booru)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    _Booru.status, _Booru.body, _Booru.seen = 200, b"[]", []


def test_probe_answers_and_failures_are_findings(booru):
    url = f"http://127.0.0.1:{booru.server_address[1]}"
    cfg = load_config("demo", [f"ingest.api.base_url={url}"])
    _Booru.body = json.dumps([{"id": 1}]).encode()
    ok = probe_danbooru(cfg, env={"DANBOORU_LOGIN": "me", "DANBOORU_API_KEY": "key"})
    assert ok.level == "ok", ok
    path, auth = _Booru.seen[-1]
    assert path == "/posts.json?limit=1" and auth and auth.startswith("Basic ")
    _Booru.status, _Booru.body = 401, b'{"success": false}'
    assert "credentials rejected" in probe_danbooru(cfg, env={}).message
    _Booru.status, _Booru.body = 200, b"<html>login</html>"
    assert "not JSON" in probe_danbooru(cfg, env={}).message
    closed = load_config("demo", [f"ingest.api.base_url=http://127.0.0.1:{free_port()}"])
    started = time.monotonic()
    down = probe_danbooru(closed, timeout_s=2.0, env={})
    assert down.level == "error" and "failed" in down.message and time.monotonic() - started < 3


def test_probe_skipped_for_the_embedded_booru_and_dumps(booru):
    assert not [f for f in preflight(load_config("demo"), ["ingest"], env={}) if f.check == "danbooru"]
    dump = load_config("demo", ["ingest.source=danbooru_dump", "ingest.dump.posts_path=/nowhere/posts.jsonl"])
    found = preflight(dump, ["ingest"], env={})
    assert not [f for f in found if f.check == "danbooru"]
    assert [f.level for f in found if f.check == "dump"] == ["error"]
    assert _Booru.seen == []


def test_eval_alone_checks_the_models_it_loads(tmp_path):
    from flows.preflight import check_models

    cfg = load_config("demo", ["eval.probe_space=tagger", f"tag.model={tmp_path / 'no-tagger'}",
                               f"train.model={tmp_path / 'no-base.safetensors'}"])
    found = {f.check: f for f in check_models(cfg, ["eval"])}
    assert found["tag.model"].level == "error" and found["train.model"].level == "error"
    both = check_models(cfg, ["tag", "train", "eval"])
    assert [f.check for f in both].count("tag.model") == 1 and [f.check for f in both].count("train.model") == 1
