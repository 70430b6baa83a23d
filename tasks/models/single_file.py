"""Single-file (LDM / A1111 / ComfyUI) SD1.5 checkpoints: safe reading and diffusers -> LDM export.

Layout written and read:
  ``model.diffusion_model.*``                     UNet, LDM names
  ``first_stage_model.*``                         VAE; mid-block attention q/k/v/proj_out as 1x1 convs
  ``cond_stage_model.transformer.text_model.*``   CLIP ViT-L/14 text (transformers names)

diffusers converts LDM -> diffusers on load but ships no converter back, so the reverse mapping is
written here. It is derived from each model's config (block counts, layers per block, which blocks
have attention), so tiny stand-ins convert exactly like the real SD1.5 shape. Every diffusers key
must map; an unmapped key is an error rather than a silently dropped tensor.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_contracts.errors import ConfigError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_PREFIX}

# Safetensors metadata keys under which export embeds the diffusers configs, so a checkpoint of any
# shape (e.g. the tiny stand-in) can be loaded back without guessing its architecture.
CONFIG_META_KEYS = {"unet": "booruflow.config.unet", "vae": "booruflow.config.vae",
                    "text_encoder": "booruflow.config.text_encoder"}

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------------------- reading

def read_metadata(path: Path) -> dict[str, str]:
    """Safetensors header metadata ({} for pickle checkpoints or none)."""
    if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_checkpoint(path: Path, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint, optionally only those under ``prefixes``.

    ``.safetensors`` is read lazily key by key (only the asked-for components touch memory);
    ``.ckpt/.pt/.pth/.bin`` only through ``torch.load(weights_only=True)``, which refuses pickles that
    would run code. A nested ``state_dict`` (Lightning/LDM checkpoints) is unwrapped.
    """
    return read_checkpoint_and_keys(path, prefixes)[0]


