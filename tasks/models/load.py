"""Load SD1.5 components from a :class:`ModelSource`, offline, and save them as a diffusers folder.

Single files go through diffusers' own LDM -> diffusers converters (``from_single_file`` per
component class with ``config=<local folder>``), diffusers folders through ``from_pretrained``;
``local_files_only`` everywhere, so nothing reaches for the network.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from data_contracts.errors import ConfigError
from tasks.models.configs import SD15_CONFIG_DIR
from tasks.models.single_file import COMPONENT_PREFIXES, read_checkpoint_and_keys
from tasks.models.sources import EXPECTED_LAYOUTS, ModelSource
from tasks.models.tokenizer import load_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
# Keys that mark checkpoints of other model families (loading them as SD1.5 would fail obscurely).
_FOREIGN_MARKERS = {
    "conditioner.embedders.": "an SDXL checkpoint",
    "cond_stage_model.model.": "an SD2.x (OpenCLIP) checkpoint",
}


class _DropEmptyFp32Warning(logging.Filter):
    # diffusers' ModelMixin.to(dtype) warns about its list of fp32-only modules even when that list is
    # empty (as for UNet2DConditionModel/AutoencoderKL); drop only that line, other warnings pass.
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropEmptyFp32Warning())


@dataclass
class SD15Components:
    unet: Any = None            # diffusers UNet2DConditionModel
    vae: Any = None             # diffusers AutoencoderKL
    text_encoder: Any = None    # transformers CLIPTextModel
    tokenizer: Any = None       # transformers CLIPTokenizer
    source: ModelSource | None = None


def _check_materialised(model: torch.nn.Module, what: str, source: ModelSource) -> None:
    # diffusers leaves parameters it found no weight for on the meta device instead of failing.
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConfigError(
            f"{source.path}: the {what} weights are incomplete for config {source.config_dir / what}; "
            f"missing e.g. {missing[:5]}{more}. Check that the checkpoint is SD1.5-shaped or pass the "
            "matching diffusers config folder.")


_CLIP_PARENT = "cond_stage_model.transformer."


def _normalise_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cond_stage_model.transformer.X`` -> ``cond_stage_model.transformer.text_model.X``.

    Checkpoints saved with some transformers versions lack the ``text_model.`` level (A1111 fixes
    them up the same way); diffusers only recognises the nested form.
    """
    clip_prefix = COMPONENT_PREFIXES["text_encoder"]
    out = {}
    for k, v in state.items():
        if k.startswith(_CLIP_PARENT) and not k.startswith(clip_prefix):
            k = clip_prefix + k[len(_CLIP_PARENT):]
        out[k] = v
    return out


