"""`fm sample` and diffusers' StableDiffusionPipeline + FlowMatchEulerDiscreteScheduler make the same image.

diffusers side: the pipeline is loaded by diffusers itself (``from_single_file`` of our exported checkpoint,
offline with the config folder), samples with FlowMatchEulerDiscreteScheduler(shift=3) and decodes with its
own VAE call and image post-processing. Three adjustments make it a flow pipeline:
  * ``scheduler.init_noise_sigma = 1.0`` — the flow scheduler has no such attribute, StableDiffusionPipeline
    multiplies the initial noise by it (σ_0 = 1: pure noise);
  * timesteps: nothing to do, the scheduler already hands the UNet σ·1000 as floats;
  * prompt embeddings are passed in (``prompt_embeds`` / ``negative_prompt_embeds``) from our encoder: diffusers
    has no A1111 weighting, and its ``clip_skip`` path fails with transformers >= 5.6 (diffusers#14124).
    test_prompt.py checks separately that our CLIP skip 2 is diffusers' clip_skip=1.
Noise: one CPU generator per image seeded seed + i, on both sides.
Tolerance: at most 1/255 per pixel channel (uint8 rounding); on CPU in fp32 the images are identical.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from tasks.models.single_file import export_single_file
from tasks.sample.main import sample_main
from tasks.sample.prompt import encode_prompt_pair

PROMPTS = ["1girl, (red hair:1.2), smile, masterpiece", "1boy, [blue eyes], aoi \\(series\\), good score"]
NEGATIVE = "(worst quality, bad score:1.1), sketch"


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    c = tiny.components
    path = tmp_path_factory.mktemp("export") / "fm-tiny.safetensors"
    export_single_file(c.unet, c.vae, c.text_encoder, path, dtype=torch.float16,
                       metadata={"booruflow.objective": "flow", "booruflow.recommended_shift": "3"})
    return path


@pytest.fixture(scope="module")
def diffusers_pipe(exported, tiny):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    source = tiny.components.source
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.init_noise_sigma = 1.0
    pipe = StableDiffusionPipeline.from_single_file(
        str(exported), config=str(source.config_dir), local_files_only=True, torch_dtype=torch.float32,
        tokenizer=tiny.components.tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_same_image_as_diffusers_flow_pipeline(exported, diffusers_pipe, model_cache, tmp_path):
    seed, steps, w, h = 1234, 6, 64, 96
    paths = sample_main(str(exported), PROMPTS, NEGATIVE, out_dir=tmp_path, steps=steps, cfg=6.0, sampler="euler",
                        seed=seed, width=w, height=h, batch_size=2, cache_dir=model_cache, device="cpu")
    pipe = diffusers_pipe
    cond, uncond = encode_prompt_pair(pipe.text_encoder, pipe.tokenizer, PROMPTS, [NEGATIVE] * 2)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=6.0,
               width=w, height=h, generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(2)]).images
    for path, ref_im in zip(paths, ref):
        ours = np.asarray(Image.open(path).convert("RGB")).astype(int)
        theirs = np.asarray(ref_im).astype(int)
        assert ours.shape == theirs.shape == (h, w, 3)
        assert np.abs(ours - theirs).max() <= 1
        assert theirs.std() > 5  # a real image, not a constant
    # A different seed is a different image: the comparison can fail.
    other = pipe(prompt_embeds=cond[:1], negative_prompt_embeds=uncond[:1], num_inference_steps=steps,
                 guidance_scale=6.0, width=w, height=h, generator=[torch.Generator().manual_seed(seed + 7)]).images[0]
    first = np.asarray(Image.open(paths[0]).convert("RGB")).astype(int)
    assert np.abs(np.asarray(other).astype(int) - first).max() > 10
