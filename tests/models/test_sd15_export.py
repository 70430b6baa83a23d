from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from data_contracts.errors import ConfigError
from tasks.models.configs import SD15_CONFIG_DIR
from tasks.models.load import SD15Components, load_sd15, save_diffusers_folder
from tasks.models.single_file import (CLIP_PREFIX, clip_to_ldm, export_single_file, unet_diffusers_to_ldm,
                                      vae_diffusers_to_ldm)
from tasks.models.sources import resolve_model_source
from tasks.models.tiny import build_tiny_models, tiny_configs


def _outputs(c: SD15Components, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = c.text_encoder.config.hidden_size
    lat = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 154, d, generator=g)
    px = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        return {
            "unet": c.unet(lat, torch.tensor([999.0, 250.5]), encoder_hidden_states=ctx).sample,
            "vae_enc": c.vae.encode(px).latent_dist.mean,
            "vae_dec": c.vae.decode(lat[:1]).sample,
            "te": c.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2],
        }


def _assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def _components(unet, vae, te) -> SD15Components:
    return SD15Components(unet=unet, vae=vae, text_encoder=te)


@pytest.mark.parametrize("overrides", [
    {},
    # Other shapes convert too: 2 layers per block, attention on every down level, a 2-level VAE.
    {"unet": {"layers_per_block": 2, "block_out_channels": [32, 32],
              "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
     "vae": {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 2}},
], ids=["tiny", "other-shape"])
def test_export_roundtrip_fp32_is_exact(tmp_path, model_cache, overrides):
    unet, vae, te = build_tiny_models(7, tiny_configs(**overrides))
    # Perturb every parameter so zero-initialised or default weights cannot hide a wrong mapping.
    with torch.no_grad():
        for m in (unet, vae, te):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    ref = _outputs(_components(unet, vae, te))
    path = tmp_path / "out.safetensors"
    export_single_file(unet, vae, te, path, dtype=torch.float32, metadata={"objective": "flow", "shift": "3"})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp file renamed away
    src = resolve_model_source(str(path), model_cache)  # configs come from the embedded metadata
    loaded = load_sd15(src, components=("unet", "vae", "text_encoder"))
    _assert_same(ref, _outputs(loaded))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["objective"] == "flow" and meta["shift"] == "3"


def test_export_fp16_layout_and_dtypes(tmp_path, tiny):
    path = tmp_path / "fp16.safetensors"
    export_single_file(tiny.unet, tiny.vae, tiny.text_encoder, path, metadata={})
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
        pos = f.get_tensor(CLIP_PREFIX + "embeddings.position_ids")
        dtypes = {f.get_tensor(k).dtype for k in keys if k != CLIP_PREFIX + "embeddings.position_ids"}
    assert dtypes == {torch.float16}
    assert pos.dtype == torch.int64 and pos.tolist() == [list(range(77))]
    assert q.ndim == 4 and q.shape[2:] == (1, 1)  # 1x1 conv, as LDM stores VAE attention
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", CLIP_PREFIX)) for k in keys)
    # fp16 round trip: close to the fp32 model
    loaded = load_sd15(resolve_model_source(str(path), tiny.source.cache_dir),
                       components=("unet", "vae", "text_encoder"))
    _assert_same(_outputs(tiny), _outputs(loaded), atol=5e-2)


def test_export_replaces_existing_file_atomically(tmp_path, tiny):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old junk")
    export_single_file(tiny.unet, None, None, path, dtype=torch.float32, metadata={"a": "b"})
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("model.diffusion_model.") for k in f.keys())


def test_clip_keys_with_and_without_text_model_prefix(tiny):
    sd = tiny.text_encoder.state_dict()
    flat = clip_to_ldm(sd)
    nested = clip_to_ldm({"text_model." + k: v for k, v in sd.items()})  # transformers < 5.6 naming
    assert flat.keys() == nested.keys()
    assert CLIP_PREFIX + "encoder.layers.2.mlp.fc2.weight" in flat


