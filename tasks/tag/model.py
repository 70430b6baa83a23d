"""Resolve `tag.model` to a tagger folder and read what the backends need from it.

A tagger folder holds `selected_tags.csv` plus `model.onnx` and/or `model.safetensors` + `config.json`
(the timm config: architecture, num_classes, model_args, pretrained_cfg). The spec may be:
  - a path to such a folder;
  - `builtin:tiny-wd-swinv2[?seed=N]`: a random tiny SwinV2 built once into the cache (tasks/tag/tiny.py),
    then read through exactly this code like any real folder;
  - a Hugging Face repo id (`SmilingWolf/wd-swinv2-tagger-v3`), fetched through huggingface_hub only
    when the machine is online (an offline machine gets a ConfigError naming the folder to provide).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_contracts.errors import ConfigError
from tasks.tag.labels import Labels, load_labels

LABELS_NAME = "selected_tags.csv"
ONNX_NAME = "model.onnx"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FOLDER_LAYOUT = (
    f"a folder with {LABELS_NAME} and {ONNX_NAME} and/or {WEIGHTS_NAME} + {CONFIG_NAME} "
    "(e.g. the files of SmilingWolf/wd-swinv2-tagger-v3 downloaded once)"
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True, eq=False)
class TaggerFolder:
    name: str  # the spec as configured
    path: Path
    labels: Labels
    onnx_path: Path | None
    weights_path: Path | None
    config: dict[str, Any] | None

    @property
    def config_input_size(self) -> int | None:
        """img_size from config.json (model_args, else pretrained_cfg.input_size), if there is one."""
        if not self.config:
            return None
        size = (self.config.get("model_args") or {}).get("img_size")
        if size is None:
            size = ((self.config.get("pretrained_cfg") or {}).get("input_size") or [None])[-1]
        if isinstance(size, (list, tuple)):
            size = size[-1]
        return int(size) if size is not None else None


def open_folder(path: Path, name: str | None = None) -> TaggerFolder:
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tag.model: {path} is not a folder; expected {FOLDER_LAYOUT}")
    onnx_path = path / ONNX_NAME
    weights_path = path / WEIGHTS_NAME
    config_path = path / CONFIG_NAME
    has_onnx = onnx_path.is_file()
    has_torch = weights_path.is_file() and config_path.is_file()
    if not (path / LABELS_NAME).is_file() or not (has_onnx or has_torch):
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ConfigError(f"tag.model: {path} holds {found}; expected {FOLDER_LAYOUT}")
    config = None
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid JSON ({exc})") from exc
        if not isinstance(config, dict) or "architecture" not in config:
            raise ConfigError(f"{config_path}: expected a timm config with an 'architecture' field")
    return TaggerFolder(
        name=name or str(path),
        path=path,
        labels=load_labels(path / LABELS_NAME),
        onnx_path=onnx_path if has_onnx else None,
        weights_path=weights_path if has_torch else None,
        config=config,
    )


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def _from_hub(repo_id: str, offline: bool | None) -> Path:
    offline = _hub_offline() if offline is None else offline
    message = (
        f"tag.model {repo_id!r} looks like a Hugging Face repo id, but {{why}}. Download it once on a machine "
        f"with network access and set tag.model to {FOLDER_LAYOUT}"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ConfigError(message.format(why="huggingface_hub is not installed")) from exc
    patterns = [LABELS_NAME, ONNX_NAME, WEIGHTS_NAME, CONFIG_NAME]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # network errors, missing repo, offline cache miss: one actionable message
        why = "this machine is offline and the repo is not in the local Hugging Face cache" if offline else (
            f"it could not be fetched ({type(exc).__name__}: {exc})")
        raise ConfigError(message.format(why=why)) from exc


def resolve_model(spec: str, cache_dir: Path, *, offline: bool | None = None) -> TaggerFolder:
    """`tag.model` -> an opened tagger folder (building the tiny one on first use)."""
    from tasks.tag.tiny import ensure_tiny_tagger, is_builtin, parse_builtin

    if is_builtin(spec):
        return open_folder(ensure_tiny_tagger(Path(cache_dir), parse_builtin(spec)), name=spec)
    path = Path(spec).expanduser()
    if path.exists():
        return open_folder(path, name=spec)
    if _REPO_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return open_folder(_from_hub(spec, offline), name=spec)
    raise ConfigError(f"tag.model: {spec!r} does not exist; expected {FOLDER_LAYOUT}, "
                      "a Hugging Face repo id, or builtin:tiny-wd-swinv2")
