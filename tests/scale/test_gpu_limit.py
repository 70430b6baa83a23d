"""The `booruflow-gpu` global concurrency limit keeps two runs off one GPU (real flow, real Prefect API).

GPU stages (tag, cache, train, eval) hold one slot of the limit for the whole stage (prepare, every shard,
merge); other stages take none. With 1 slot two concurrent `fm` runs tag one after the other; without the
limit the same pair tags at the same time, so the assertion can fail.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from flows.deploy import ensure_gpu_limit
from flows.fm import GPU_LIMIT, GPU_STAGES, fm

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


def _overrides(root, threshold: float) -> list[str]:
    # A different threshold is a different tag fingerprint: every run below really builds.
    return [f"data_root={root / 'data'}", f"runtime.cache_dir={root / 'cache'}", f"ingest.embedded.posts={POSTS}",
            f"tag.shard_size={SHARD}", "runtime.task_runner=thread", "runtime.max_workers=2",
            f"tag.general_threshold={threshold}"]


def _run(root, stages: list[str], threshold: float = 0.35):
    state = fm(config="demo", stages=stages, overrides=_overrides(root, threshold), return_state=True)
    assert state.is_completed(), state.message
    return state


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


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


def _pair(root, thresholds: tuple[float, float]) -> tuple[list[tuple[datetime, datetime]], list[int | None]]:
    """Two `fm` runs of the tag stage at once (threads of this process); their tag intervals and the
    GPU limit's active_slots sampled meanwhile."""
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
            runs = [pool.submit(_run, root, ["tag"], t) for t in thresholds]
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


def test_gpu_stage_waits_for_the_slot_and_other_stages_do_not(root, prefect_api):
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.concurrency.sync import concurrency

    assert {"tag", "cache", "train", "eval"} <= GPU_STAGES and "ingest" not in GPU_STAGES
    asyncio.run(ensure_gpu_limit(1))
    assert _active_slots() == 0
    with ThreadPoolExecutor(2) as pool:  # flows in threads: a bug that blocks fails a timeout, not the session
        with concurrency(GPU_LIMIT, occupy=1, strict=True):  # "another run" holds the GPU
            assert _active_slots() == 1
            pool.submit(_run, root, ["ingest"]).result(timeout=60)  # not a GPU stage: runs meanwhile
            waiting = pool.submit(_run, root, ["tag"])
            time.sleep(4.0)
            assert not waiting.done()
            with _client() as client:  # not even the prepare task started
                started = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["tag"])))
            assert started == []
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


def test_two_runs_never_tag_at_once_with_one_slot_and_do_without_the_limit(root, prefect_api, monkeypatch):
    from tasks.tag import stage as tag_stage

    _run(root, ["ingest"])  # cached when the test above ran first
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
    (a, b), seen = _pair(root, (0.31, 0.41))
    assert set(seen) == {None}
    assert meet.met and _overlap(a, b) > 0, f"without the limit the tag stages did not overlap: {a} {b}"