def read_checkpoint_and_keys(path: Path, prefixes: tuple[str, ...] | None = None
                             ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """:func:`read_checkpoint` plus the names of *all* tensors in the file (to recognise its family)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for k in keys:
                    if prefixes is None or k.startswith(prefixes):
                        out[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ConfigError(f"Cannot read safetensors checkpoint {path}: {e}") from e
        return out, keys
    if suffix in PICKLE_SUFFIXES:
        try:
            obj: Any = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
        except Exception as e:  # UnpicklingError for disallowed globals, RuntimeError for corrupt zips
            raise ConfigError(
                f"Refused or failed to load {path} with torch.load(weights_only=True): {e}. "
                "Only plain tensor state dicts are accepted; convert the checkpoint to .safetensors.") from e
        while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{path} does not hold a state dict (found {type(obj).__name__})")
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return {k: v for k, v in tensors.items() if prefixes is None or k.startswith(prefixes)}, list(tensors)
    raise ConfigError(
        f"Unsupported checkpoint file {path}: expected .safetensors (or .ckpt/.pt loaded with "
        "weights_only=True) or a diffusers folder with model_index.json")


# -------------------------------------------------------------------------------- UNet: diffusers->LDM

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename_first(rest: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM ``model.diffusion_model.*`` names."""
    lpb = int(config["layers_per_block"])
    n_down = len(config["down_block_types"])
    # LDM input_blocks: 0 = conv_in; per level lpb (resnet[, attn]) entries, then one downsampler
    # entry on every level but the last. output_blocks: per level lpb+1 entries, the upsampler sits
    # in the level's last entry after the resnet (and attention when the level has one).
    down_start: list[int] = []
    idx = 1
    for b in range(n_down):
        down_start.append(idx)
        idx += lpb + (1 if b < n_down - 1 else 0)
    out: dict[str, torch.Tensor] = {}
    up_has_attn: dict[int, bool] = {}
    for k in sd:
        m = re.match(r"up_blocks\.(\d+)\.attentions\.", k)
        if m:
            up_has_attn[int(m.group(1))] = True
    for k, v in sd.items():
        module, param = _split_param(k)
        try:
            new = _unet_ldm_name(module, param, lpb, down_start, up_has_attn)
        except KeyError:
            new = None
        if new is None:
            raise ValueError(f"UNet key {k!r} has no LDM mapping (unsupported UNet config?)")
        out[UNET_PREFIX + new] = v
    return out


def _unet_ldm_name(module: str, param: str, lpb: int, down_start: list[int],
                   up_has_attn: dict[int, bool]) -> str | None:
    """LDM name (without prefix) of one diffusers UNet parameter; None (or KeyError) when unmapped."""
    new: str | None = None
    if module in _UNET_TOP:
        new = f"{_UNET_TOP[module]}.{param}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        b, l, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        new = f"input_blocks.{down_start[b] + l}.0.{_rename_first(rest, _UNET_RESNET)}.{param}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        b, l, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        new = f"input_blocks.{down_start[b] + l}.1.{rest}.{param}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        b = int(m.group(1))
        new = f"input_blocks.{down_start[b] + lpb}.0.op.{param}"
    elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        r, rest = int(m.group(1)), m.group(2)
        new = f"middle_block.{2 * r}.{_rename_first(rest, _UNET_RESNET)}.{param}"
    elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        new = f"middle_block.1.{m.group(1)}.{param}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        b, l, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        new = f"output_blocks.{b * (lpb + 1) + l}.0.{_rename_first(rest, _UNET_RESNET)}.{param}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        b, l, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        new = f"output_blocks.{b * (lpb + 1) + l}.1.{rest}.{param}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        b = int(m.group(1))
        slot = 2 if up_has_attn.get(b) else 1
        new = f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.{param}"
    return new


# --------------------------------------------------------------------------------- VAE: diffusers->LDM

_VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _vae_resnet(rest: str) -> str:
    # LDM ResnetBlock names equal diffusers' except the shortcut.
    return "nin_shortcut" + rest[len("conv_shortcut"):] if rest.startswith("conv_shortcut") else rest


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM ``first_stage_model.*`` names (attention as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        module, param = _split_param(k)
        new: str | None = None
        if module in ("quant_conv", "post_quant_conv"):
            new = k
        elif m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)", module):
            new = f"{m.group(1)}.{_VAE_TOP[m.group(2)]}.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet(m.group(3))}.{param}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.{_vae_resnet(m.group(3))}.{param}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", module):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_vae_resnet(m.group(3))}.{param}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            new = f"{m.group(1)}.mid.attn_1.{_rename_first(m.group(2), _VAE_ATTN)}.{param}"
            if param == "weight" and v.ndim == 2 and m.group(2) != "group_norm":
                v = v.reshape(*v.shape, 1, 1)  # linear [C,C] -> conv1x1 [C,C,1,1] as LDM stores it
        if new is None:
            raise ValueError(f"VAE key {k!r} has no LDM mapping (unsupported VAE config?)")
        out[VAE_PREFIX + new] = v
    return out


# ------------------------------------------------------------------------- text encoder: HF->LDM

def clip_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> ``cond_stage_model.transformer.text_model.*``.

    transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; older ones with it.
    ``embeddings.position_ids`` (int64 [1, 77]) is written as the original SD1.5 file has it: newer
    transformers keep it as a non-persistent buffer, but strict loaders of the LDM layout expect it.
    """
    out: dict[str, torch.Tensor] = {}
    n_pos = None
    for k, v in sd.items():
        name = k[len("text_model."):] if k.startswith("text_model.") else k
        if name.endswith("position_ids"):
            continue
        if name == "embeddings.position_embedding.weight":
            n_pos = v.shape[0]
        out[CLIP_PREFIX + name] = v
    if n_pos is not None:
        out[CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64).unsqueeze(0)
    return out


# ------------------------------------------------------------------------------------------- export

# Dropped from exported configs: local paths (privacy) and library versions (the same weights
# exported by another diffusers/transformers release should give the same bytes).
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "_diffusers_version", "transformers_version")


def config_dict(model: Any) -> dict[str, Any]:
    """The model's config as its own ``config.json`` would hold it (diffusers or transformers)."""
    if hasattr(model, "to_json_string"):  # diffusers ConfigMixin (adds _class_name, drops privates)
        cfg = json.loads(model.to_json_string())
    else:  # transformers PretrainedConfig
        cfg = json.loads(model.config.to_json_string(use_diff=False))
    return {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}


