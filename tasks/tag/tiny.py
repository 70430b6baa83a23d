"""`builtin:tiny-wd-swinv2[?seed=N]`: a random tiny stand-in for the WD SwinV2 tagger.

Same timm class as wd-swinv2-tagger-v3 (`swinv2_base_window8_256`, gelu_tanh) with tiny dims (embed_dim 32,
depths (1, 1), heads (1, 2), img_size 64, window 4) and the real label file (10,861 outputs). Built once
into `<cache_dir>/models/tiny-wd-swinv2-<seed>/` as model.safetensors + config.json + model.onnx +
selected_tags.csv (temp folder + rename, so a kill never leaves half a model), then opened by the same
folder-loading code as a real tagger.

Its head bias is logit(count_i / N) from the CSV counts (N = posts with a rating), so a random tiny tagger
behaves like a tagger on an average image: a few very common general tags (1girl, solo, long_hair) pass
0.35, no character passes 0.85, ratings follow Danbooru's mix — rather than thousands of tags at p≈0.5.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_contracts.errors import ConfigError
from tasks.tag.export import export_onnx
from tasks.tag.labels import load_labels, prior_logits
from tasks.tag.model import CONFIG_NAME, LABELS_NAME, ONNX_NAME, WEIGHTS_NAME
from tasks.tag.timm_model import create_timm_model

BUILTIN_PREFIX = "builtin:tiny-wd-swinv2"
LABELS_FILE = Path(__file__).parent / "data" / "selected_tags_v3.csv"
TINY_MODEL_ARGS = {
    "act_layer": "gelu_tanh",
    "img_size": 64,
    "window_size": 4,
    "embed_dim": 32,
    "depths": [1, 1],
    "num_heads": [1, 2],
}
_SPEC = re.compile(r"^builtin:tiny-wd-swinv2(?:\?seed=(\d+))?$")


def is_builtin(spec: str) -> bool:
    return spec.startswith("builtin:")


def parse_builtin(spec: str) -> int:
    match = _SPEC.match(spec.strip())
    if not match:
        raise ConfigError(f"tag.model {spec!r}: the built-in tagger is spelled {BUILTIN_PREFIX} or "
                          f"{BUILTIN_PREFIX}?seed=N")
    return int(match.group(1) or 0)


def tiny_config(num_classes: int, model_args: dict | None = None) -> dict:
    """A WD-style timm config.json; model_args default to the tiny dims (the real ones: img_size 448,
    window_size 14, act_layer gelu_tanh on swinv2_base_window8_256's own dims)."""
    args = dict(model_args or TINY_MODEL_ARGS)
    size = int(args["img_size"])
    return {
        "architecture": "swinv2_base_window8_256",
        "num_classes": num_classes,
        "global_pool": "avg",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [3, size, size], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": num_classes,
        },
    }


def write_tagger_folder(folder: Path, labels_csv: Path, seed: int, model_args: dict | None = None,
                        with_onnx: bool = True, name: str = "tiny-wd-swinv2") -> Path:
    """Build a random tagger with the prior head bias and write the four files into `folder`."""
    labels = load_labels(labels_csv)
    config = tiny_config(len(labels), model_args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_timm_model(config)
    config["num_features"] = int(model.num_features)
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.from_numpy(prior_logits(labels)))
        # timm zero-initialises SwinV2's residual post-norms, which would make every attention and MLP
        # branch a no-op in a random model; unit scale keeps the whole graph live (and tested).
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                param.fill_(1.0)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(labels_csv, folder / LABELS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "booruflow": f"{name} seed {seed}"})
    # safetensors writes the metadata in hash-map order, which changes from process to process: sorted, the
    # same seed gives the same bytes (and so the same tag fingerprint) on every machine
    from tasks.models.single_file import canonicalise_header

    canonicalise_header(folder / WEIGHTS_NAME)
    if with_onnx:
        export_onnx(model, folder / ONNX_NAME, int(config["model_args"]["img_size"]))
    return folder


def ensure_tiny_tagger(cache_dir: Path, seed: int = 0) -> Path:
    """The tiny tagger folder, built on first use; concurrent builders race safely (first rename wins)."""
    final = Path(cache_dir) / "models" / f"tiny-wd-swinv2-{seed}"
    needed = (LABELS_NAME, CONFIG_NAME, WEIGHTS_NAME, ONNX_NAME)
    if all((final / n).is_file() for n in needed):
        return final
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write_tagger_folder(tmp, LABELS_FILE, seed)
        if final.exists():  # an incomplete leftover (never produced by this code, but be safe)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not all((final / n).is_file() for n in needed):  # lost a race to a half-made folder: retry once
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
