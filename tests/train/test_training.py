"""The training loop on CPU with the tiny UNet: it learns, it feeds the UNet what the math says, it survives
NaNs the documented way."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_contracts.errors import StageError
from data_contracts.store import ArtifactStore
from tasks.train.checkpoint import latest_checkpoint
from tasks.train.loop import run_training

from .conftest import commit_cache, run_spec, sample_rows, unet_weights


def test_loss_falls_on_a_small_dataset(make_cache, model_cache, tmp_path):
    store, manifest = make_cache(n=16, buckets=((64, 64),))
    work = tmp_path / "work"
    spec = run_spec(store, manifest, work, model_cache, epochs=6, lr=2e-3,
                    validation={"fraction": 0.2, "every": 4, "sigmas": [0.2, 0.5, 0.8]})
    result = run_training(spec)
    rows = [json.loads(l) for l in (work / "history.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 6
    # held-out loss at fixed σ/noise is deterministic: it must fall clearly, not by luck of the draw
    assert val[-1] < 0.8 * val[0], val
    train = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(train[-4:]) < np.mean(train[:4])
    assert result["steps"] == len(train) and result["skipped_steps"] == 0
    assert result["validation"]["val_loss"] == pytest.approx(val[-1])


def test_unet_gets_sigma_times_1000_and_the_flow_target(model_cache, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tasks.diffusion.objectives import Objective
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source
    from tasks.models.text_encode import pack_batch
    from tasks.train.batches import StepBatch
    from tasks.train.engine import Engine, make_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    comps = load_sd15(resolve_model_source("builtin:tiny-sd15", model_cache), ("unet", "text_encoder"))
    unet = comps.unet.train()
    seen = {}
    forward = unet.forward

    def recording(sample, timestep, encoder_hidden_states, **kw):
        seen.update(sample=sample.detach().clone(), timestep=timestep.detach().clone(), ctx=encoder_hidden_states)
        out = forward(sample, timestep, encoder_hidden_states, **kw)
        seen["pred"] = out[0].detach().clone()
        return out

    unet.forward = recording
    opt = make_optimizer([{"params": list(unet.parameters())}], kind="adamw", lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    obj = Objective("flow", shift=2.0)
    engine = Engine(acc, unet, opt, sched, obj, grad_accum=1, max_grad_norm=1.0, text_encoder=comps.text_encoder)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    b = StepBatch(ids=[1, 2], bucket=(64, 64), x0=x0, noise=noise, levels=obj.levels([0.25, 0.75], [0, 0]),
                  token_ids=pack_batch([[320, 1125], []], 3), weight=torch.tensor([1.0, 3.0]))
    loss = engine.loss(b)
    assert seen["timestep"].tolist() == [250.0, 750.0]
    torch.testing.assert_close(seen["sample"], torch.stack([0.75 * x0[0] + 0.25 * noise[0],
                                                            0.25 * x0[1] + 0.75 * noise[1]]))
    assert seen["ctx"].shape == (2, 77, 64)  # 1 chunk of 77 tokens, tiny CLIP width 64
    mse = (seen["pred"] - (noise - x0)).pow(2).flatten(1).mean(1)
    assert float(loss.detach()) == pytest.approx(float((mse * torch.tensor([1.0, 3.0])).mean()), rel=1e-5)


def _nan_cache(tmp_path, tokenizer, nan_bucket_only: bool):
    rows = sample_rows(16, [(64, 64), (128, 64)], tokenizer)
    for r in rows:
        if not nan_bucket_only or r["bucket_w"] == 128:
            shape = (4, r["bucket_h"] // 8, r["bucket_w"] // 8)
            r["latent_mean"] = np.full(shape, np.nan, dtype=np.float16).tobytes()
    store = ArtifactStore(str(tmp_path / "data"), local_cache=tmp_path / "local")
    return store, commit_cache(store, rows)


def test_nan_steps_are_skipped_and_counted(tmp_path, tokenizer, model_cache):
    store, manifest = _nan_cache(tmp_path, tokenizer, nan_bucket_only=True)
    work = tmp_path / "work"
    result = run_training(run_spec(store, manifest, work, model_cache, epochs=2, checkpoint_every=1,
                                   nan_tolerance=100))
    # 2 epochs x (2 batches of 64x64 + 2 NaN batches of 128x64)
    assert result["steps"] == 8 and result["skipped_steps"] == 4
    weights = unet_weights(work)
    assert all(torch.isfinite(w).all() for w in weights.values())  # skipped updates never touched them


def test_a_run_of_nans_stops_with_the_last_good_checkpoint_intact(tmp_path, tokenizer, model_cache):
    store, manifest = _nan_cache(tmp_path, tokenizer, nan_bucket_only=False)
    work = tmp_path / "work"
    with pytest.raises(StageError, match=r"2 optimiser steps in a row.*nan_tolerance=2") as err:
        run_training(run_spec(store, manifest, work, model_cache, epochs=2, checkpoint_every=1, nan_tolerance=2))
    ckpt = latest_checkpoint(work)
    assert ckpt is not None and ckpt.name == "step-00000001"  # written after the first (skipped) step
    # ... so it is not called good: every step was non-finite, no checkpoint predates the fault
    msg = str(err.value)
    assert "first non-finite step (1)" in msg and "none is known good" in msg, msg
    assert f"{ckpt} was saved after it" in msg and "is known good" not in msg.replace("none is known good", "")
    assert all(torch.isfinite(w).all() for w in unet_weights(work).values())
    assert not list((work / "checkpoints").glob(".tmp-*"))
    saved = json.loads((ckpt / "trainer.json").read_text())
    assert saved["consecutive_bad"] == 1 and saved["skipped_steps"] == 1


def test_a_nan_stop_names_the_checkpoint_from_before_the_first_bad_step(make_cache, model_cache, tmp_path,
                                                                         monkeypatch):
    """Steps 1-2 are finite, 3 on are not: with a checkpoint every step, step-3 is the newest at the stop,
    but it was saved after a non-finite step; the message must name step-2."""
    from tasks.train import parts

    class NanFromStep3(parts.Engine):
        micro = 0

        def micro_step(self, b):
            self.micro += 1
            if self.micro >= 3:  # grad_accum=1: micro-batch k is optimiser step k
                b.x0 = torch.full_like(b.x0, float("nan"))
            return super().micro_step(b)

    monkeypatch.setattr(parts, "Engine", NanFromStep3)
    store, manifest = make_cache(n=16, buckets=((64, 64),))
    work = tmp_path / "work"
    with pytest.raises(StageError, match=r"training stopped at step 4: 2 optimiser steps in a row") as err:
        run_training(run_spec(store, manifest, work, model_cache, epochs=2, checkpoint_every=1, keep_last=5,
                              nan_tolerance=2))
    assert latest_checkpoint(work).name == "step-00000003"  # saved after the first non-finite step
    msg = str(err.value)
    good = work / "checkpoints" / "step-00000002"
    assert f"saved before the first non-finite step (3) is {good}." in msg, msg
    assert "step-00000003" not in msg
    assert json.loads((good / "trainer.json").read_text())["skipped_steps"] == 0


def test_a_nan_stop_with_the_good_checkpoints_pruned_names_none(tmp_path):
    from tasks.train.guard import nan_stop_message

    root = tmp_path / "checkpoints"
    for step in (5, 6):  # keep_last removed everything from before the bad run (it began at step 5)
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "trainer.json").write_text("{}")
    (root / "LATEST").write_text("step-00000006")
    (root / ".tmp-step-00000002").mkdir()  # an unfinished one is never named
    msg = nan_stop_message(tmp_path, 7, 3, 3)
    assert "No checkpoint saved before the first non-finite step (5) is left, so none is known good" in msg
    assert f"{root / 'step-00000006'} was saved after it" in msg


def test_channels_last_survives_8bit_adamw_with_the_same_update():
    """bitsandbytes makes parameters contiguous on every step; the engine puts 4-D weights back into
    channels_last (a compiled channels_last graph asserts their strides). The 8-bit update is element-wise,
    so it must be bit-identical whatever the layout: same values, same grads -> same weights."""
    from tasks.train.engine import keep_channels_last, make_optimizer

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 32, 3, 3, generator=g)
    grads = [torch.randn(64, 32, 3, 3, generator=g) for _ in range(3)]
    finals = []
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        p = torch.nn.Parameter(w0.clone().contiguous(memory_format=fmt))
        opt = make_optimizer([{"params": [p]}], kind="adamw8bit", lr=1e-2)
        for grad in grads:
            p.grad = grad.clone().contiguous(memory_format=fmt)
            opt.step()
            if channels_last:
                assert p.is_contiguous()  # what bitsandbytes does...
                keep_channels_last([p])
                assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()  # ...undone
            opt.zero_grad(set_to_none=True)
        finals.append(p.detach().contiguous())
    assert not torch.equal(finals[0], w0)
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=0)


def test_sample_grid_under_bf16_autocast_is_an_image(make_cache, model_cache, tmp_path):
    """Grids render with bf16 autocast (as on a GPU) and are not blank: the VAE decodes outside autocast."""
    from PIL import Image

    store, manifest = make_cache(n=8, buckets=((64, 64),))
    work = tmp_path / "work"
    result = run_training(run_spec(store, manifest, work, model_cache, max_steps=1, mixed_precision="bf16",
                                   sampling={"prompts": ["1girl, smile"], "seeds": [0, 1], "steps": 2,
                                             "width": 64, "height": 64}))
    assert result["samples"] == ["samples/step-00000001.png"]
    grid = np.asarray(Image.open(work / result["samples"][0]))
    # one row (prompt) x two columns (seeds) of 64 px images shown at >= 128 px, each with its caption below
    assert grid.shape[1] >= 2 * 128 and grid.shape[0] > 128 and grid.std() > 5


def test_cudagraph_bookkeeping_keeps_own_grad_buffers_with_the_same_update(model_cache):
    """Under CUDA graphs gradients must never be graph outputs adopted as .grad: the engine gives every
    parameter its own gradient buffer, zeroes instead of freeing it, and starts a graph step per micro-step.
    The update must be exactly the plain one (2 windows of 2 micro-steps, CPU: same arithmetic)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from tasks.diffusion.objectives import Objective
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source
    from tasks.models.text_encode import pack_batch
    from tasks.train.batches import StepBatch
    from tasks.train.engine import Engine, make_optimizer

    finals, buffers = [], []
    for cudagraphs in (False, True):
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(cpu=True)
        comps = load_sd15(resolve_model_source("builtin:tiny-sd15", model_cache), ("unet", "text_encoder"))
        unet = comps.unet.train()
        opt = make_optimizer([{"params": list(unet.parameters())}], kind="adamw", lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        obj = Objective("flow", shift=2.0)
        engine = Engine(acc, unet, opt, sched, obj, grad_accum=2, max_grad_norm=1.0,
                        text_encoder=comps.text_encoder, cudagraphs=cudagraphs)
        first = next(unet.parameters())
        before = first.grad
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            b = StepBatch(ids=[1, 2], bucket=(64, 64), x0=torch.randn(2, 4, 8, 8, generator=g),
                          noise=torch.randn(2, 4, 8, 8, generator=g),
                          levels=obj.levels([0.3, 0.6], [0, 0]), token_ids=pack_batch([[320], []], 3),
                          weight=torch.ones(2))
            engine.micro_step(b)
            if engine.window_full:
                assert engine.optimizer_step().applied
        buffers.append((before, first.grad))
        finals.append({k: v.detach().clone() for k, v in unet.state_dict().items()})
    assert buffers[0][0] is None and buffers[0][1] is None  # plain path frees gradients
    own_before, own_after = buffers[1]
    assert own_after is own_before and not own_after.any()  # same buffer, zeroed after the step
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=0, atol=0)


def test_compile_under_ddp_with_accumulation_keeps_the_whole_graph(monkeypatch):
    """DDP + accumulation: one graph (DDP's hooks all-reduce after backward, on one micro-step in N);
    otherwise dynamo's DDPOptimizer splits the graph at the gradient buckets (its default)."""
    import torch._dynamo

    from tasks.train.engine import ddp_whole_graph, prepare_unet

    assert ddp_whole_graph(2, 14) and not ddp_whole_graph(1, 14) and not ddp_whole_graph(2, 1)
    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)
    prepare_unet(torch.nn.Linear(2, 2), compile=True, ddp_whole_graph=True)  # compiles lazily: nothing runs
    assert torch._dynamo.config.optimize_ddp is False
    prepare_unet(torch.nn.Linear(2, 2), compile=True)
    assert torch._dynamo.config.optimize_ddp is True
