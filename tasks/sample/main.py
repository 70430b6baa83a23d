"""`fm sample` logic: load a checkpoint the pipeline made, write PNGs (with A1111 parameters) and a grid.

Checkpoints accepted (``checkpoint`` argument):
  * a single-file ``.safetensors`` (the train stage's export; its metadata says objective and shift),
  * a diffusers folder (the train stage's ``diffusers/``),
  * ``builtin:tiny-sd15[?seed=N]``,
  * a training-step folder ``…/checkpoints/step-XXXXXXXX`` (``unet.safetensors`` [+ ``text_encoder`` /
    ``ema.safetensors``]) on top of ``base_model`` (the train config's ``model``), which supplies the
    VAE, text encoder and tokenizer.
Files are numbered A1111-style after the highest index already in the folder (``00007-40.png``), so a
second run never overwrites the first; each run's grid is ``grid-<first index>.png``.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file

from data_contracts.errors import ConfigError
from tasks.diffusion.objectives import objective_named
from tasks.models.load import SD15Components, default_cache_dir, load_sd15
from tasks.models.single_file import read_metadata
from tasks.models.sources import resolve_model_source
from tasks.models.vae import decode_latents
from tasks.sample.grid import make_grid
from tasks.sample.pipeline import Prediction, SampleSettings, generate_latents, latents_to_images, sampler_label
from tasks.sample.pngmeta import GenerationInfo, save_png

log = logging.getLogger(__name__)
STEP_FILES = ("unet.safetensors", "trainer.json")
_INDEXED = re.compile(r"^(\d+)-")  # "<index>-<seed>.png", as A1111 names its outputs
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")  # a stage output folder: <data_root>/<stage>/<fingerprint>/
GENERIC_STEMS = frozenset({"model", "diffusers", "unet", "diffusion_pytorch_model", "checkpoint", "last", "final"})
TINY_UNET_PARAMS = 50_000_000  # SD1.5's UNet has 860M; anything this small is a demo/test stand-in
TINY_NOTE = ("note: {name} is a tiny randomly initialised demo model: it draws coloured noise, and that is "
             "expected (the demo checks the pipeline, not the pictures); sample a real SD1.5 fine-tune for pictures")


@dataclass
class LoadedModel:
    components: SD15Components
    name: str                       # shown as "Model" in the PNG parameters
    hash: str                       # A1111 "Model hash": first 10 hex of the file's sha256 ("" for folders)
    prediction: Prediction          # what the checkpoint's metadata says (flow unless told otherwise)
    recommended_shift: float | None
    tiny: bool = False              # a tiny random demo model (builtin:tiny-* or trained from one)


def model_display_name(path: Path) -> str:
    """The checkpoint's file stem (or folder name); a generic one ("model", "diffusers") gets the folder
    that tells it apart: ``<data_root>/train/7d7cb8abbf906fd3/model.safetensors`` -> "train-7d7cb8ab-model"."""
    path = path.resolve() if path.is_symlink() else path  # latest.safetensors -> the file it names
    stem = path.stem if path.is_file() else path.name
    if stem.lower() not in GENERIC_STEMS:
        return stem
    parent = path.parent
    prefix = f"{parent.parent.name}-{parent.name[:8]}" if _FINGERPRINT.match(parent.name) else parent.name
    return f"{prefix}-{stem}" if prefix else stem


def is_tiny(components: SD15Components, builtin: str | None = None) -> bool:
    """True for the builtin tiny models and anything built on their scale (e.g. the demo's train output)."""
    if builtin and builtin.startswith("tiny"):
        return True
    return sum(p.numel() for p in components.unet.parameters()) < TINY_UNET_PARAMS


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _prediction_from_meta(meta: dict[str, str]) -> tuple[Prediction | None, float | None]:
    obj = meta.get("booruflow.objective")
    pred: Prediction | None = objective_named(obj).prediction if obj else None  # type: ignore[assignment]
    shift = meta.get("booruflow.recommended_shift")
    return pred, float(shift) if shift else None


def _is_step_folder(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in STEP_FILES)


def load_for_sampling(checkpoint: str, *, cache_dir: Path | None = None, device: str | torch.device = "auto",
                      dtype: torch.dtype | None = None, base_model: str | None = None,
                      use_ema: bool = True) -> LoadedModel:
    """Load unet, vae, text encoder and tokenizer of ``checkpoint`` for sampling (eval mode)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dev = pick_device(device) if isinstance(device, str) else device
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    path = Path(str(checkpoint)).expanduser()
    if _is_step_folder(path):
        if not base_model:
            raise ConfigError(f"{path} is a training-step checkpoint (UNet only): also give base_model "
                              "(the train config's `model`), which supplies the VAE and text encoder")
        loaded = load_for_sampling(base_model, cache_dir=cache, device="cpu", dtype=torch.float32)
        comp = loaded.components
        weights = path / ("ema.safetensors" if use_ema and (path / "ema.safetensors").is_file() else "unet.safetensors")
        _load_state(comp.unet, weights)
        if (path / "text_encoder.safetensors").is_file():
            _load_state(comp.text_encoder, path / "text_encoder.safetensors")
        trainer = json.loads((path / "trainer.json").read_text())
        obj = (trainer.get("extra") or {}).get("objective") or "flow"
        pred: Prediction = objective_named(obj).prediction  # type: ignore[assignment]
        _to(comp, dev, dt)
        # no hash: the base model's file hash would name weights this folder replaces
        return LoadedModel(comp, f"{path.parent.parent.name}-{path.name}", "", pred, None, loaded.tiny)
    source = resolve_model_source(str(checkpoint), cache)
    comp = load_sd15(source, dtype=torch.float32, device="cpu", cache_dir=cache)
    meta = read_metadata(source.path) if source.kind == "single_file" else {}
    pred_meta, shift = _prediction_from_meta(meta)
    if source.kind == "diffusers":
        sched = source.path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            cfg = json.loads(sched.read_text())
            if cfg.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
                pred_meta, shift = "flow", float(cfg.get("shift", 3.0))
            else:
                pred_meta = pred_meta or "epsilon"
    _to(comp, dev, dt)
    name = source.builtin or model_display_name(source.path)
    # A1111's hash is of one file; the identity of a single file is its sha256, computed once (and cached)
    # when the source was resolved. A folder has no such hash.
    model_hash = source.identity[:10] if source.kind == "single_file" else ""
    return LoadedModel(comp, name, model_hash, pred_meta or "flow", shift, is_tiny(comp, source.builtin))


def _load_state(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit the base model: missing {missing[:3]}, unexpected {unexpected[:3]} "
                          "— is base_model the model this run was trained from?")


def _to(comp: SD15Components, device: torch.device, dtype: torch.dtype) -> None:
    comp.unet.to(device=device, dtype=dtype)
    comp.text_encoder.to(device=device, dtype=dtype)
    comp.vae.to(device=device, dtype=torch.float32)  # SD1.5 VAEs overflow in fp16; decoding is cheap


def booruflow_version() -> str:
    try:
        return importlib_metadata.version("booruflow")
    except importlib_metadata.PackageNotFoundError:
        return "dev"


def generation_info(prompt: str, negative: str, seed: int, settings: SampleSettings, model: LoadedModel
                    ) -> GenerationInfo:
    params: dict[str, object] = {
        "Steps": settings.steps,
        "Sampler": sampler_label(settings.sampler),
        "Schedule type": "Simple" if settings.schedule == "simple" else "FlowMatchEuler",
        "CFG scale": settings.cfg,
        "Seed": seed,
        "Size": f"{settings.width}x{settings.height}",
        **({"Model hash": model.hash} if model.hash else {}),
        "Model": model.name,
        "Clip skip": settings.clip_skip,
        "Prediction": settings.prediction,
    }
    if settings.prediction == "flow":
        params["Shift"] = settings.shift
    if settings.sampler in ("euler_ancestral", "dpmpp_sde") and settings.eta != 1.0:
        params["Eta"] = settings.eta
    params["Version"] = f"booruflow {booruflow_version()}"
    return GenerationInfo(prompt, negative, {k: str(v) if not isinstance(v, float) else v for k, v in params.items()})


def image_name(index: int, seed: int) -> str:
    return f"{index:05d}-{seed}.png"


def grid_name(first_index: int) -> str:
    return f"grid-{first_index:05d}.png"


def next_index(out_dir: Path) -> int:
    """One past the highest ``<index>-…`` file in ``out_dir`` (0 for an empty or new folder)."""
    found = [int(m.group(1)) for p in out_dir.iterdir() if (m := _INDEXED.match(p.name))] if out_dir.is_dir() else []
    return max(found, default=-1) + 1


def _step_counter(progress: Callable[[int, int], None], base: int, batch: int, total: int):
    """A sampler step callback reporting steps x images done: ``base`` before this batch, ``batch`` per step."""
    def callback(i: int, sigma: float, denoised: torch.Tensor) -> None:
        progress(base + (i + 1) * batch, total)
    return callback


def write_samples(model: LoadedModel, prompts: Sequence[str], negatives: Sequence[str], out_dir: Path, *,
                  settings: SampleSettings, seed: int = 0, batch_size: int = 1, images_per_prompt: int = 1,
                  grid: bool = True, grid_cols: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Generate and write ``<out_dir>/<index>-<seed>.png``, numbered after the files already there, and
    ``grid-<first index>.png``; returns every path written, the grid last.

    ``progress(done, total)`` is called after every denoising step, counting steps x images."""
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, n) for p, n in zip(prompts, negatives) for _ in range(max(1, images_per_prompt))]
    first = next_index(out_dir)
    paths = [out_dir / image_name(first + j, seed + j) for j in range(len(jobs))]
    total = settings.steps * len(jobs)
    if progress is not None:
        progress(0, total)  # the bar knows its length before the first (slow) step
    bs = max(1, batch_size)
    for start in range(0, len(jobs), bs):
        idx = list(range(start, min(start + bs, len(jobs))))
        callback = _step_counter(progress, start * settings.steps, len(idx), total) if progress else None
        lat = generate_latents(model.components, [jobs[j][0] for j in idx], [jobs[j][1] for j in idx],
                               [seed + j for j in idx], settings, callback=callback)
        with torch.no_grad():
            images = latents_to_images(decode_latents(model.components.vae, lat))
        for j, im in zip(idx, images):
            save_png(paths[j], im, generation_info(jobs[j][0], jobs[j][1], seed + j, settings, model))
    written = list(paths)
    if grid and paths:
        from PIL import Image

        ims = []
        for p in paths:
            with Image.open(p) as im:
                ims.append(im.convert("RGB"))
        labels = [f"#{first + j:05d} · seed {seed + j}\n{jobs[j][0]}" for j in range(len(jobs))]
        written.append(save_png(out_dir / grid_name(first), make_grid(ims, cols=grid_cols, labels=labels,
                                                                       label_lines=3), None))
    return written


