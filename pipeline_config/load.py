"""Load a config: a preset name or YAML path, then dotted overrides, then validation.

Every error names the dotted key; an unknown key also names the closest valid one.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from data_contracts.errors import ConfigError
from data_contracts.fingerprint import digest
from pipeline_config.schema import PipelineConfig

PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(source: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(source)
    if not path.suffix and (PRESETS_DIR / f"{source}.yaml").exists():
        path = PRESETS_DIR / f"{source}.yaml"
    if not path.exists():
        raise ConfigError(
            f"config {str(source)!r} is neither a preset ({', '.join(preset_names())}) nor an existing YAML file"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw, str(path)


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """`["train.lr=1e-5", ...]` or `{"train.lr": 1e-5}` -> {dotted key: value}; values parse as YAML."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-5)")
        try:
            parsed[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return parsed


def _model_at(path: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `path` (to suggest names)."""
    model: type[BaseModel] | None = PipelineConfig
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _closest(name: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    match = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(model.model_fields)}"


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def validate_config(tree: dict[str, Any], where: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [p for p in err["loc"]]
            dotted = ".".join(str(p) for p in loc)
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key {dotted!r}{_closest(str(loc[-1]), _model_at(loc[:-1]))}")
            else:
                lines.append(f"{dotted}: {err['msg']} (found {err.get('input')!r})")
        raise ConfigError(f"{where}: " + "; ".join(lines)) from None


def load_config(
    config: str | Path | Mapping[str, Any] = "demo",
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> PipelineConfig:
    if isinstance(config, Mapping):
        tree, where = dict(config), "config"
    else:
        tree, where = _read_yaml(config)
    for key, value in parse_overrides(overrides).items():
        set_dotted(tree, key, value)
    return validate_config(tree, where)


def section_dict(cfg: PipelineConfig, section: str) -> dict[str, Any]:
    """What of a stage's config section decides its output (execution-only knobs left out)."""
    return getattr(cfg, section).fingerprint_dict()


def section_digest(cfg: PipelineConfig, section: str) -> str:
    return digest(section_dict(cfg, section))
