"""`fm models random`: random-weight SD1.5 and WD tagger in the layouts a user gives, loaded by the real code.

Tests write the tiny shapes (``scale="tiny"`` / the tiny configs) so they run on a CI CPU; one test checks that the
default shapes are the real ones (built on the meta device: no memory, no time).
"""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tasks.models.configs import SD15_CONFIG_DIR
from tasks.models.random_models import (
    TAGGER_MODEL_ARGS,
    output_name,
    sd15_configs,
    tagger_model_args,
    write_random_models,
    write_random_sd15,
    write_random_tagger,
)
from tasks.models.single_file import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from tasks.models.tiny import build_tiny_models, tiny_configs
from tasks.tag.tiny import LABELS_FILE, TINY_MODEL_ARGS

PREFIXES = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Both tiny models with ONNX, seed 3, written once through the command's own entry point."""
    out = tmp_path_factory.mktemp("random-models")
    sd15, tagger = write_random_models(out, seed=3, onnx=True, scale="tiny")
    return out, sd15, tagger


# ------------------------------------------------------------------------------------------------- SD1.5

def test_sd15_file_has_the_ldm_layout_and_the_loader_gives_the_random_weights(written, model_cache):
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source

    out, sd15, _ = written
    assert sd15.path == out / "sd15-random-tiny.safetensors" and sd15.written
    assert sd15.size == sd15.path.stat().st_size
    tensors = _tensors(sd15.path)
    assert all(k.startswith(PREFIXES) for k in tensors)
    assert {p for p in PREFIXES if any(k.startswith(p) for k in tensors)} == set(PREFIXES)
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float16}  # the default
    assert tensors[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4  # LDM: attention as 1x1 convs

    # Exactly the loader a user's checkpoint goes through.
    source = resolve_model_source(str(sd15.path), model_cache)
    assert source.kind == "single_file" and source.builtin is None
    loaded = load_sd15(source, components=("unet", "vae", "text_encoder"))
    ref = build_tiny_models(3, tiny_configs())
    for name, want in zip(("unet", "vae", "text_encoder"), ref):
        got, exp = getattr(loaded, name).state_dict(), want.state_dict()
        assert got.keys() == exp.keys(), name
        for k, v in exp.items():  # fp16 file: the loaded fp32 weights are the random ones rounded once
            assert torch.equal(got[k], v.to(torch.float16).to(v.dtype) if v.is_floating_point() else v), (name, k)


def test_sd15_dtype_and_seed(tmp_path, written):
    _, sd15, _ = written
    again = write_random_sd15(tmp_path, seed=3, configs=tiny_configs(), name=sd15.path.name)
    assert _sha(again.path) == _sha(sd15.path)  # same seed, same bytes
    other = write_random_sd15(tmp_path, seed=4, dtype="bf16", configs=tiny_configs(), name="other.safetensors")
    a, b = _tensors(sd15.path), _tensors(other.path)
    assert a.keys() == b.keys()
    key = UNET_PREFIX + "input_blocks.0.0.weight"
    assert b[key].dtype == torch.bfloat16 and not torch.equal(a[key].float(), b[key].float())
    fp32 = write_random_sd15(tmp_path, seed=3, dtype="fp32", configs=tiny_configs(), name="fp32.safetensors")
    assert _tensors(fp32.path)[key].dtype == torch.float32


def test_sd15_kept_unless_forced_and_never_half_written(tmp_path, monkeypatch):
    from tasks.models import single_file

    first = write_random_sd15(tmp_path, seed=1, configs=tiny_configs())
    assert first.written and first.path.name == "sd15-random.safetensors"
    inode = first.path.stat().st_ino
    kept = write_random_sd15(tmp_path, seed=2, configs=tiny_configs())  # another seed, no --force: kept
    assert not kept.written and kept.path.stat().st_ino == inode and "seed 1" in kept.note

    # A crash while writing (here: after the tensors, before the rename) leaves the old file and no temp file.
    def boom(path):
        raise OSError("disk full")

    monkeypatch.setattr(single_file, "canonicalise_header", boom)
    with pytest.raises(OSError, match="disk full"):
        write_random_sd15(tmp_path, seed=2, configs=tiny_configs(), force=True)
    assert first.path.stat().st_ino == inode and _leftovers(tmp_path) == []
    monkeypatch.undo()

    forced = write_random_sd15(tmp_path, seed=2, configs=tiny_configs(), force=True)
    assert forced.written and forced.path.stat().st_ino != inode
    # A truncated copy (say, from an interrupted rsync) or a foreign file is not a complete output: rebuilt.
    for broken in (forced.path.read_bytes()[:-1000], b"not a checkpoint"):
        first.path.write_bytes(broken)
        assert write_random_sd15(tmp_path, seed=2, configs=tiny_configs()).written


# ------------------------------------------------------------------------------------------------ tagger

def test_tagger_folder_loads_like_a_downloaded_one_and_runs_on_both_backends(written, tmp_path):
    from tasks.tag.backends import OnnxBackend, TorchBackend
    from tasks.tag.model import resolve_model

    out, _, tagger = written
    assert tagger.path == out / "wd-swinv2-tagger-v3-random-tiny" and tagger.written
    assert sorted(p.name for p, _ in tagger.files) == ["config.json", "model.onnx", "model.safetensors",
                                                      "selected_tags.csv"]
    config = json.loads((tagger.path / "config.json").read_text())
    assert config["architecture"] == "swinv2_base_window8_256" and config["num_classes"] == 10861
    assert config["model_args"] == TINY_MODEL_ARGS and config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert (tagger.path / "selected_tags.csv").read_bytes() == LABELS_FILE.read_bytes()

    folder = resolve_model(str(tagger.path), tmp_path)  # a path spec: the code a real folder goes through
    assert folder.onnx_path and folder.weights_path and len(folder.labels) == 10861
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    torch_probs = TorchBackend(folder, "cpu").predict(image)
    onnx = OnnxBackend(folder, "cpu")  # onnxruntime runs the exported model.onnx
    assert onnx.session.get_inputs()[0].name == "input" and onnx.input_size == 64
    onnx_probs = onnx.predict(image)
    assert torch_probs.shape == onnx_probs.shape == (1, 10861)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)

    again = write_random_tagger(tmp_path / "again", seed=3, model_args=TINY_MODEL_ARGS)
    assert _sha(again.path / "model.safetensors") == _sha(tagger.path / "model.safetensors")  # same seed
    assert not (again.path / "model.onnx").exists()  # ONNX only when asked
    other = write_random_tagger(tmp_path / "other", seed=4, model_args=TINY_MODEL_ARGS)
    key = "patch_embed.proj.weight"
    assert not torch.equal(_tensors(other.path / "model.safetensors")[key],
                           _tensors(again.path / "model.safetensors")[key])


