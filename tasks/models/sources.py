"""Where the SD1.5 weights come from: a single-file checkpoint, a diffusers folder or a builtin.

``resolve_model_source`` turns the user's spec into a :class:`ModelSource` that names the weight
files, the diffusers config folder to pair with them (offline), the tokenizer folder if the source
has one, and a content identity (sha256) for stage fingerprints.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs

from data_contracts.errors import ConfigError
from tasks.models.configs import SD15_CONFIG_DIR
from tasks.models.identity import files_identity, tensors_identity
from tasks.models.single_file import (COMPONENT_PREFIXES, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES,
                                      embedded_configs, read_metadata)
from tasks.models.tokenizer import builtin_tokenizer_dir, find_tokenizer_dir, tokenizer_identity

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("tiny-sd15",)
COMPONENT_DIRS = ("unet", "vae", "text_encoder")

EXPECTED_LAYOUTS = (
    "expected one of: a single-file SD1.5 checkpoint (.safetensors; .ckpt/.pt read with "
    "torch.load(weights_only=True)) holding model.diffusion_model.* / first_stage_model.* / "
    "cond_stage_model.transformer.text_model.*; a diffusers folder with model_index.json and "
    "unet/, vae/, text_encoder/ (config.json + *.safetensors), tokenizer/; or builtin:tiny-sd15[?seed=N]")


@dataclass(frozen=True)
class ModelSource:
    spec: str                                   # what the user wrote
    kind: Literal["single_file", "diffusers"]
    path: Path                                  # the checkpoint file or the diffusers folder
    weight_files: tuple[Path, ...]              # every file whose bytes define the weights
    config_dir: Path                            # diffusers-layout folder with unet/ vae/ text_encoder/ configs
    tokenizer_dir: Path | None                  # the source's own tokenizer, None -> built-in CLIP tokenizer
    identity: str                               # sha256 (one file: its sha256; several: over name+sha256)
    builtin: str | None = None                  # e.g. "tiny-sd15" when built by us
    cache_dir: Path | None = None               # where identities, builtins and the tokenizer are cached


def parse_builtin(spec: str) -> tuple[str, int]:
    """``builtin:tiny-sd15?seed=3`` -> ("tiny-sd15", 3)."""
    body = spec[len(BUILTIN_PREFIX):]
    name, _, query = body.partition("?")
    if name not in BUILTINS:
        raise ConfigError(f"Unknown builtin model {name!r} in {spec!r}; known: "
                          + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS))
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
    unknown = set(params) - {"seed"}
    if unknown:
        raise ConfigError(f"Unknown option(s) {sorted(unknown)} in {spec!r}; only ?seed=<int> is supported")
    try:
        seed = int(params.get("seed", ["0"])[-1])
    except ValueError as e:
        raise ConfigError(f"seed in {spec!r} must be an integer") from e
    return name, seed


def _materialise_embedded(configs: dict[str, dict], cache_dir: Path) -> Path:
    """Write configs embedded in a checkpoint's metadata as a diffusers config folder (content-keyed)."""
    blob = json.dumps(configs, sort_keys=True).encode("utf-8")
    final = Path(cache_dir) / "configs" / hashlib.sha256(blob).hexdigest()[:24]
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for sub in ("unet", "vae", "text_encoder", "scheduler"):
            (tmp / sub).mkdir()
        for sub in COMPONENT_DIRS:  # components not embedded fall back to the SD1.5 shape
            if sub in configs:
                (tmp / sub / "config.json").write_text(json.dumps(configs[sub], indent=2, sort_keys=True))
            else:
                shutil.copyfile(SD15_CONFIG_DIR / sub / "config.json", tmp / sub / "config.json")
        shutil.copyfile(SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json",
                        tmp / "scheduler" / "scheduler_config.json")
        shutil.copyfile(SD15_CONFIG_DIR / "model_index.json", tmp / "model_index.json")  # written last
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_config_dir(config_dir: Path, spec: str) -> Path:
    missing = [f"{sub}/config.json" for sub in COMPONENT_DIRS if not (config_dir / sub / "config.json").is_file()]
    if missing:
        raise ConfigError(f"Config folder {config_dir} (for {spec!r}) lacks {', '.join(missing)}; "
                          "give a diffusers-layout folder with unet/, vae/, text_encoder/ configs")
    return config_dir


def _single_file_source(spec: str, path: Path, cache_dir: Path, config_dir: Path | None,
                        builtin: str | None = None) -> ModelSource:
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ConfigError(f"Model file {path} has an unsupported extension {suffix!r}; {EXPECTED_LAYOUTS}")
    if config_dir is None:
        try:
            meta = read_metadata(path)
        except Exception as e:  # a corrupt header: say so with the path
            raise ConfigError(f"Cannot read safetensors header of {path}: {e}") from e
        emb = embedded_configs(meta)
        config_dir = _materialise_embedded(emb, cache_dir) if emb else SD15_CONFIG_DIR
    config_dir = _check_config_dir(Path(config_dir), spec)
    return ModelSource(spec=spec, kind="single_file", path=path, weight_files=(path,),
                       config_dir=config_dir, tokenizer_dir=None,
                       identity=files_identity([(path.name, path)], cache_dir), builtin=builtin,
                       cache_dir=cache_dir)


def _diffusers_weight_files(folder: Path) -> list[Path]:
    files: list[Path] = []
    for sub in COMPONENT_DIRS:
        d = folder / sub
        if not d.is_dir():
            continue
        found = sorted(p for p in d.iterdir() if p.name.endswith(".safetensors"))
        files.extend(found)
    return files


