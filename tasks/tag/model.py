"""Resolve `tag.model` to a tagger folder and read what the backends need from it.

A tagger folder holds `selected_tags.csv` plus `model.onnx` and/or `model.safetensors` + `config.json`
(the timm config: architecture, num_classes, model_args, pretrained_cfg). The spec may be:
  - a path to such a folder;
  - `builtin:tiny-wd-swinv2[?seed=N]`: a random tiny SwinV2 built once into the cache (tasks/tag/tiny.py),
    then read through exactly this code like any real folder;
  - a Hugging Face repo id (`SmilingWolf/wd-swinv2-tagger-v3`): read from the local Hugging Face cache
    without any network call when the tagger files are there, downloaded through huggingface_hub only when
    they are missing and the machine is online (HF_HUB_OFFLINE honoured: an offline machine gets a
    ConfigError naming the folder to provide). Resolved once per process.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_contracts.errors import ConfigError
from tasks.common.process_cache import ProcessCache
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


# (repo id, HF cache folder) -> its snapshot folder: a run resolves a repo id once, not once per shard
_HUB_FOLDERS: ProcessCache[Path] = ProcessCache("tagger snapshot folder of a Hugging Face repo id")


def _has_tagger_files(path: Path) -> bool:
    return (path / LABELS_NAME).is_file() and (
        (path / ONNX_NAME).is_file() or ((path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()))


def _cached_snapshot(repo_id: str, patterns: list[str]) -> Path | None:
    """The repo's snapshot folder in the local Hugging Face cache when it holds a usable tagger (no network)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not cached, or cached but partial
        # A snapshot the Hub lists more files for than were downloaded (only the ONNX file, say) is still a
        # complete tagger when it has the labels and one backend's files.
        partial = getattr(exc, "snapshot_path", None)
        if partial is None:
            return None
        path = Path(partial)
    return path if _has_tagger_files(path) else None


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _from_hub(repo_id: str, offline: bool | None) -> Path:
    """A repo id -> its snapshot folder: the local Hugging Face cache first (no network call when the tagger
    files are there), a download only when they are missing and the machine is online. Memoised per process:
    a run resolves it once, not once per shard."""
    offline = _hub_offline() if offline is None else offline
    try:
        import huggingface_hub  # noqa: F401 - present, or one clear message
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise ConfigError(f"tag.model {repo_id!r} looks like a Hugging Face repo id, but huggingface_hub is not "
                          f"installed; set tag.model to {FOLDER_LAYOUT}") from exc
    cache = hub_cache_dir()
    return _HUB_FOLDERS.get((repo_id, str(cache)), lambda: _find_snapshot(repo_id, cache, offline),
                            valid=_has_tagger_files)


def _find_snapshot(repo_id: str, cache: Path, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [LABELS_NAME, ONNX_NAME, WEIGHTS_NAME, CONFIG_NAME]
    path = _cached_snapshot(repo_id, patterns)
    if path is not None:
        return path
    expected = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "<revision>"
    message = (f"tag.model {repo_id!r} looks like a Hugging Face repo id, but {{why}}. Expected the "
               f"tagger in the local Hugging Face cache ({expected}, with refs/main naming the revision; "
               f"HF_HUB_CACHE / HF_HOME move it; download it once where there is network access), or set tag.model to {FOLDER_LAYOUT}")
    if offline:
        raise ConfigError(message.format(
            why="this machine is offline (HF_HUB_OFFLINE) and the repo is not in the local cache"))
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network errors, missing repo, gated repo: one actionable message
        raise ConfigError(message.format(
            why=f"it is not in the local cache and could not be fetched ({type(exc).__name__}: "
                f"{str(exc)[:300]})")) from exc
    if not _has_tagger_files(path):  # the Hub was unreachable and a partial snapshot came back
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise ConfigError(message.format(
            why=f"its snapshot {path} holds only {found} even after asking the Hub (unreachable, or the "
                "repo lacks the files)"))
    return path


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
