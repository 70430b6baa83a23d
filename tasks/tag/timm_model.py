"""Build a timm tagger from its config.json and load its safetensors weights (no pickle, no download)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from data_contracts.errors import ConfigError


def create_timm_model(config: dict[str, Any], where: str = "config.json") -> nn.Module:
    """timm.create_model(architecture, num_classes, **model_args), randomly initialised, eval mode."""
    arch = config.get("architecture")
    kwargs = dict(config.get("model_args") or {})
    for key in ("depths", "num_heads"):  # JSON lists -> the tuples timm expects
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=int(config["num_classes"]), **kwargs)
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc}") from exc
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: timm cannot build {arch!r} with {kwargs} ({exc})") from exc
    return model.eval()


def load_timm_weights(model: nn.Module, path: Path) -> nn.Module:
    """Strict load; a checkpoint saved by an older timm gets the architecture's own key filter first."""
    state = load_file(str(path))
    try:
        model.load_state_dict(state, strict=True)
        return model
    except RuntimeError as first:
        module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                model.load_state_dict(filter_fn(state, model), strict=True)
                return model
            except (RuntimeError, KeyError, ValueError):
                pass
        raise ConfigError(
            f"{path}: weights do not fit the architecture in config.json ({str(first).splitlines()[0]}; "
            f"{_key_diff(model, state)})"
        ) from first


def _key_diff(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state][:3]
    unexpected = [k for k in state if k not in expected][:3]
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
              for k in expected if k in state and expected[k].shape != state[k].shape][:3]
    return f"missing {missing}, unexpected {unexpected}, shape mismatches {shapes}"


def head_size(model: nn.Module) -> int:
    return int(getattr(model, "num_classes"))
