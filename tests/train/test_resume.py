"""Kill a training process mid-run (SIGKILL), rerun: it resumes at the exact next batch and ends with the
same weights as a run that was never interrupted."""
from __future__ import annotations

import json

import pytest
import torch

from tasks.train.loop import run_training

from .conftest import kill_worker_after, run_spec, unet_weights

RECIPE = dict(epochs=2, batch_size=2, grad_accum=2, optimizer="adamw8bit", caption_dropout=0.25, lr=5e-4,
              warmup=0.25, checkpoint_every=3, keep_last=2, ema={"enabled": True, "decay": 0.9})


def test_kill_then_resume_gives_the_uninterrupted_weights(make_cache, model_cache, tmp_path):
    store, manifest = make_cache(n=16, buckets=((64, 64), (128, 64)))
    straight = run_training(run_spec(store, manifest, tmp_path / "straight", model_cache, **RECIPE))
    assert straight["steps"] == 8

    work = tmp_path / "killed"
    spec = run_spec(store, manifest, work, model_cache, **RECIPE)
    kill_worker_after(spec, work / "run.json", 5)
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


def _tb_points(folder) -> list[tuple[str, int, float, float]]:
    """(tag, step, value, wall time) of every scalar in every event file under folder."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    points = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            for v in event.summary.value:
                points.append((v.tag, event.step, v.simple_value, event.wall_time))
    return points


def test_kill_then_resume_leaves_each_tensorboard_point_once(make_cache, model_cache, tmp_path):
    store, manifest = make_cache(n=16, buckets=((64, 64),))
    recipe = dict(epochs=1, batch_size=2, checkpoint_every=3, logging={"every": 1, "tensorboard": True})
    work = tmp_path / "killed"
    spec = run_spec(store, manifest, work, model_cache, **recipe)
    kill_worker_after(spec, work / "run.json", 5)
    killed = _tb_points(work / "tb")
    assert sorted(s for t, s, _, _ in killed if t == "train/loss") == [1, 2, 3, 4, 5]  # 4-5: past checkpoint 3
    before = {(t, s): w for t, s, _, w in killed}

    resumed = run_training(spec)
    assert resumed["steps"] == 8
    points = _tb_points(work / "tb")
    keys = [(t, s) for t, s, _, _ in points]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert sorted(s for t, s, _, _ in points if t == "train/loss") == list(range(1, 9))
    history = {json.loads(l)["step"]: json.loads(l) for l in (work / "history.jsonl").read_text().splitlines()}
    for tag, step, value, wall in points:
        if tag == "train/loss":
            assert value == pytest.approx(history[step]["loss"], rel=1e-6), step
        if step <= 3:
            assert wall == before[(tag, step)]  # the kept points keep the killed attempt's wall times
    assert not (work / ".tb-trim").exists()


def test_trim_events_after_an_interrupted_rewrite_keeps_each_point_once(tmp_path):
    """A rewrite killed after moving its file in but before deleting the old ones leaves both: the next
    trim keeps each (tag, step) once, in one file."""
    from torch.utils.tensorboard import SummaryWriter

    from tasks.train.tb import event_files, trim_events

    tb = tmp_path / "tb"
    for last in (5, 3):  # the killed attempt, then the (identical up to 3) rewritten copy
        w = SummaryWriter(str(tb))
        for step in range(1, last + 1):
            w.add_scalar("train/loss", 1.0 / step, step)
        w.close()
    assert len(event_files(tb)) == 2
    assert trim_events(tb, 3) == 3
    assert len(event_files(tb)) == 1
    points = _tb_points(tb)
    assert [(t, s) for t, s, _, _ in points] == [("train/loss", 1), ("train/loss", 2), ("train/loss", 3)]
    assert trim_events(tb, 0) == 0 and event_files(tb) == []  # nothing checkpointed: nothing kept