def test_tagger_kept_unless_forced_or_incomplete_and_swapped_atomically(tmp_path, monkeypatch):
    import tasks.models.random_models as rm

    first = write_random_tagger(tmp_path, seed=1, model_args=TINY_MODEL_ARGS)
    assert first.written and first.path.name == "wd-swinv2-tagger-v3-random"
    stamp = (first.path / "model.safetensors").stat().st_ino
    kept = write_random_tagger(tmp_path, seed=1, model_args=TINY_MODEL_ARGS)
    assert not kept.written and (first.path / "model.safetensors").stat().st_ino == stamp

    real_write = rm.write_tagger_folder

    def crash_after_writing(folder, *args, **kwargs):
        real_write(folder, *args, **kwargs)
        raise KeyboardInterrupt  # killed between writing the temp folder and the swap

    monkeypatch.setattr(rm, "write_tagger_folder", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        write_random_tagger(tmp_path, seed=2, model_args=TINY_MODEL_ARGS, force=True)
    assert (first.path / "model.safetensors").stat().st_ino == stamp and _leftovers(tmp_path) == []
    monkeypatch.undo()

    with_onnx = write_random_tagger(tmp_path, seed=1, model_args=TINY_MODEL_ARGS, onnx=True)  # lacks model.onnx
    assert with_onnx.written and (with_onnx.path / "model.onnx").is_file()
    assert _leftovers(tmp_path) == []
    forced = write_random_tagger(tmp_path, seed=1, model_args=TINY_MODEL_ARGS, force=True)
    assert forced.written and not (forced.path / "model.onnx").exists()


# --------------------------------------------------------------------------------------------------- CLI

def test_cli_writes_keeps_and_prints_the_overrides(tmp_path, capsys):
    from flows.cli import main
    from pipeline_config.load import load_config

    out = tmp_path / "models"
    assert main(["models", "random", "--out", str(out), "--scale", "tiny", "--only", "sd15", "--seed", "5"]) == 0
    text = capsys.readouterr().out
    sd15 = out / output_name("sd15", "tiny")
    assert f"wrote {sd15}" in text and not (out / output_name("tagger", "tiny")).exists()

    assert main(["models", "random", "--out", str(out), "--scale", "tiny", "--seed", "5"]) == 0
    text = capsys.readouterr().out
    tagger = out / output_name("tagger", "tiny")
    assert f"kept  {sd15}" in text and f"wrote {tagger}" in text and "model.safetensors" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("-o "))
    args = shlex.split(line)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "-o"]
    assert overrides == [f"train.model={sd15}", f"cache.model={sd15}", f"tag.model={tagger}"]
    cfg = load_config("demo", overrides)  # what the user pastes is a valid config
    assert cfg.train.model == cfg.cache.model == str(sd15) and cfg.tag.model == str(tagger)

    assert main(["models", "random", "--out", str(out), "--only", "tagger", "--scale", "tiny", "--force"]) == 0
    assert f"wrote {tagger}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["models", "random", "--out", str(out), "--dtype", "fp8"])


