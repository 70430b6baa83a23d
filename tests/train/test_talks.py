"""Training talks: step lines (step/total, epoch, smoothed loss, lr, samples/s, elapsed, ETA) at the first
step, every N seconds, each epoch end and the last step; readable lines instead of raw JSON events; a
TensorBoard hint. Through the stage's own logger, in process and relayed from `accelerate launch`."""
from __future__ import annotations

import logging
import re

import pytest

from pipeline_config.load import load_config
from tasks.common.stage import run_stage
from tasks.train.launch import duration, event_line, launch_accelerate
from tasks.train.logs import TALK_ENV, StepTalk
from tasks.train.stage import SPEC

from .conftest import base_train, child_env, run_spec

STEP_LINE = re.compile(r"train: step (\d+)/(\d+) \(.*\) · epoch (\d+)/(\d+)(?: · epoch end)? · loss (\d+\.\d{4}) "
                       r"\(smoothed; this step \d+\.\d{4}\) · lr [0-9.e+-]+ · [0-9.]+ samples/s · elapsed \S+ · "
                       r"ETA (\S+)$")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_step_talk_speaks_at_first_step_interval_epoch_end_and_last_step():
    clock = Clock()
    # 20 steps, 8 batches an epoch, accumulation 2: epochs end after steps 4, 8, 12 (16 batches at 8 each),
    # 16 and 20 is the last.
    talk = StepTalk(total=20, start_step=0, steps_per_epoch=8, grad_accum=2, every_s=30.0, clock=clock)
    said = {}
    for step in range(1, 21):
        clock.t += 10.0 if step == 1 else 2.0  # the first step is slow (compile), then 2 s a step
        event = talk.update(step, step * 2, 2, loss=1.0 / step, lr=1e-4, samples_seen=step * 8)
        if event:
            said[step] = event
    assert sorted(said) == [1, 4, 8, 12, 16, 20]  # no 30-s interval passed between two of them
    assert all(said[s]["epoch_end"] for s in (4, 8, 12, 16)) and not said[1]["epoch_end"]
    assert [said[s]["epoch"] for s in (1, 4, 8, 20)] == [1, 1, 2, 5]
    # ETA from the pace since the first step (2 s a step), not inflated by the slow first step
    assert said[8]["eta_s"] == pytest.approx(12 * 2.0)
    assert said[1]["eta_s"] == pytest.approx(19 * 10.0)  # only the first step to go by
    assert said[20]["eta_s"] == 0.0
    # samples/s over the span since the previous line: 4 steps x 8 samples in 8 s
    assert said[8]["samples_per_s"] == pytest.approx(32 / 8.0)
    # the smoothed loss lags the falling raw loss (bias-corrected EMA)
    assert said[1]["loss_smoothed"] == pytest.approx(1.0)
    assert said[20]["loss_smoothed"] > said[20]["loss"]

    clock = Clock()
    talk = StepTalk(total=1000, start_step=0, steps_per_epoch=10_000, grad_accum=1, every_s=30.0, clock=clock)
    steps = []
    for step in range(1, 101):
        clock.t += 1.0
        if talk.update(step, step, 1, loss=0.5, lr=1e-4, samples_seen=step):
            steps.append(step)
    assert steps == [1, 31, 61, 91]  # time-based: every 30 s


def test_event_lines_are_readable_not_json():
    line = event_line({"event": "step", "step": 120, "total_steps": 4000, "epoch": 1, "epochs": 5, "epoch_end": False,
                       "loss": 0.13, "loss_smoothed": 0.1234, "lr": 1e-5, "samples_per_s": 12.3, "elapsed_s": 242,
                       "eta_s": 7860})
    assert line == ("train: step 120/4000 (3.0 %) · epoch 1/5 · loss 0.1234 (smoothed; this step 0.1300) · lr 1.00e-05 "
                    "· 12.3 samples/s · elapsed 4m02s · ETA 2h11m")
    assert STEP_LINE.match(line)
    start = event_line({"event": "start", "total_steps": 8, "steps_per_epoch": 4, "world_size": 1, "device": "cpu"})
    assert start and "{" not in start and "8 optimiser steps" in start
    assert event_line({"event": "progress", "fraction": 0.5}) is None
    assert duration(None) == "?" and duration(5) == "5s" and duration(3725) == "1h02m"


def _step_lines(messages: list[str]) -> list[re.Match]:
    return [m for m in map(STEP_LINE.match, messages) if m]


def test_train_stage_log_has_step_lines_with_loss_and_eta(make_cache, model_cache, tmp_path, caplog):
    store, _ = make_cache(n=16, buckets=((64, 64),))
    train = base_train(epochs=2, logging={"every": 2, "tensorboard": True})
    cfg = load_config({"data_root": store.root_url, "runtime": {"device": "cpu", "cache_dir": str(model_cache)},
                       "train": train})
    log = logging.getLogger("booruflow.test-talks")
    with caplog.at_level(logging.INFO, logger="booruflow.test-talks"):
        out = run_stage(SPEC, cfg, store, log=log)
    assert out.manifest.steps == 8
    messages = [r.getMessage() for r in caplog.records if r.name == "booruflow.test-talks"]
    lines = _step_lines(messages)
    # 16 samples / batch 4 = 4 steps an epoch: the first step, both epoch ends (the second is the last step)
    assert [int(m.group(1)) for m in lines] == [1, 4, 8], messages
    assert all(m.group(2) == "8" and m.group(4) == "2" for m in lines)
    assert [int(m.group(3)) for m in lines] == [1, 1, 2]
    assert all(float(m.group(5)) > 0 for m in lines) and lines[-1].group(6) == "0s"
    assert not any('{"' in m for m in messages), "a raw JSON event reached the log"
    hint = [m for m in messages if "--logdir" in m]
    assert len(hint) == 1 and re.search(r"tensorboard --logdir \S+/tb", hint[0]), hint
    assert any(m.startswith("train: 8 optimiser steps") for m in messages)


def test_step_lines_are_relayed_from_accelerate_every_interval(make_cache, model_cache, tmp_path):
    """Through `accelerate launch` (one CPU process), with the interval at 0 s: a line every step."""
    store, manifest = make_cache(n=8, buckets=((64, 64),))
    work = tmp_path / "work"
    work.mkdir()
    spec = run_spec(store, manifest, work, model_cache, epochs=2, launcher="accelerate")
    spec.save(work / "run.json")
    lines: list[str] = []
    events: list[dict] = []
    launch_accelerate(work / "run.json", 1, on_line=lines.append, on_event=events.append,
                      env={**child_env(), TALK_ENV: "0"})
    said = [event_line(e) for e in events if e.get("event") == "step"]
    assert [int(m.group(1)) for m in _step_lines([s for s in said if s])] == [1, 2, 3, 4]
    assert not any("@@booruflow" in line or '{"event"' in line for line in lines)
