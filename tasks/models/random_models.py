"""`fm models random`: real-sized models with random weights, in the layouts a user would give.

So the real loading and GPU code paths (tag, cache, train at full size) can be exercised on a machine with no
download. Nothing here is a new model builder: the SD1.5 part builds the shipped SD1.5 configs with the builtin
tiny model's builder (tasks/models/tiny.py) and writes them with the project's single-file exporter; the tagger
part is the builtin tiny tagger's writer (tasks/tag/tiny.py) at the published SwinV2 sizes. The outputs load
through exactly the code a user's files go through:

  <out>/sd15-random.safetensors          single-file SD1.5, original LDM key layout, no embedded configs (like a
                                         real checkpoint, it loads with the shipped SD1.5 configs); fp16 default
  <out>/wd-swinv2-tagger-v3-random/      model.safetensors (fp32, as published) + config.json + selected_tags.csv
                                         [+ model.onnx]: the SmilingWolf/wd-swinv2-tagger-v3 file layout

``scale="tiny"`` writes the demo's tiny shapes instead (a CPU smoke test of the command, seconds); ``scale="small"``
a reduced-width SD1.5 (the shipped UNet and CLIP-text layouts at 2/5 of the UNet width, a 6-layer 512-wide text
encoder, the tiny codec VAE: tasks/models/tiny.py small_configs), sized for the flow-vs-ε study on one GPU
(pipeline_config/presets/ab-study.yaml). They go to other names (``*-tiny``, ``*-small``) so a reduced output is
never mistaken for a real-size one.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from data_contracts.errors import ConfigError
from tasks.common.sizes import human_size
from tasks.models.configs import SD15_CONFIG_DIR
from tasks.models.single_file import (
    export_single_file,
    make_tree_readable,
    read_metadata,
)
from tasks.models.tiny import build_tiny_models, small_configs, tiny_configs
from tasks.tag.model import (
    CONFIG_NAME,
    LABELS_NAME,
    ONNX_NAME,
    WEIGHTS_NAME,
    open_folder,
)
from tasks.tag.tiny import LABELS_FILE, TINY_MODEL_ARGS, write_tagger_folder

Scale = Literal["full", "small", "tiny"]
KINDS = ("sd15", "tagger")
SCALES: tuple[Scale, ...] = ("full", "small", "tiny")
DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

SD15_NAME = "sd15-random"
TAGGER_NAME = "wd-swinv2-tagger-v3-random"
# wd-swinv2-tagger-v3's config.json model_args (REFERENCE.md): swinv2_base_window8_256's own dims at 448 px.
TAGGER_MODEL_ARGS: dict[str, Any] = {"act_layer": "gelu_tanh", "img_size": 448, "window_size": 14}
SD15_COMPONENTS = ("unet", "vae", "text_encoder")
# Safetensors metadata of the SD1.5 file: what built it, so a kept file can say when it differs from the ask.
META_KIND, META_SEED, META_DTYPE = "booruflow.random", "booruflow.random_seed", "booruflow.random_dtype"
META_CODEC = "booruflow.codec_vae"  # "true": the VAE is the hand-set codec (exact in fp32 only)

Log = Callable[[str], None]


@dataclass(frozen=True)
class RandomModel:
    kind: str                              # "sd15" or "tagger"
    path: Path                             # the checkpoint file or the tagger folder
    written: bool                          # False: an existing complete output was kept
    files: tuple[tuple[Path, int], ...]    # every file with its size in bytes
    note: str = ""                         # e.g. why a kept output may differ from what was asked

    @property
    def size(self) -> int:
        return sum(n for _, n in self.files)


def _quiet(_: str) -> None:
    pass


def output_name(kind: str, scale: Scale = "full") -> str:
    base = {"sd15": SD15_NAME + ".safetensors", "tagger": TAGGER_NAME}[kind]
    if scale == "full":
        return base
    stem, dot, ext = base.partition(".")
    return f"{stem}-{scale}{dot}{ext}"


def sd15_configs(scale: Scale = "full") -> dict[str, dict[str, Any]]:
    """The diffusers configs to build: the shipped SD1.5 ones (the shape every real checkpoint has), small or tiny."""
    if scale == "tiny":
        return tiny_configs()
    if scale == "small":
        return small_configs()
    return {c: json.loads((SD15_CONFIG_DIR / c / "config.json").read_text()) for c in SD15_COMPONENTS}


def tagger_model_args(scale: Scale = "full") -> dict[str, Any]:
    return dict(TAGGER_MODEL_ARGS if scale == "full" else TINY_MODEL_ARGS)  # small: the tiny tagger's shape


def codec_vae(scale: Scale) -> bool:
    """Whether the scale's VAE is the hand-set codec (tiny_vae.py) rather than random weights: the small scale's,
    so its latents and samples mean something (a random VAE's decode is the same grey for every input). The codec
    is exact in fp32 only: in bf16 its latents are off by up to ~0.3 (its GroupNorm carries the colours next to a
    constant of 1000), so encode with it in fp32 (tasks/study runs such a model's cache stage on the CPU)."""
    return scale == "small"


def _sizes(paths: Iterable[Path]) -> tuple[tuple[Path, int], ...]:
    return tuple((p, p.stat().st_size) for p in sorted(paths))


# ------------------------------------------------------------------------------------------------- SD1.5

def _sd15_complete(path: Path) -> bool:
    # Written by rename only, so a file at the final name is whole; the header read catches a foreign file.
    if not path.is_file():
        return False
    try:
        read_metadata(path)
    except Exception:  # noqa: BLE001 - safetensors raises its own types for a bad header
        return False
    return True


def write_random_sd15(out_dir: Path, *, seed: int = 0, dtype: str = "fp16",
                      configs: dict[str, dict[str, Any]] | None = None, name: str | None = None,
                      force: bool = False, codec: bool = False, log: Log = _quiet) -> RandomModel:
    """A single-file SD1.5 checkpoint (LDM keys) with random weights, deterministic for ``seed``.

    ``configs`` (unet / vae / text_encoder diffusers configs) default to the shipped SD1.5 ones; then no
    configs are embedded, so the loader pairs the file with the shipped configs exactly as it does a real
    checkpoint. Other shapes (tests, ``scale="tiny"``) embed theirs so they load too. ``codec``: the VAE is the
    hand-set codec of tasks/models/tiny_vae.py (needs the tiny VAE config).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    shipped = sd15_configs("full")
    configs = configs or shipped
    path = Path(out_dir) / (name or output_name("sd15"))
    if not force and _sd15_complete(path):
        meta = read_metadata(path)
        asked = {META_SEED: str(seed), META_DTYPE: dtype}
        differs = [f"{k.rsplit('_', 1)[-1]} {meta.get(k, '?')}" for k, v in asked.items() if meta.get(k) != v]
        note = f"kept; it was built with {', '.join(differs)} (--force rebuilds)" if differs else ""
        return RandomModel("sd15", path, False, _sizes([path]), note)
    log(f"building SD1.5 UNet, VAE and CLIP text encoder with random weights (seed {seed}) ...")
    unet, vae, text_encoder = build_tiny_models(seed, configs, codec_vae=codec)
    log(f"writing {path} ({dtype}) ...")
    # export_single_file writes a temp file and renames it: a kill never leaves a partial checkpoint.
    export_single_file(unet, vae, text_encoder, path, dtype=DTYPES[dtype], embed_configs=configs != shipped,
                       metadata={META_KIND: "sd15", META_SEED: str(seed), META_DTYPE: dtype,
                                 **({META_CODEC: "true"} if codec else {})})
    return RandomModel("sd15", path, True, _sizes([path]))


# ------------------------------------------------------------------------------------------------ tagger

def _tagger_files(onnx: bool) -> tuple[str, ...]:
    return (LABELS_NAME, CONFIG_NAME, WEIGHTS_NAME) + ((ONNX_NAME,) if onnx else ())


def _tagger_complete(folder: Path, onnx: bool) -> bool:
    if not all((folder / n).is_file() for n in _tagger_files(onnx)):
        return False
    try:
        open_folder(folder)
    except ConfigError:
        return False
    return True


def write_random_tagger(out_dir: Path, *, seed: int = 0, model_args: dict[str, Any] | None = None,
                        onnx: bool = False, name: str | None = None, labels_csv: Path = LABELS_FILE,
                        force: bool = False, log: Log = _quiet) -> RandomModel:
    """A WD SwinV2 v3 tagger folder with random weights, deterministic for ``seed``.

    ``model_args`` default to wd-swinv2-tagger-v3's (448 px, window 14); the labels are the real v3 CSV
    (10,861 rows). An existing folder lacking a file asked for (model.onnx with ``onnx``) is rebuilt whole.
    """
    folder = Path(out_dir) / (name or output_name("tagger"))
    args = dict(model_args or TAGGER_MODEL_ARGS)
    if not force and _tagger_complete(folder, onnx):
        return RandomModel("tagger", folder, False, _sizes(p for p in folder.iterdir() if p.is_file()))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.old")
    try:
        log(f"building the SwinV2 tagger ({args['img_size']} px) with random weights (seed {seed})"
            + (" and exporting ONNX" if onnx else "") + " ...")
        write_tagger_folder(tmp, labels_csv, seed, args, with_onnx=onnx, name="random-wd-swinv2")
        make_tree_readable(tmp)
        if folder.exists():  # --force, or an incomplete folder: swap, so the final name never holds a mix
            os.rename(folder, old)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return RandomModel("tagger", folder, True, _sizes(folder.iterdir()))


# ---------------------------------------------------------------------------------------------- together

def write_random_models(out_dir: Path, *, only: str | None = None, seed: int = 0, dtype: str = "fp16",
                        onnx: bool = False, force: bool = False, scale: Scale = "full",
                        log: Log = _quiet) -> list[RandomModel]:
    """Both models (or ``only`` one) into ``out_dir``; existing complete outputs are kept unless ``force``."""
    if only is not None and only not in KINDS:
        raise ConfigError(f"only {only!r}: expected one of {', '.join(KINDS)}")
    if scale not in SCALES:
        raise ConfigError(f"scale {scale!r}: expected one of {', '.join(SCALES)}")
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    if only in (None, "sd15"):
        results.append(write_random_sd15(out_dir, seed=seed, dtype=dtype, configs=sd15_configs(scale),
                                         name=output_name("sd15", scale), force=force, codec=codec_vae(scale),
                                         log=log))
    if only in (None, "tagger"):
        results.append(write_random_tagger(out_dir, seed=seed, model_args=tagger_model_args(scale), onnx=onnx,
                                           name=output_name("tagger", scale), force=force, log=log))
    return results


def config_overrides(results: Iterable[RandomModel]) -> list[str]:
    """The ``-o key=value`` overrides that point a config at these models."""
    keys = {"sd15": ("train.model", "cache.model"), "tagger": ("tag.model",)}
    return [f"-o {shlex.quote(f'{key}={r.path}')}" for r in results for key in keys[r.kind]]


def summary_lines(results: Iterable[RandomModel]) -> list[str]:
    """What was written (or kept), file by file with sizes, then the overrides to paste."""
    results = list(results)
    lines = []
    for r in results:
        state = "wrote" if r.written else "kept "
        lines.append(f"{state} {r.path}  ({human_size(r.size)}){'  ' + r.note if r.note else ''}")
        if r.path.is_dir():
            lines += [f"        {p.name:<20} {human_size(n):>10}" for p, n in r.files]
    if results:
        lines += ["", "use them with:", "  " + " ".join(config_overrides(results))]
    return lines