# ------------------------------------------------------------------------------------------- real sizes

def test_default_shapes_are_the_real_sd15_and_wd_swinv2_v3():
    from tasks.models.single_file import (
        clip_to_ldm,
        unet_diffusers_to_ldm,
        vae_diffusers_to_ldm,
    )
    from tasks.tag.labels import load_labels
    from tasks.tag.timm_model import create_timm_model
    from tasks.tag.tiny import tiny_config

    shipped = {c: json.loads((SD15_CONFIG_DIR / c / "config.json").read_text())
               for c in ("unet", "vae", "text_encoder")}
    assert sd15_configs() == shipped
    with torch.device("meta"):  # the real sizes, without allocating 4 GB
        unet, vae, text_encoder = build_tiny_models(0, sd15_configs())
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # SD1.5's UNet, VAE, CLIP ViT-L/14 text
    keys = {**unet_diffusers_to_ldm(unet.state_dict(), unet.config),
            **vae_diffusers_to_ldm(vae.state_dict(), vae.config), **clip_to_ldm(text_encoder.state_dict())}
    assert len(keys) == 1131  # the key count of the original v1-5-pruned-emaonly checkpoint
    assert keys[UNET_PREFIX + "out.2.weight"].shape == (4, 320, 3, 3)
    assert keys[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert keys[CLIP_PREFIX + "embeddings.token_embedding.weight"].shape == (49408, 768)

    labels = load_labels(LABELS_FILE)
    assert len(labels) == 10861
    assert tagger_model_args() == TAGGER_MODEL_ARGS == {"act_layer": "gelu_tanh", "img_size": 448, "window_size": 14}
    with torch.device("meta"):
        swin = create_timm_model(tiny_config(len(labels), tagger_model_args()))
    # swinv2_base_window8_256: 87.9M at 1000 classes; with the 10,861-tag head (1024 x 10,861 + bias): 98.0M.
    assert sum(p.numel() for p in swin.parameters()) == 98_026_341
    assert swin.num_features == 1024 and swin.patch_embed.img_size == (448, 448)