def _print_note(text: str) -> None:
    print(text, file=sys.stderr)


def sample_main(checkpoint: str, prompts: str | Sequence[str], negative: str | Sequence[str] = "", *,
                out_dir: str | Path, steps: int = 48, cfg: float = 6.0, shift: float | None = None,
                sampler: str = "euler", schedule: str = "diffusers", seed: int = 0, width: int = 768,
                height: int = 1024, batch_size: int = 1, images_per_prompt: int = 1, clip_skip: int = 2,
                eta: float = 1.0, prediction: Prediction | None = None, max_chunks: int | None = None,
                cache_dir: str | Path | None = None, device: str = "auto", base_model: str | None = None,
                grid: bool = True, progress: Callable[[int, int], None] | None = None,
                notify: Callable[[str], None] | None = None) -> list[Path]:
    """Load ``checkpoint``, generate, write PNGs with A1111 ``parameters`` and a grid; return every path
    written (images in order, the grid last). Nothing in ``out_dir`` is overwritten: new files are numbered
    after the highest index there.

    ``shift`` None -> the checkpoint's recommended shift (train export metadata / diffusers scheduler
    config), else 3. ``prediction`` None -> what the checkpoint says (flow unless marked ddpm/epsilon).
    ``progress(done, total)``: after every denoising step, in steps x images. ``notify``: one-line notes
    for the user (default: printed to stderr), e.g. that a tiny demo model draws noise.
    """
    plist = [prompts] if isinstance(prompts, str) else list(prompts)
    if not plist:
        raise ConfigError("fm sample: give at least one prompt")
    nlist = [negative] * len(plist) if isinstance(negative, str) else list(negative)
    if len(nlist) == 1:
        nlist = nlist * len(plist)
    if len(nlist) != len(plist):
        raise ConfigError(f"{len(nlist)} negative prompts for {len(plist)} prompts; give one, or one per prompt")
    model = load_for_sampling(checkpoint, cache_dir=Path(cache_dir) if cache_dir else None, device=device,
                              base_model=base_model)
    if model.tiny:
        (notify or _print_note)(TINY_NOTE.format(name=model.name))
    shift = shift if shift is not None else (model.recommended_shift or 3.0)
    settings = SampleSettings(steps=steps, cfg=cfg, shift=shift,
                              sampler=sampler, schedule=schedule, width=width, height=height, clip_skip=clip_skip,
                              eta=eta, prediction=prediction or model.prediction, max_chunks=max_chunks).check()
    log.info("sampling %s (%s, shift %s, %s) -> %s", checkpoint, settings.prediction, settings.shift,
             settings.sampler, out_dir)
    return write_samples(model, plist, nlist, Path(out_dir), settings=settings, seed=seed, batch_size=batch_size,
                         images_per_prompt=images_per_prompt, grid=grid, progress=progress)
