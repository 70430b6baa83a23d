"""Model folders, the tiny SwinV2, and the two backends (real ONNX Runtime, real timm)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from data_contracts.errors import ConfigError
from tasks.tag.backends import OnnxBackend, TorchBackend, choose_backend, load_backend
from tasks.tag.labels import load_labels
from tasks.tag.model import open_folder, resolve_model
from tasks.tag.tiny import TINY_MODEL_ARGS, ensure_tiny_tagger, parse_builtin

# Same weights, same pixels: ONNX Runtime (fp32) vs eager timm (fp32, fused attention) probabilities.
AGREE_ATOL = 1e-5


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_tiny_folder_layout_and_sizes_come_from_the_model(tagger, real_csv):
    assert sorted(p.name for p in tagger.path.iterdir()) == ["config.json", "model.onnx", "model.safetensors",
                                                            "selected_tags.csv"]
    assert len(tagger.labels) == len(load_labels(real_csv)) == 10861
    assert tagger.config["model_args"]["img_size"] == 64 and tagger.config_input_size == 64
    onnx = OnnxBackend(tagger, "cpu")
    assert (onnx.input_name, onnx.input_size, onnx.n_outputs, onnx.fixed_batch) == ("input", 64, 10861, None)


def test_onnx_and_torch_backends_agree(tagger):
    x = _images(5, 64)
    p_onnx = OnnxBackend(tagger, "cpu").predict(x)
    torch_backend = TorchBackend(tagger, "cpu")
    p_torch = torch_backend.predict(x)
    assert p_onnx.shape == p_torch.shape == (5, 10861)
    np.testing.assert_allclose(p_onnx, p_torch, atol=AGREE_ATOL)
    # Dynamic batch: one image alone gives the same answer as inside a batch.
    np.testing.assert_allclose(OnnxBackend(tagger, "cpu").predict(x[2:3])[0], p_onnx[2], atol=1e-6)
    # Fused window attention is the same math as timm's eager attention.
    p_eager = TorchBackend(tagger, "cpu", fused_attention=False).predict(x)
    np.testing.assert_allclose(p_eager, p_torch, atol=AGREE_ATOL)


def test_prior_bias_keeps_a_random_tiny_tagger_realistic(tagger):
    probs = OnnxBackend(tagger, "cpu").predict(_images(4, 64, seed=3))
    labels = tagger.labels
    general_added = (probs[:, labels.general_idx] > 0.35).sum(1)
    assert (general_added >= 1).all() and (general_added <= 30).all()  # a few common tags, not thousands
    assert (probs[:, labels.character_idx] > 0.85).sum() == 0
    assert labels.names[labels.general_idx[np.argmax(probs[0, labels.general_idx])]] == "1girl"


def test_fused_attention_matches_timm_with_shifted_windows(tmp_path, real_csv):
    # depths (2, 2) exercises the shifted-window mask path the (1, 1) tiny model does not have.
    from tasks.tag.tiny import write_tagger_folder

    args = dict(TINY_MODEL_ARGS, depths=[2, 2], num_heads=[2, 4])
    folder = open_folder(write_tagger_folder(tmp_path / "t", real_csv, seed=1, model_args=args, with_onnx=False))
    x = _images(3, 64, seed=2)
    np.testing.assert_allclose(TorchBackend(folder, "cpu").predict(x),
                               TorchBackend(folder, "cpu", fused_attention=False).predict(x), atol=AGREE_ATOL)


def test_mismatched_csv_fails_with_both_numbers(tagger, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tagger.path, bad)
    lines = (bad / "selected_tags.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (bad / "selected_tags.csv").write_text("".join(lines[:-61]), encoding="utf-8")  # 10,800 rows
    folder = open_folder(bad)
    with pytest.raises(ConfigError, match=r"10800 tag rows.*10861"):
        OnnxBackend(folder, "cpu")
    with pytest.raises(ConfigError, match=r"10800 tag rows.*10861"):
        TorchBackend(folder, "cpu")


def test_folder_errors_name_the_layout(tmp_path, tagger):
    with pytest.raises(ConfigError, match="selected_tags.csv and model.onnx"):
        open_folder(tmp_path)  # empty folder
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"), tmp_path)
    only_torch = tmp_path / "torch_only"
    only_torch.mkdir()
    for name in ("selected_tags.csv", "config.json", "model.safetensors"):
        shutil.copy(tagger.path / name, only_torch / name)
    folder = open_folder(only_torch)
    assert choose_backend(folder, "auto", "cpu") == "torch"
    with pytest.raises(ConfigError, match="no model.onnx"):
        load_backend(folder, "onnx", "cpu")
    assert choose_backend(tagger, "auto", "cpu") == "onnx"


def test_weights_that_do_not_fit_the_config_fail_clearly(tagger, tmp_path):
    bad = tmp_path / "wrong_arch"
    shutil.copytree(tagger.path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_args"]["embed_dim"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="do not fit the architecture"):
        TorchBackend(open_folder(bad), "cpu")


def test_hub_id_offline_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="offline.*selected_tags.csv and model.onnx"):
        resolve_model("SmilingWolf/wd-swinv2-tagger-v3", tmp_path, offline=True)


def test_builtin_spec_builds_once_into_cache(tmp_path):
    assert parse_builtin("builtin:tiny-wd-swinv2") == 0 and parse_builtin("builtin:tiny-wd-swinv2?seed=7") == 7
    with pytest.raises(ConfigError, match="seed=N"):
        parse_builtin("builtin:tiny-wd-swinv2?sed=1")
    folder = resolve_model("builtin:tiny-wd-swinv2?seed=3", tmp_path)
    assert folder.path == tmp_path / "models" / "tiny-wd-swinv2-3"
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp leftovers
    mtime = (folder.path / "model.onnx").stat().st_mtime_ns
    assert ensure_tiny_tagger(tmp_path, 3) == folder.path
    assert (folder.path / "model.onnx").stat().st_mtime_ns == mtime  # reused, not rebuilt
    # Deterministic per seed: a second cache builds identical weights.
    from safetensors.torch import load_file

    a = load_file(str(ensure_tiny_tagger(tmp_path / "other", 3) / "model.safetensors"))
    b = load_file(str(folder.path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_real_wd_config_builds_the_real_architecture_shape():
    """The real wd-swinv2-tagger-v3 config.json goes through the same builder (meta device: no memory)."""
    from tests.tag.conftest import REAL_CONFIG
    import timm

    cfg = json.loads(REAL_CONFIG.read_text())
    with torch.device("meta"):
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"],
                                  **cfg["model_args"])
    assert model.num_classes == 10861 and model.patch_embed.img_size == (448, 448)
    assert model.layers[0].blocks[0].attn.window_size == (14, 14)