def _precheck_coverage(comp: str, state: dict[str, torch.Tensor], source: ModelSource) -> None:
    """Fail with the missing names if the checkpoint does not cover every weight of the model.

    diffusers' from_single_file would otherwise leave such weights on the meta device and crash
    later with an unhelpful "Cannot copy out of meta tensor".
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    cls, convert = {"unet": (UNet2DConditionModel, convert_ldm_unet_checkpoint),
                    "vae": (AutoencoderKL, convert_ldm_vae_checkpoint)}[comp]
    try:
        cfg = cls.load_config(str(source.config_dir / comp))
        with init_empty_weights():
            expected = set(cls.from_config(cfg).state_dict())
        found = set(convert(checkpoint=state, config=cfg))
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"Cannot map the {comp} of {source.path} onto the config "
                          f"{source.config_dir / comp}: {e}") from e
    missing = sorted(expected - found)
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConfigError(
            f"{source.path}: the {comp} weights are incomplete for config {source.config_dir / comp}; "
            f"missing e.g. {missing[:5]}{more}. Check that the checkpoint is SD1.5-shaped or pass the "
            "matching diffusers config folder.")


def _load_single_file(source: ModelSource, wanted: set[str], dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    # Text encoder read from the parent prefix: some older merges lack the ``text_model.`` level.
    read_prefixes = {"unet": COMPONENT_PREFIXES["unet"], "vae": COMPONENT_PREFIXES["vae"],
                     "text_encoder": _CLIP_PARENT}
    prefixes = tuple(read_prefixes[c] for c in ("unet", "vae", "text_encoder") if c in wanted)
    if not prefixes:
        return {}
    state, all_keys = read_checkpoint_and_keys(source.path, prefixes)
    state = _normalise_clip_keys(state)
    for marker, family in _FOREIGN_MARKERS.items():
        if any(k.startswith(marker) for k in all_keys):
            raise ConfigError(f"{source.path} looks like {family}, not SD1.x; {EXPECTED_LAYOUTS}")
    for comp in ("unet", "vae", "text_encoder"):
        if comp in wanted and not any(k.startswith(COMPONENT_PREFIXES[comp]) for k in state):
            raise ConfigError(f"{source.path} has no {COMPONENT_PREFIXES[comp]}* tensors ({comp}); "
                              f"{EXPECTED_LAYOUTS}")
    cfg = str(source.config_dir)
    # torch_dtype=None: tensors keep the file's dtype and weights diffusers found no tensor for stay
    # on the meta device, where _check_materialised names them; load_sd15 casts afterwards (exact).
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_single_file(
            state, config=cfg, subfolder="unet", local_files_only=True, torch_dtype=None),
        "vae": lambda: AutoencoderKL.from_single_file(
            state, config=cfg, subfolder="vae", local_files_only=True, torch_dtype=None),
        "text_encoder": lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", config=cfg, torch_dtype=None,
            local_files_only=True),
    }
    out: dict[str, Any] = {}
    for comp, load in loaders.items():
        if comp not in wanted:
            continue
        if comp in ("unet", "vae"):
            _precheck_coverage(comp, state, source)
        try:
            out[comp] = load()
        except (ValueError, RuntimeError, KeyError, OSError, NotImplementedError) as e:
            # Typically a shape mismatch between the checkpoint and the config folder.
            raise ConfigError(f"Cannot load the {comp} of {source.path} with the config "
                              f"{source.config_dir / comp}: {e}") from e
    return out


def _load_diffusers(source: ModelSource, wanted: set[str], dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = str(source.path)
    out: dict[str, Any] = {}
    try:
        if "unet" in wanted:
            out["unet"] = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", torch_dtype=dtype, local_files_only=True, use_safetensors=True)
        if "vae" in wanted:
            out["vae"] = AutoencoderKL.from_pretrained(
                folder, subfolder="vae", torch_dtype=dtype, local_files_only=True, use_safetensors=True)
        if "text_encoder" in wanted:
            out["text_encoder"] = CLIPTextModel.from_pretrained(
                str(source.path / "text_encoder"), dtype=dtype, local_files_only=True, use_safetensors=True)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise ConfigError(f"Cannot load diffusers folder {source.path}: {e}; {EXPECTED_LAYOUTS}") from e
    return out


def load_sd15(source: ModelSource, components: Iterable[str] = COMPONENTS, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", *, cache_dir: Path | None = None) -> SD15Components:
    """Load the asked-for components (others stay None), in eval mode, on ``device`` in ``dtype``.

    ``cache_dir`` (default: the source's) is where the built-in tokenizer is generated when the
    source has none.
    """
    wanted = set(components)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise ConfigError(f"Unknown SD1.5 component(s) {sorted(unknown)}; choose from {COMPONENTS}")
    models = (_load_single_file if source.kind == "single_file" else _load_diffusers)(source, wanted, dtype)
    for name, model in models.items():
        _check_materialised(model, name, source)
        model.to(device=device, dtype=dtype)
        model.eval()
    tok = None
    if "tokenizer" in wanted:
        tok = load_tokenizer(source.tokenizer_dir,
                             cache_dir=Path(cache_dir or source.cache_dir or default_cache_dir()))
    return SD15Components(unet=models.get("unet"), vae=models.get("vae"),
                          text_encoder=models.get("text_encoder"), tokenizer=tok, source=source)


def default_cache_dir() -> Path:
    return Path(os.environ.get("BOORUFLOW_CACHE", Path.home() / ".cache" / "booruflow"))


def save_diffusers_folder(components: SD15Components, path: Path, scheduler_config: Any = None) -> None:
    """Write a diffusers pipeline folder (safetensors), atomically: temp folder, then rename.

    ``scheduler_config``: a scheduler instance (e.g. ``FlowMatchEulerDiscreteScheduler(shift=3)``) or
    a config dict that names its ``_class_name``; default: SD1.5's PNDM config.
    An existing folder at ``path`` is replaced.
    """
    import diffusers

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline",
                                 "_diffusers_version": diffusers.__version__,
                                 "feature_extractor": [None, None], "safety_checker": [None, None],
                                 "image_encoder": [None, None], "requires_safety_checker": False}
        if components.unet is not None:
            components.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            index["unet"] = ["diffusers", "UNet2DConditionModel"]
        if components.vae is not None:
            components.vae.save_pretrained(tmp / "vae", safe_serialization=True)
            index["vae"] = ["diffusers", "AutoencoderKL"]
        if components.text_encoder is not None:
            components.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            index["text_encoder"] = ["transformers", type(components.text_encoder).__name__]
        if components.tokenizer is not None:
            components.tokenizer.save_pretrained(tmp / "tokenizer")
            index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        if scheduler_config is None:
            sched = json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())
        elif hasattr(scheduler_config, "to_json_string"):  # a scheduler instance
            sched = json.loads(scheduler_config.to_json_string())
        else:
            sched = {k: v for k, v in dict(scheduler_config).items() if k != "_use_default_values"}
        if "_class_name" not in sched:
            raise ConfigError("scheduler_config needs a '_class_name' (e.g. 'FlowMatchEulerDiscreteScheduler')")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2, sort_keys=True, default=_json_default))
        index["scheduler"] = ["diffusers", sched["_class_name"]]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_default(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")