def unwrap_model(model: Any) -> Any:
    """The plain module behind DDP/accelerate (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ in (
                "DataParallel", "FullyShardedDataParallel"):
            model = model.module
        else:
            return model


def ldm_state_dict(unet: Any = None, vae: Any = None, text_encoder: Any = None,
                   dtype: torch.dtype | None = torch.float16) -> dict[str, torch.Tensor]:
    """The single-file state dict of the given components (floating tensors cast to ``dtype``)."""
    unet, vae, text_encoder = (unwrap_model(m) if m is not None else None for m in (unet, vae, text_encoder))
    out: dict[str, torch.Tensor] = {}
    if unet is not None:
        out.update(unet_diffusers_to_ldm(unet.state_dict(), unet.config))
    if vae is not None:
        out.update(vae_diffusers_to_ldm(vae.state_dict(), vae.config))
    if text_encoder is not None:
        out.update(clip_to_ldm(text_encoder.state_dict()))
    res: dict[str, torch.Tensor] = {}
    for k, v in out.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        res[k] = v.to("cpu").contiguous()
    return res


def export_single_file(unet: Any, vae: Any, text_encoder: Any, path: Path, *,
                       dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None,
                       embed_configs: bool = True) -> None:
    """Write an A1111/ComfyUI/diffusers-loadable single-file SD1.5 checkpoint, atomically.

    ``metadata`` goes into the safetensors header (all values must be str). With ``embed_configs``
    the three diffusers configs are stored there too (``booruflow.config.*``), which lets
    :func:`tasks.models.sources.resolve_model_source` load non-standard shapes (tiny models) offline.
    """
    path = Path(path)
    unet, vae, text_encoder = (unwrap_model(m) if m is not None else None for m in (unet, vae, text_encoder))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.setdefault("format", "pt")
    if embed_configs:
        for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
            if model is not None:
                meta[CONFIG_META_KEYS[name]] = json.dumps(config_dict(model), sort_keys=True)
    tensors = ldm_state_dict(unet, vae, text_encoder, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        canonicalise_header(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, readable_mode(False))  # safetensors >= 0.5 creates files 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc); elsewhere the classic set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_mode(folder: bool) -> int:
    """What open()/mkdir() would give under the umask (0644 / 0755 with the usual 022)."""
    return (0o777 if folder else 0o666) & ~current_umask()


def make_tree_readable(root: Path) -> None:
    """Give `root` and everything under it the umask's ordinary modes. Writers that go through a temp
    file or folder (safetensors' save_file: 0600, tempfile.mkdtemp: 0700) leave exports that a ComfyUI
    service running as another user cannot read. Symlinks are left alone (chmod would follow them)."""
    root = Path(root)
    if not root.exists() or root.is_symlink():
        return
    if root.is_file():
        os.chmod(root, readable_mode(False))
        return
    file_mode, dir_mode = readable_mode(False), readable_mode(True)
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), file_mode)


def canonicalise_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys, in place, so equal content gives equal bytes.

    safetensors serialises the metadata map in hash order, which varies between map instances; a
    checkpoint's sha256 is its identity in stage fingerprints, so the same weights must hash the
    same. Tensor data offsets are relative to the end of the header and are unaffected.
    """
    with open(path, "rb+") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n).decode("utf-8"))
        canon = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(canon) <= n:  # same content, so same length up to padding; pad like safetensors (spaces)
            f.seek(8)
            f.write(canon + b" " * (n - len(canon)))
            return
    # Longer (different escaping): rewrite the file with the new header, streaming the data.
    pad = (-len(canon)) % 8
    tmp = path.with_name(path.name + ".canon")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + n)
        dst.write((len(canon) + pad).to_bytes(8, "little") + canon + b" " * pad)
        while block := src.read(64 << 20):
            dst.write(block)
    os.replace(tmp, path)


def embedded_configs(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Diffusers configs embedded by :func:`export_single_file` ({} when absent)."""
    out: dict[str, dict[str, Any]] = {}
    for name, key in CONFIG_META_KEYS.items():
        if key in metadata:
            try:
                out[name] = json.loads(metadata[key])
            except ValueError:
                return {}
    return out
