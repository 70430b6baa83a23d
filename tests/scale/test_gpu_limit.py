"""The `booruflow-gpu` global concurrency limit keeps two runs off one GPU (real flow, real Prefect API).

GPU stages (tag, cache, train, eval) on a GPU hold one slot of the limit for the whole stage (prepare, every
shard, merge); other stages, and GPU stages on the CPU, take none. With 1 slot two concurrent `fm` runs tag
one after the other; without the limit the same pair tags at the same time, so the assertion can fail.
A run that waits says so in its log, with the limit, its slots and the flow run holding it; a missing limit
is skipped without Prefect's warning.

This machine may have no GPU: the tests that need the tag stage to count as a GPU stage say its device is
cuda (`stage_device`), while the tagger itself runs wherever torch finds a device.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import Iterator

import pytest

import flows.fm as fm_module
from flows.deploy import ensure_gpu_limit
from flows.fm import GPU_LIMIT, GPU_STAGES, fm, takes_gpu_slot
from pipeline_config.load import load_config

POSTS, SHARD = 96, 32  # ~70 posts pass the filters: 3 shards, so prepare + 3 shard tasks + merge per run
MEET_S = 8.0  # how long the first tag run waits inside its stage for the other one


class Rendezvous:
    """Wraps the tag stage's real run_shard: shards of the first tag run to get there wait (MEET_S in all)
    until a shard of another tag run has started too, then both go on.

    A tag stage lasts about a second here, less than the skew between two flow starts, so without this
    two unlimited runs could miss each other by chance; with it they meet for certain when nothing stops
    them, and a limit that works keeps the second run out of its tag stage for the whole wait.
    """

    def __init__(self, real):
        self.real = real
        self.cond = threading.Condition()
        self.runs: set[str] = set()  # tag fingerprints that have started a shard
        self.deadline: float | None = None
        self.met = False

    def __call__(self, ctx, shard):
        with self.cond:
            self.runs.add(ctx.fingerprint)
            if len(self.runs) == 1:  # alone in a tag stage so far: wait for company
                if self.deadline is None:
                    self.deadline = time.monotonic() + MEET_S
                self.cond.wait_for(lambda: len(self.runs) > 1, timeout=max(0.0, self.deadline - time.monotonic()))
            elif self.deadline is not None and time.monotonic() < self.deadline:
                self.met = True  # another run got into its tag stage while the first one waited
            self.cond.notify_all()
        return self.real(ctx, shard)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-limit")


@pytest.fixture(scope="module", autouse=True)
def no_gpu_limit_left(prefect_api):
    """The Prefect API is shared with other modules (tests/scale/conftest.py): none of them may find this
    module's GPU limit, and this module starts without one."""
    _delete_gpu_limit()
    yield
    _delete_gpu_limit()


@pytest.fixture
def on_gpu(monkeypatch):
    """The tag stage counts as a GPU stage whatever this machine has (its tagger runs where torch can)."""
    real = fm_module.stage_device
    monkeypatch.setattr(fm_module, "stage_device", lambda stage, cfg: "cuda" if stage == "tag" else real(stage, cfg))


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in list(self.records) if r.levelno >= level]


@contextmanager
def prefect_log() -> Iterator[Records]:
    """Every record of Prefect's loggers (flow and task run logs, debug lines of flow runs included) while the
    block runs."""
    handler = Records()
    logger, runs = logging.getLogger("prefect"), logging.getLogger("prefect.flow_runs")
    level = runs.level
    logger.addHandler(handler)
    runs.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        runs.setLevel(level)


def _overrides(root, threshold: float, data: str = "data") -> list[str]:
    # A different threshold is a different tag fingerprint: every run below really builds.
    return [f"data_root={root / data}", f"runtime.cache_dir={root / 'cache'}", f"ingest.embedded.posts={POSTS}",
            f"tag.shard_size={SHARD}", "runtime.task_runner=thread", "runtime.max_workers=2",
            f"tag.general_threshold={threshold}"]


def _run(root, stages: list[str], threshold: float = 0.35, data: str = "data"):
    state = fm(config="demo", stages=stages, overrides=_overrides(root, threshold, data), return_state=True)
    assert state.is_completed(), state.message
    return state


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _delete_gpu_limit() -> None:
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            pass


def _active_slots() -> int | None:
    """Slots of the GPU limit in use now; None when the limit does not exist."""
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            return client.read_global_concurrency_limit_by_name(GPU_LIMIT).active_slots
        except ObjectNotFound:
            return None


