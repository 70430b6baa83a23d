"""Two processes on CPU (gloo) under `accelerate launch` reach the weights of one process with the doubled
batch: the reader deals every global batch of batch×world rows identically, each sample's draws are
seeded by its id, and DDP averages the per-rank mean losses into the global mean.

Tolerance: max |Δw| ≤ 1e-6 (fp32; only the reduction order of the all-reduce differs; measured 1.2e-7
while the weights moved up to 2e-3).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tasks.train.launch import REPO_ROOT, free_port, launch_accelerate
from tasks.train.loop import run_training

from .conftest import child_env, run_spec, unet_weights

# Adam's eps is raised so that near-zero gradients (whose sign the all-reduce order can flip) do not get
# amplified into full-size steps: with eps ≫ |g| the update is linear in g, so rounding stays rounding.
COMMON = dict(epochs=2, grad_accum=2, lr=5e-4, optimizer="adamw", eps=1e-4, caption_dropout=0.25,
              checkpoint_every=100)


def _assert_same_training(one: dict, one_work, work, events: list[dict], model_cache) -> None:
    """The 2-process run (events from rank 0) reached the 1-process run's weights, loss and steps."""
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source

    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # rank 0 alone reports
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(1, one["steps"] + 1))
    a, b = unet_weights(one_work), unet_weights(work)
    base = load_sd15(resolve_model_source("builtin:tiny-sd15", model_cache), ("unet",)).unet.state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - w).abs().max()) for k, w in base.items())
    assert moved > 1e-4  # the weights did train
    assert diff <= 1e-6, diff
    done = [e for e in events if e["event"] == "done"][0]
    assert done["samples_seen"] == one["samples_seen"] and done["steps"] == one["steps"]
    assert abs(done["final_loss"] - one["final_loss"]) < 1e-5


def test_two_gloo_processes_equal_one_with_double_batch(make_cache, model_cache, tmp_path):
    store, manifest = make_cache(n=16, buckets=((64, 64), (128, 64)))
    one = run_training(run_spec(store, manifest, tmp_path / "one", model_cache, batch_size=4, **COMMON))

    work = tmp_path / "two"
    spec = run_spec(store, manifest, work, model_cache, batch_size=2, launcher="accelerate", num_processes=2,
                    **COMMON)
    spec.save(work / "run.json")
    lines, events = [], []
    launch_accelerate(work / "run.json", 2, on_line=lines.append, on_event=events.append, env=child_env())
    _assert_same_training(one, tmp_path / "one", work, events, model_cache)


def test_two_machines_by_accelerate_config_equal_one_process_with_double_batch(make_cache, model_cache, tmp_path):
    """Multi-node as a user runs it: machine 0 through the stage's launcher with its accelerate config
    (`train.accelerate_config`), machine 1 through `fm train-node <run.json> --accelerate-config`; here two
    "machines" on loopback, one gloo process each, rendezvous over TCP."""
    store, manifest = make_cache(n=16, buckets=((64, 64), (128, 64)))
    one = run_training(run_spec(store, manifest, tmp_path / "one", model_cache, batch_size=4, **COMMON))

    port = free_port()
    configs = []
    for rank in (0, 1):
        path = tmp_path / f"machine-{rank}.yaml"
        path.write_text(textwrap.dedent(f"""\
            compute_environment: LOCAL_MACHINE
            distributed_type: MULTI_GPU
            num_machines: 2
            num_processes: 2
            machine_rank: {rank}
            main_process_ip: 127.0.0.1
            main_process_port: {port}
            rdzv_backend: static
            same_network: true
            mixed_precision: 'no'
            use_cpu: false
            """))
        configs.append(path)
    work = tmp_path / "two"
    spec = run_spec(store, manifest, work, model_cache, batch_size=2, launcher="accelerate",
                    accelerate_config=str(configs[0]), **COMMON)
    spec.save(work / "run.json")
    other = subprocess.Popen([sys.executable, "-m", "flows.cli", "train-node", str(work / "run.json"),
                              "--accelerate-config", str(configs[1])], env=child_env(), cwd=str(REPO_ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, events = [], []
    try:
        launch_accelerate(work / "run.json", 0, config_file=str(configs[0]), on_line=lines.append,
                          on_event=events.append, env=child_env())
        out, _ = other.communicate(timeout=300)
    finally:
        if other.poll() is None:
            other.kill()
    assert other.returncode == 0, out[-3000:]
    _assert_same_training(one, tmp_path / "one", work, events, model_cache)
