"""The train stage end to end through run_stage: manifest, history table, report, sample grids, and an export
that diffusers loads back (`from_single_file`) with identical UNet outputs."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from data_contracts.tables import read_table
from data_contracts.train import HISTORY_SCHEMA
from pipeline_config.load import load_config
from tasks.common.stage import run_stage
from tasks.models.single_file import read_metadata
from tasks.models.sources import pipeline_config_dir, resolve_model_source
from tasks.train.loop import RunSpec
from tasks.train.stage import SPEC

from .conftest import base_train


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([250.0, 900.0]), encoder_hidden_states=ctx).sample


def test_stage_trains_exports_and_reloads_through_diffusers(make_cache, model_cache, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

    store, cache = make_cache(n=16, buckets=((64, 64),))
    train = base_train(epochs=2, export_dtype="fp32", export_diffusers=True, keep_checkpoint_in_output=True,
                       validation={"fraction": 0.2},
                       sampling={"prompts": ["1girl, frieren"], "seeds": [0, 1], "steps": 2, "width": 64,
                                 "height": 64},
                       logging={"every": 2, "tensorboard": True})
    cfg = load_config({"data_root": store.root_url, "runtime": {"device": "cpu", "cache_dir": str(model_cache)},
                       "train": train})
    progress = []
    out = run_stage(SPEC, cfg, store, progress=lambda f, m: progress.append(f))
    m = out.manifest
    assert not out.cached and m.objective == "flow" and m.steps == 8 and m.epochs == 2
    assert m.upstream == {"cache": cache.fingerprint} and m.recommended_shift == 3.0
    assert m.base_model_identity == resolve_model_source("builtin:tiny-sd15", model_cache).identity
    assert m.samples == ["samples/step-00000008.png"] and m.checkpoint == "booruflow-default.safetensors"
    files = {f.path for f in m.files}
    assert {m.checkpoint, "history.parquet", "samples/step-00000008.png", "diffusers/model_index.json",
            "checkpoints/LATEST"} <= files
    assert any(p.startswith("tb/") for p in files)
    assert progress and progress == sorted(progress)
    folder = store.output_path("train", m.fingerprint)
    # run.json moved with the work folder: it must name the output folder, not the deleted _work one
    assert "run.json" in files
    run_text = (Path(folder) / "run.json").read_text()
    assert "_work" not in run_text and str(store.work_dir("train", m.fingerprint)) not in run_text
    assert Path(RunSpec.load(Path(folder) / "run.json").work) == Path(folder)
    hist = read_table(store.path(m, "history.parquet"), HISTORY_SCHEMA)
    assert hist.column("step").to_pylist() == [2, 4, 6, 8]
    assert hist.column("val_loss").to_pylist()[-1] == pytest.approx(m.stats["validation"]["val_loss"], rel=1e-6)
    assert out.report.images == {"training curves": "visuals/train-curves.png",
                                 "samples at step-00000008": "samples/step-00000008.png"}
    assert "visuals/train-curves.png" in files
    assert "flow objective" in out.report.summary_md

    # the single file names its objective and shift, and loads through diffusers with the same outputs
    ckpt = store.path(m, m.checkpoint)
    meta = read_metadata(ckpt)
    assert meta["booruflow.objective"] == "flow" and meta["booruflow.recommended_shift"] == "3"
    assert meta["modelspec.prediction_type"] == "rectified-flow"
    src = resolve_model_source(str(ckpt), model_cache)
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(pipeline_config_dir(src, model_cache)),
                                                    local_files_only=True, safety_checker=None)
    trained = UNet2DConditionModel.from_config(pipe.unet.config)
    trained.load_state_dict(load_file(str(folder + "/checkpoints/step-00000008/unet.safetensors")))
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(trained), rtol=0, atol=0)
    base = UNet2DConditionModel.from_single_file(str(resolve_model_source("builtin:tiny-sd15", model_cache).path),
                                                 config=str(src.config_dir), subfolder="unet", local_files_only=True)
    assert not torch.equal(_unet_out(base), _unet_out(trained))  # it did train
    # the diffusers folder samples with flow out of the box
    folder_pipe = StableDiffusionPipeline.from_pretrained(folder + "/diffusers", local_files_only=True,
                                                          safety_checker=None)
    assert isinstance(folder_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert folder_pipe.scheduler.config.shift == 3.0
    torch.testing.assert_close(_unet_out(folder_pipe.unet), _unet_out(trained), rtol=0, atol=0)

    again = run_stage(SPEC, cfg, store)
    assert again.cached and again.manifest.fingerprint == m.fingerprint
    assert pq.read_metadata(store.path(m, "history.parquet")).num_rows == 4


def test_run_file_names_its_own_folder_wherever_it_moves(tmp_path):
    """`fm train-node` reads run.json from the work folder during the run; after the commit renames that
    folder, the same file must name the new place."""
    work = tmp_path / "train" / "_work" / "fp1"
    work.mkdir(parents=True)
    spec = RunSpec(train={}, work=str(work), data_root=str(tmp_path), local_cache=str(tmp_path / "cache"),
                   cache_fingerprint="c", model_cache_dir=str(tmp_path / "models"))
    spec.save(work / "run.json")
    assert RunSpec.load(work / "run.json") == spec
    final = tmp_path / "train" / "fp1"
    work.rename(final)
    assert RunSpec.load(final / "run.json").work == str(final)
    elsewhere = tmp_path / "elsewhere.json"  # a file outside the work folder keeps the absolute path
    spec.save(elsewhere)
    assert RunSpec.load(elsewhere).work == str(work)