def _diffusers_source(spec: str, folder: Path, cache_dir: Path) -> ModelSource:
    missing = []
    for sub in COMPONENT_DIRS:
        d = folder / sub
        if not (d / "config.json").is_file():
            missing.append(f"{sub}/config.json")
        elif not any(p.name.endswith(".safetensors") for p in d.iterdir()):
            has_bin = any(p.suffix == ".bin" for p in d.iterdir())
            missing.append(f"{sub}/*.safetensors" + (" (only .bin found: convert it to safetensors)" if has_bin else ""))
    if missing:
        raise ConfigError(f"Diffusers folder {folder} lacks {', '.join(missing)}; {EXPECTED_LAYOUTS}")
    files = _diffusers_weight_files(folder)
    ident = files_identity([(str(p.relative_to(folder)), p) for p in files], cache_dir)
    return ModelSource(spec=spec, kind="diffusers", path=folder, weight_files=tuple(files),
                       config_dir=folder, tokenizer_dir=find_tokenizer_dir(folder), identity=ident,
                       cache_dir=cache_dir)


def resolve_model_source(spec: str, cache_dir: Path, *, config_dir: Path | None = None) -> ModelSource:
    """Resolve a model spec (file path, diffusers folder, ``builtin:tiny-sd15[?seed=N]``).

    For single files the config folder is, in order: ``config_dir`` if given; configs embedded in the
    file's metadata by our exporter (tiny or other non-standard shapes); the shipped SD1.5 configs.
    Builtins are built into ``<cache_dir>/models/`` on first use.
    """
    spec = str(spec).strip()
    cache_dir = Path(cache_dir)
    if spec.startswith(BUILTIN_PREFIX):
        name, seed = parse_builtin(spec)
        from tasks.models.tiny import CONFIG_SUBDIR, WEIGHTS_NAME, ensure_tiny_sd15

        folder = ensure_tiny_sd15(cache_dir, seed)
        return _single_file_source(spec, folder / WEIGHTS_NAME, cache_dir,
                                   config_dir or folder / CONFIG_SUBDIR, builtin=name)
    if not spec:
        raise ConfigError(f"Empty model spec; {EXPECTED_LAYOUTS}")
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return _single_file_source(spec, path, cache_dir, Path(config_dir) if config_dir else None)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
            return _diffusers_source(spec, path, cache_dir)
        raise ConfigError(f"Folder {path} is not a diffusers model folder (no model_index.json or "
                          f"unet/config.json); {EXPECTED_LAYOUTS}")
    raise ConfigError(f"Model not found: {path} does not exist; {EXPECTED_LAYOUTS}")


def pipeline_config_dir(source: ModelSource, cache_dir: Path | None = None) -> Path:
    """A complete diffusers pipeline folder *without weights* (configs + tokenizer) for this source.

    Pass it as ``config=`` to ``StableDiffusionPipeline.from_single_file`` to build a pipeline from
    our single-file checkpoints offline (the plain config folder has no tokenizer). Content-keyed
    under ``<cache_dir>/configs/``.
    """
    cache_dir = Path(cache_dir or source.cache_dir or Path.home() / ".cache" / "booruflow")
    tok_dir = source.tokenizer_dir or builtin_tokenizer_dir(cache_dir)
    files = {"model_index.json": source.config_dir / "model_index.json",
             "scheduler/scheduler_config.json": source.config_dir / "scheduler" / "scheduler_config.json"}
    for sub in COMPONENT_DIRS:
        files[f"{sub}/config.json"] = source.config_dir / sub / "config.json"
    for name, p in list(files.items()):  # a config folder may lack index/scheduler: use SD1.5's
        if not p.is_file():
            files[name] = SD15_CONFIG_DIR / name
    h = hashlib.sha256(tokenizer_identity(tok_dir).encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].read_bytes())
    final = cache_dir / "configs" / f"pipeline-{h.hexdigest()[:24]}"
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for name, p in files.items():
            if name != "model_index.json":
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, tmp / name)
        shutil.copytree(tok_dir, tmp / "tokenizer")
        shutil.copyfile(files["model_index.json"], tmp / "model_index.json")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def source_tokenizer_dir(source: ModelSource, cache_dir: Path | None = None) -> Path:
    """The tokenizer folder ``load_sd15`` uses for this source (its own, else the built-in one)."""
    if source.tokenizer_dir is not None:
        return source.tokenizer_dir
    return builtin_tokenizer_dir(Path(cache_dir or source.cache_dir or Path.home() / ".cache" / "booruflow"))


def component_identity(source: ModelSource, component: str, cache_dir: Path | None = None) -> str:
    """sha256 identity of one component (``unet``, ``vae``, ``text_encoder``, ``tokenizer``).

    For fingerprints that depend on one part only (the cache stage depends on the VAE and the
    tokenizer, not the UNet). Single files hash that component's tensors; diffusers folders its files.
    """
    cache = Path(cache_dir or source.cache_dir) if (cache_dir or source.cache_dir) else None
    if component == "tokenizer":
        return tokenizer_identity(source_tokenizer_dir(source, cache_dir))
    if component not in COMPONENT_PREFIXES:
        raise ConfigError(f"Unknown component {component!r}; choose from unet, vae, text_encoder, tokenizer")
    if source.kind == "single_file":
        return tensors_identity(source.path, COMPONENT_PREFIXES[component], cache)
    files = sorted(p for p in (source.path / component).iterdir() if p.name.endswith(".safetensors"))
    return files_identity([(str(p.relative_to(source.path)), p) for p in files], cache)
