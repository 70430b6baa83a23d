"""Two processes on CPU (gloo) under `accelerate launch` reach the weights of one process with the doubled
batch: the reader deals every global batch of batch×world rows identically, each sample's draws are
seeded by its id, and DDP averages the per-rank mean losses into the global mean.

Tolerance: max |Δw| ≤ 1e-6 (fp32; only the reduction order of the all-reduce differs; measured 1.2e-7
while the weights moved up to 2e-3).
"""
from __future__ import annotations

from tasks.train.launch import launch_accelerate
from tasks.train.loop import run_training

from .conftest import child_env, run_spec, unet_weights

# Adam's eps is raised so that near-zero gradients (whose sign the all-reduce order can flip) do not get
# amplified into full-size steps: with eps ≫ |g| the update is linear in g, so rounding stays rounding.
COMMON = dict(epochs=2, grad_accum=2, lr=5e-4, optimizer="adamw", eps=1e-4, caption_dropout=0.25,
              checkpoint_every=100)


def test_two_gloo_processes_equal_one_with_double_batch(make_cache, model_cache, tmp_path):
    store, manifest = make_cache(n=16, buckets=((64, 64), (128, 64)))
    one = run_training(run_spec(store, manifest, tmp_path / "one", model_cache, batch_size=4, **COMMON))

    work = tmp_path / "two"
    spec = run_spec(store, manifest, work, model_cache, batch_size=2, launcher="accelerate", num_processes=2,
                    **COMMON)
    spec.save(work / "run.json")
    lines, events = [], []
    launch_accelerate(work / "run.json", 2, on_line=lines.append, on_event=events.append, env=child_env())
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # rank 0 alone reports
    assert [e["step"] for e in events if e["event"] == "progress"] == list(range(1, one["steps"] + 1))
    a, b = unet_weights(tmp_path / "one"), unet_weights(work)
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source

    base = load_sd15(resolve_model_source("builtin:tiny-sd15", model_cache), ("unet",)).unet.state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - w).abs().max()) for k, w in base.items())
    assert moved > 1e-4  # the weights did train
    assert diff <= 1e-6, diff
    done = [e for e in events if e["event"] == "done"][0]
    assert done["samples_seen"] == one["samples_seen"] and done["steps"] == one["steps"]
    assert abs(done["final_loss"] - one["final_loss"]) < 1e-5