def test_full_size_sd15_mapping_matches_diffusers_converters():
    # The real SD1.5 shape on the meta device: our diffusers->LDM names, fed back through diffusers'
    # own LDM->diffusers converters, must give every key back with its shape; and known LDM names exist.
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in te.parameters()) == 123_060_480
    lu = unet_diffusers_to_ldm(unet.state_dict(), unet.config)
    lv = vae_diffusers_to_ldm(vae.state_dict(), vae.config)
    lc = clip_to_ldm(te.state_dict())
    assert (len(lu), len(lv), len(lc)) == (686, 248, 197)  # the key counts of the original SD1.5 file
    known = {
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        CLIP_PREFIX + "encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }
    allk = {**lu, **lv, **lc}
    for k, shape in known.items():
        assert tuple(allk[k].shape) == shape, k
    back_u = convert_ldm_unet_checkpoint(lu, unet.config)
    back_v = convert_ldm_vae_checkpoint(lv, vae.config)
    for back, ref in ((back_u, unet.state_dict()), (back_v, vae.state_dict())):
        assert back.keys() == ref.keys()
        assert all(back[k].shape == ref[k].shape for k in ref)


def test_save_diffusers_folder_roundtrip(tmp_path, tiny, model_cache):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    out = tmp_path / "pipe"
    with pytest.raises(ConfigError, match="_class_name"):
        save_diffusers_folder(tiny, out, scheduler_config=dict(sched.config))
    assert not out.exists()
    save_diffusers_folder(tiny, out, scheduler_config=sched)
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    src = resolve_model_source(str(out), model_cache)
    assert src.kind == "diffusers" and src.tokenizer_dir == out / "tokenizer"
    loaded = load_sd15(src)
    _assert_same(_outputs(tiny), _outputs(loaded))
    assert loaded.tokenizer("a photo of a cat").input_ids[-1] == 49407
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    # Saving again replaces the folder (and the identity follows the new weights).
    tiny_unet_copy = type(tiny.unet).from_config(tiny.unet.config)
    tiny_unet_copy.load_state_dict(tiny.unet.state_dict())
    with torch.no_grad():
        tiny_unet_copy.conv_out.bias.add_(1.0)
    save_diffusers_folder(SD15Components(unet=tiny_unet_copy, vae=tiny.vae, text_encoder=tiny.text_encoder,
                                         tokenizer=tiny.tokenizer), out,
                          scheduler_config={**dict(sched.config), "_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert resolve_model_source(str(out), model_cache).identity != src.identity
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pipeline_from_single_file_with_pipeline_config_dir(tiny_source, tiny):
    from diffusers import StableDiffusionPipeline

    from tasks.models.sources import pipeline_config_dir

    cfg = pipeline_config_dir(tiny_source)
    pipe = StableDiffusionPipeline.from_single_file(str(tiny_source.path), config=str(cfg),
                                                    local_files_only=True, safety_checker=None)
    _assert_same(_outputs(tiny), _outputs(SD15Components(unet=pipe.unet, vae=pipe.vae,
                                                         text_encoder=pipe.text_encoder)))


def test_export_unwraps_compiled_modules(tmp_path, tiny):
    plain, compiled = tmp_path / "plain.safetensors", tmp_path / "compiled.safetensors"
    export_single_file(tiny.unet, tiny.vae, tiny.text_encoder, plain, dtype=torch.float32)
    export_single_file(torch.compile(tiny.unet), tiny.vae, tiny.text_encoder, compiled, dtype=torch.float32)
    assert plain.read_bytes() == compiled.read_bytes()  # also: the header is canonical (byte-stable)


def test_unmapped_keys_are_errors_not_dropped(tiny):
    sd = dict(tiny.unet.state_dict())
    sd["class_embedding.linear_1.weight"] = torch.zeros(1)  # an SD1.5 UNet has no class embedding
    with pytest.raises(ValueError, match="class_embedding"):
        unet_diffusers_to_ldm(sd, tiny.unet.config)
    vsd = dict(tiny.vae.state_dict())
    vsd["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.extra"):
        vae_diffusers_to_ldm(vsd, tiny.vae.config)
