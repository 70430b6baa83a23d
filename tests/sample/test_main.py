"""`fm sample` entry point: files, numbering, metadata, grid, progress, notes, seeds, errors; the ε path's
change of variables."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data_contracts.errors import ConfigError
from tasks.sample.main import sample_main, write_samples
from tasks.sample.pipeline import SampleSettings, epsilon_flow_sigmas, generate, make_velocity_fn, sd15_ve_sigmas
from tasks.sample.pngmeta import read_png_info
from tasks.sample.samplers import sample


def _arr(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_sample_main_writes_pngs_with_parameters_and_a_grid(model_cache, tmp_path):
    long_prompt = "1girl, " + ", ".join(["long hair", "blue eyes", "smile"] * 30)  # > 75 tokens: 4 chunks
    paths = sample_main("builtin:tiny-sd15", ["1girl, (smile:1.2)", long_prompt], "worst quality",
                        out_dir=tmp_path, steps=3, seed=40, width=32, height=40, sampler="dpmpp_sde",
                        images_per_prompt=2, batch_size=3, cache_dir=model_cache, device="cpu")
    assert [p.name for p in paths] == ["00000-40.png", "00001-41.png", "00002-42.png", "00003-43.png",
                                       "grid-00000.png"]  # every file written, the grid last
    info = read_png_info(paths[2])
    assert info.prompt == long_prompt and info.negative_prompt == "worst quality"
    p = info.params
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"]) == ("3", "DPM++ SDE", "6", "42", "32x40")
    assert (p["Clip skip"], p["Shift"], p["Prediction"], p["Model"]) == ("2", "3", "flow", "tiny-sd15")
    assert len(p["Model hash"]) == 10
    grid = Image.open(paths[-1])
    assert grid.width > 2 * 128 and grid.height > 2 * 128  # 32x40 tiles enlarged to >= 128 px to be readable
    assert _arr(paths[0]).shape == (40, 32, 3)
    assert np.abs(_arr(paths[0]) - _arr(paths[1])).max() > 10  # different seeds, different images


def test_sampling_twice_into_one_folder_keeps_both_sets_in_order(tiny, tmp_path):
    settings = SampleSettings(steps=2, width=32, height=32)
    (tmp_path / "00006-99.png").write_bytes(b"")  # someone else's file: numbering continues after it
    first = write_samples(tiny, ["a", "b"], ["", ""], tmp_path, settings=settings, seed=3)
    first_bytes = [p.read_bytes() for p in first]
    second = write_samples(tiny, ["a", "b"], ["", ""], tmp_path, settings=settings, seed=3)
    assert [p.name for p in first] == ["00007-3.png", "00008-4.png", "grid-00007.png"]
    assert [p.name for p in second] == ["00009-3.png", "00010-4.png", "grid-00009.png"]
    assert [p.read_bytes() for p in first] == first_bytes  # nothing of the first run was overwritten
    assert read_png_info(second[0]).params["Seed"] == "3"
    assert np.abs(_arr(first[0]) - _arr(second[0])).max() == 0  # same seed, same image, new file


def test_progress_counts_denoising_steps_times_images(tiny, tmp_path):
    calls = []
    write_samples(tiny, ["a", "b", "c"], ["", "", ""], tmp_path, settings=SampleSettings(steps=4, width=32, height=32),
                  batch_size=2, images_per_prompt=1, grid=False, progress=lambda done, total: calls.append((done, total)))
    assert {t for _, t in calls} == {12}  # 4 steps x 3 images
    # one call per step: batch 1 (2 images) then batch 2 (1 image), after an initial 0
    assert [d for d, _ in calls] == [0, 2, 4, 6, 8, 9, 10, 11, 12]


def test_parameters_name_the_checkpoint_file_and_its_hash(tiny, model_cache, tmp_path):
    import hashlib

    from tasks.models.load import save_diffusers_folder
    from tasks.models.sources import resolve_model_source

    builtin = resolve_model_source("builtin:tiny-sd15", model_cache).path
    run = tmp_path / "data" / "train" / "7d7cb8abbf906fd3"  # a pipeline output: the stem alone says "model"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(builtin.read_bytes())
    named = tmp_path / "my-finetune-e0003.safetensors"
    named.write_bytes(builtin.read_bytes())
    kw = dict(steps=1, width=32, height=32, cache_dir=model_cache, device="cpu", grid=False, notify=lambda m: None)
    p = read_png_info(sample_main(str(named), "x", out_dir=tmp_path / "a", **kw)[0]).params
    assert p["Model"] == "my-finetune-e0003"
    assert p["Model hash"] == hashlib.sha256(named.read_bytes()).hexdigest()[:10]  # A1111's short hash
    p = read_png_info(sample_main(str(run / "model.safetensors"), "x", out_dir=tmp_path / "b", **kw)[0]).params
    assert p["Model"] == "train-7d7cb8ab-model"
    folder = tmp_path / "fm-diffusers"
    save_diffusers_folder(tiny.components, folder)
    p = read_png_info(sample_main(str(folder), "x", out_dir=tmp_path / "c", **kw)[0]).params
    assert p["Model"] == "fm-diffusers" and "Model hash" not in p  # a folder: no single file to hash


def test_a_tiny_demo_model_says_that_noise_is_expected(model_cache, tmp_path, capsys):
    notes = []
    sample_main("builtin:tiny-sd15", "x", out_dir=tmp_path, steps=1, width=32, height=32, cache_dir=model_cache,
                device="cpu", grid=False, notify=notes.append)
    assert len(notes) == 1 and "tiny" in notes[0] and "coloured noise" in notes[0] and "expected" in notes[0]
    sample_main("builtin:tiny-sd15", "x", out_dir=tmp_path, steps=1, width=32, height=32, cache_dir=model_cache,
                device="cpu", grid=False)
    assert "coloured noise" in capsys.readouterr().err  # default: one line on stderr


def test_same_seed_same_image_whatever_the_batching(tiny):
    for name in ("euler_ancestral", "dpmpp_sde"):  # the stochastic ones: their noise is per image too
        kw = dict(steps=3, width=32, height=32, sampler=name, seed=11)
        alone = generate(tiny.components, ["x", "1girl, smile"], **kw, batch_size=1)
        together = generate(tiny.components, ["x", "1girl, smile"], **kw, batch_size=2)
        for a, b in zip(alone, together):
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1, name


def test_bad_arguments_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="multiple of 8"):
        generate(tiny.components, "x", width=100, height=64, steps=1)
    with pytest.raises(ConfigError, match="sampler"):
        generate(tiny.components, "x", width=64, height=64, steps=1, sampler="lms")
    with pytest.raises(ConfigError, match="negative"):
        generate(tiny.components, ["a", "b", "c"], ["n1", "n2"], width=64, height=64, steps=1)
    with pytest.raises(ConfigError, match="not found"):
        sample_main("/nonexistent/model.safetensors", "x", out_dir="/tmp/unused")


class _GaussianEpsModel(torch.nn.Module):
    """The exact ε-prediction of SD1.5's DDPM for data x0 ~ N(MU, SD²), called like a UNet."""

    MU, SD = 0.4, 0.5

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.log_table = sd15_ve_sigmas().log()

    def forward(self, x, t, encoder_hidden_states=None):
        s = float(np.exp(np.interp(float(t), np.arange(1000), self.log_table.numpy())))
        ab = 1.0 / (1.0 + s * s)
        ra, rb = math.sqrt(ab), math.sqrt(1 - ab)
        m = self.MU + ra * self.SD ** 2 / (ab * self.SD ** 2 + 1 - ab) * (x - ra * self.MU)
        return type("Out", (), {"sample": (x - ra * m) / rb})()


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_epsilon_models_run_through_the_flow_samplers(name):
    # The change of variables is exact: an ε-model of N(MU, SD²) data must sample N(MU, SD²).
    model = _GaussianEpsModel()
    emb = torch.zeros(1, 1, 1)
    velocity = make_velocity_fn(model, emb, None, 1.0, prediction="epsilon")
    sig = epsilon_flow_sigmas(100).double()
    assert 0.93 < sig[0] < 0.94 and sig[-1] == 0  # SD1.5 never reaches pure noise: σ_max = s/(1+s), s ≈ 14.6
    x = torch.randn(1, 20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample(name, velocity, (x - x.mean()) / x.std() * float(sig[0]), sig)
    assert out.mean().item() == pytest.approx(model.MU, abs=0.03)
    assert out.std().item() == pytest.approx(model.SD, rel=0.05)


def test_training_step_folder_on_its_base_model(tiny, model_cache, tmp_path):
    import json

    from safetensors.torch import save_file

    from tasks.sample.main import load_for_sampling

    step = tmp_path / "checkpoints" / "step-00000010"
    step.mkdir(parents=True)
    state = {k: v.clone() for k, v in tiny.components.unet.state_dict().items()}
    state["conv_out.bias"] += 0.5  # a "trained" UNet that differs from the base
    save_file(state, str(step / "unet.safetensors"))
    (step / "trainer.json").write_text(json.dumps({"step": 10}))
    with pytest.raises(ConfigError, match="base_model"):
        load_for_sampling(str(step), cache_dir=model_cache, device="cpu")
    loaded = load_for_sampling(str(step), cache_dir=model_cache, device="cpu", base_model="builtin:tiny-sd15")
    torch.testing.assert_close(loaded.components.unet.state_dict()["conv_out.bias"], state["conv_out.bias"])
    assert loaded.name == f"{tmp_path.name}-step-00000010" and loaded.prediction == "flow"  # <run folder>-<step>
    kw = dict(steps=2, width=32, height=32, seed=1)
    a = generate(loaded.components, "x", **kw)[0]
    b = generate(tiny.components, "x", **kw)[0]
    assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() > 5
