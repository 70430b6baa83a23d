"""Kill a training process mid-run (SIGKILL), rerun: it resumes at the exact next batch and ends with the
same weights as a run that was never interrupted."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from tasks.train.launch import REPO_ROOT
from tasks.train.loop import KILL_ENV, run_training

from .conftest import child_env, run_spec, unet_weights

RECIPE = dict(epochs=2, batch_size=2, grad_accum=2, optimizer="adamw8bit", caption_dropout=0.25, lr=5e-4,
              warmup=0.25, checkpoint_every=3, keep_last=2, ema={"enabled": True, "decay": 0.9})


def test_kill_then_resume_gives_the_uninterrupted_weights(make_cache, model_cache, tmp_path):
    store, manifest = make_cache(n=16, buckets=((64, 64), (128, 64)))
    straight = run_training(run_spec(store, manifest, tmp_path / "straight", model_cache, **RECIPE))
    assert straight["steps"] == 8

    work = tmp_path / "killed"
    spec = run_spec(store, manifest, work, model_cache, **RECIPE)
    spec.save(work / "run.json")
    proc = subprocess.run([sys.executable, "-m", "tasks.train.worker", str(work / "run.json")], cwd=REPO_ROOT,
                          env={**child_env(), KILL_ENV: "5"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]  # SIGKILLed after step 5
    assert (work / "checkpoints" / "LATEST").read_text() == "step-00000003"  # steps 4-5 were lost
    assert not (work / "result.json").exists()

    resumed = run_training(spec)
    assert resumed["steps"] == 8 and resumed["samples_seen"] == straight["samples_seen"]
    a, b = unet_weights(tmp_path / "straight"), unet_weights(work)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)  # bit-identical on CPU
    ema_a = (tmp_path / "straight" / "checkpoints" / "step-00000008" / "ema.safetensors").read_bytes()
    assert ema_a == (work / "checkpoints" / "step-00000008" / "ema.safetensors").read_bytes()
    steps = [json.loads(l)["step"] for l in (work / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the rows of the lost steps 4-5 were replaced, not duplicated
    assert resumed["final_loss"] == straight["final_loss"]