def _tag_interval(flow_run_id, n_shards: int, timeout_s: float = 20.0) -> tuple[datetime, datetime]:
    """First start .. last end of the run's tag task runs (`tag`, `tag-shard-*`, `tag-merge`) per the API."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with _client() as client:
        while True:  # task run states reach the API a moment after the flow returns
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            tag = [r for r in runs if r.name == "tag" or r.name.startswith("tag-")]
            done = [r for r in tag if r.state is not None and r.state.is_completed() and r.end_time is not None]
            if len(done) == n_shards + 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert sorted(r.name for r in done) == sorted(["tag", "tag-merge"] + [f"tag-shard-{i}" for i in range(n_shards)])
    return min(r.start_time for r in done), max(r.end_time for r in done)


PAIR_ROOTS = ("data-a", "data-b")  # one data root each: the stage lock of a data root never separates them


def _pair(root, thresholds: tuple[float, float]) -> tuple[list[tuple[datetime, datetime]], list[int | None]]:
    """Two `fm` runs of the tag stage at once (threads of this process), each on its own data root so
    that only the GPU limit can keep them apart; their tag intervals and the GPU limit's active_slots
    sampled meanwhile."""
    seen: list[int | None] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(_active_slots())
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(_run, root, ["tag"], t, data) for t, data in zip(thresholds, PAIR_ROOTS)]
            states = [run.result(timeout=180) for run in runs]
    finally:
        stop.set()
        watcher.join()
    intervals = []
    for state in states:
        [tag] = state.result()
        assert not tag["cached"] and len(tag["shards"]) >= 2
        intervals.append(_tag_interval(state.state_details.flow_run_id, len(tag["shards"])))
    return intervals, seen


def _overlap(a: tuple[datetime, datetime], b: tuple[datetime, datetime]) -> float:
    return (min(a[1], b[1]) - max(a[0], b[0])).total_seconds()


def test_gpu_stage_waits_for_the_slot_and_other_stages_do_not(root, prefect_api, on_gpu):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.concurrency.sync import concurrency

    assert {"tag", "cache", "train", "eval"} <= GPU_STAGES and "ingest" not in GPU_STAGES
    with _client() as client:  # the shared API may hold other modules' tag task runs: only new ones count
        tag_runs = TaskRunFilter(name=TaskRunFilterName(any_=["tag"]))
        before = {r.id for r in client.read_task_runs(task_run_filter=tag_runs)}
    asyncio.run(ensure_gpu_limit(1))
    assert _active_slots() == 0
    with ThreadPoolExecutor(2) as pool:  # flows in threads: a bug that blocks fails a timeout, not the session
        with concurrency(GPU_LIMIT, occupy=1, strict=True):  # "another run" holds the GPU
            assert _active_slots() == 1
            pool.submit(_run, root, ["ingest", "dedup"]).result(timeout=60)  # not a GPU stage: runs meanwhile
            waiting = pool.submit(_run, root, ["tag"])
            time.sleep(4.0)
            assert not waiting.done()
            with _client() as client:  # not even the prepare task started
                started = client.read_task_runs(task_run_filter=tag_runs)
            assert [r for r in started if r.id not in before] == []
            assert _active_slots() == 1
        # our slot is released: the waiting run takes it and finishes
        state = waiting.result(timeout=120)
    [tag] = state.result()
    assert tag["stage"] == "tag" and not tag["cached"]
    assert _active_slots() == 0  # released at the end of the stage

    # An output that is already complete only reads manifests: it does not queue behind the GPU.
    with ThreadPoolExecutor(1) as pool:
        with concurrency(GPU_LIMIT, occupy=1, strict=True):
            [again] = pool.submit(_run, root, ["tag"]).result(timeout=30).result()
    assert again["cached"] and again["fingerprint"] == tag["fingerprint"]


def test_two_runs_never_tag_at_once_with_one_slot_and_do_without_the_limit(root, prefect_api, monkeypatch, on_gpu):
    from tasks.tag import stage as tag_stage

    for data in PAIR_ROOTS:
        _run(root, ["ingest", "dedup"], data=data)
    asyncio.run(ensure_gpu_limit(1))

    meet = Rendezvous(tag_stage.SPEC.run_shard)
    monkeypatch.setattr(tag_stage.SPEC, "run_shard", meet)
    (a, b), seen = _pair(root, (0.30, 0.40))
    assert _overlap(a, b) < 0, f"tag stages overlapped with 1 GPU slot: {a} {b}"
    assert not meet.met and len(meet.runs) == 2  # the first run waited MEET_S inside its stage, alone
    assert max(s or 0 for s in seen) == 1 and _active_slots() == 0  # the slot was held, then given back

    # Control: the same pair without the limit is in its tag stages at the same time.
    with _client() as client:
        client.delete_global_concurrency_limit_by_name(GPU_LIMIT)
    meet = Rendezvous(meet.real)
    monkeypatch.setattr(tag_stage.SPEC, "run_shard", meet)
    with prefect_log() as log:
        (a, b), seen = _pair(root, (0.31, 0.41))
    assert set(seen) == {None}
    assert meet.met and _overlap(a, b) > 0, f"without the limit the tag stages did not overlap: {a} {b}"
    # A missing limit is looked up once per stage and skipped quietly: not Prefect's warning on every try.
    assert not [m for m in log.messages() if "do not exist" in m]
    assert sum(f"no concurrency limit '{GPU_LIMIT}'" in m for m in log.messages(logging.DEBUG)) == 2


def test_a_waiting_run_says_which_limit_and_which_run_holds_it(root, prefect_api, on_gpu, monkeypatch):
    """Another flow run holds the only slot: the waiting run logs the limit, its slots and that run's name,
    again while it waits, and when it gets the slot."""
    from prefect import flow
    from prefect.concurrency.sync import concurrency

    monkeypatch.setattr(fm_module, "SLOT_FIRST_WAIT_S", 0.5)
    monkeypatch.setattr(fm_module, "SLOT_LOG_EVERY_S", 1.0)
    _run(root, ["ingest", "dedup"])
    asyncio.run(ensure_gpu_limit(1))
    holding, release = threading.Event(), threading.Event()

    @flow(name="gpu-hog", flow_run_name="hog-run")
    def hog() -> None:
        with concurrency(GPU_LIMIT, occupy=1, strict=True):
            holding.set()
            release.wait(120)

    def waiting_lines(log: Records) -> list[str]:
        return [m for m in log.messages(logging.INFO) if m.startswith("tag: waiting for the GPU")]

    with ThreadPoolExecutor(2) as pool, prefect_log() as log:
        held = pool.submit(hog)
        assert holding.wait(60)
        waiting = pool.submit(_run, root, ["tag"], 0.45)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it said so twice and named the holder
            lines = waiting_lines(log)
            if len(lines) >= 2 and any("hog-run" in m for m in lines):
                break
            assert not waiting.done()
            time.sleep(0.2)
        lines = waiting_lines(log)
        release.set()
        held.result(timeout=60)
        [tag] = waiting.result(timeout=120).result()
    assert not tag["cached"]
    assert len(lines) >= 2, lines  # said at once, then again while waiting
    assert all(f"1/1 slot(s) of concurrency limit '{GPU_LIMIT}'" in m for m in lines), lines
    assert any("gpu-hog run 'hog-run'" in m for m in lines), lines
    assert any(m.startswith(f"tag: got the GPU slot of '{GPU_LIMIT}' after") for m in log.messages(logging.INFO))


def test_cpu_stages_never_take_the_gpu_slot(tmp_path, monkeypatch):
    """No Prefect server: a stage on the CPU (its device, runtime.device, or auto without CUDA) decides so
    before any Prefect call; only a GPU stage on a GPU asks for the limit."""
    import torch

    def cfg(*overrides: str):
        return load_config("demo", [f"data_root={tmp_path / 'data'}", *overrides])

    asked: list[str] = []
    monkeypatch.setattr(fm_module, "read_gpu_limit", lambda name: asked.append(name))  # None: no such limit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for stage in ("cache", "train", "eval"):
        assert not takes_gpu_slot(stage, cfg("runtime.device=cpu"), force=True)
        assert takes_gpu_slot(stage, cfg("runtime.device=cuda"), force=True)
        assert takes_gpu_slot(stage, cfg("runtime.device=auto"), force=True)
    assert not takes_gpu_slot("tag", cfg("tag.device=cpu", "runtime.device=cuda"), force=True)
    assert takes_gpu_slot("tag", cfg("tag.device=cuda", "runtime.device=cpu"), force=True)
    assert not takes_gpu_slot("bucket", cfg("runtime.device=cuda"), force=True)
    for stage in ("tag", "cache", "train", "eval"):  # nothing built yet: not cached, so not forced is the same
        assert takes_gpu_slot(stage, cfg("runtime.device=cuda", "tag.device=cuda"))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto resolves to the CPU
    for stage in ("tag", "cache", "train", "eval"):
        assert not takes_gpu_slot(stage, cfg("runtime.device=auto", "tag.device=auto"), force=True)
        with fm_module._gpu_slot(stage, cfg("runtime.device=auto"), True, log=logging.getLogger("t")):
            pass
    assert asked == []  # decided without asking Prefect for the limit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    log = Records()
    logger = logging.getLogger("booruflow.test-gpu-slot")
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    with fm_module._gpu_slot("train", cfg("runtime.device=auto"), True, log=logger):
        pass
    assert asked == [GPU_LIMIT]  # a GPU stage asks once; no limit: one debug line, no waiting, no warning
    assert [(r.levelno, r.getMessage()) for r in log.records] == [
        (logging.DEBUG, f"train: no concurrency limit '{GPU_LIMIT}' on this Prefect server: not holding a GPU slot")]
