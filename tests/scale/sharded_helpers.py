"""Shared by the sharded-runner tests (test_sharded.py: Dask, threads, in process; test_sharded_ray.py: Ray)."""
from __future__ import annotations

import time

from data_contracts.store import ArtifactStore
from data_contracts.tag import TagManifest

# ~96 posts: ~70 pass the demo's filters, ~60 are kept by dedup. Small shards keep the shard counts the
# comparisons need (tag >= 3, ingest and cache >= 2) on a mini-booru that tags and encodes in seconds.
POSTS, TAG_SHARD, INGEST_SHARD = 96, 20, 40


def overrides(root, runner: str, *extra: str) -> list[str]:
    return [f"data_root={root / 'data'}", f"runtime.cache_dir={root / 'cache'}", f"ingest.embedded.posts={POSTS}",
            f"tag.shard_size={TAG_SHARD}", f"ingest.shard_posts={INGEST_SHARD}", f"runtime.task_runner={runner}",
            "runtime.max_workers=2",
            "train.phases=[]", *extra]  # one bucket and cache: what these tests compare across runners


def task_run_names(flow_run_id, expected: int, timeout_s: float = 20.0) -> list[str]:
    """Names of the flow run's task runs (task run states reach the API a moment after the flow ends)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = [r.name for r in runs if r.state is not None and r.state.is_completed()]
            if len(done) >= expected or time.monotonic() > deadline:
                return sorted(done)
            time.sleep(0.2)


def tags_bytes(store: ArtifactStore) -> tuple[str, bytes]:
    manifest = store.read_manifest(TagManifest)
    return manifest.fingerprint, store.path(manifest, "tags.parquet", verify=True).read_bytes()
