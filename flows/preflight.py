"""Preflight: what would stop a run, found before any server, crawl or model load starts.

`fm check -c <preset>` prints every finding; `fm run` runs the same checks first and stops on an error.
Each check is a plain function returning findings (level, check, message); the message says what to change.
No Prefect here (it must answer in about a second) and no torch unless a stage asks for CUDA.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Literal, Mapping, NamedTuple, Sequence

from data_contracts.errors import BooruflowError

Level = Literal["ok", "warn", "error"]
MARKS: dict[str, str] = {"ok": "✓", "warn": "!", "error": "✗"}
GB = 1e9
REAL_RECIPE_MIN_FREE = 20 * GB  # below this a real (non-demo) run warns whatever the estimate says
DEMO_MIN_FREE = 1 * GB

# Rough sizes for the disk estimate (said in the message, so a reader can judge them).
DANBOORU_IMAGE_BYTES = 1.5e6  # an average Danbooru original
EMBEDDED_IMAGE_BYTES = 1.5e5  # a generated mini-booru image
SD15_TRAIN_STATE_BYTES = 6e9  # one resumable checkpoint: fp32 UNet + optimizer state + EMA
SD15_EXPORT_BYTES = 4e9  # single-file export + diffusers folder (fp16)

SD_PREFIXES = {"UNet": "model.diffusion_model.", "VAE": "first_stage_model.", "CLIP": "cond_stage_model."}
SD_LAYOUT = ("a single-file SD1.5 checkpoint (.safetensors, or .ckpt/.pt) or a diffusers folder "
             "(model_index.json; unet/, vae/, text_encoder/ with config.json + *.safetensors)")
TAGGER_LAYOUT = "a folder with selected_tags.csv and model.onnx and/or model.safetensors + config.json"
GPU_RUNTIME_STAGES = ("cache", "train", "eval")  # stages that run on runtime.device


class Finding(NamedTuple):
    level: Level
    check: str
    message: str


def format_finding(f: Finding) -> str:
    return f"{MARKS[f.level]} {f.check:<14} {f.message}"


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


def _is_builtin(spec: str) -> bool:
    return spec.strip().startswith("builtin:")


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


# --- config and stages ---------------------------------------------------------------------------------------
def check_config(config: str, overrides: Sequence[str]) -> tuple[object | None, list[Finding]]:
    """(the config, findings): a config error is one ✗ line instead of a traceback."""
    from pipeline_config.load import load_config

    try:
        cfg = load_config(config, overrides)
    except BooruflowError as exc:
        return None, [Finding("error", "config", str(exc))]
    extra = f" with {', '.join(overrides)}" if overrides else ""
    return cfg, [Finding("ok", "config", f"{config}{extra}: valid (name {cfg.name}, data_root {cfg.data_root})")]


def check_stages(names: Sequence[str] | None) -> tuple[list[str], list[Finding]]:
    from tasks.registry import select_stages

    try:
        stages = select_stages(list(names) if names else None)
    except BooruflowError as exc:
        return [], [Finding("error", "stages", str(exc))]
    return stages, [Finding("ok", "stages", ", ".join(stages))]


# --- models --------------------------------------------------------------------------------------------------
def _safetensors_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte length + JSON), without loading any tensor."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > 200_000_000:
            raise ValueError(f"header length {length} is implausible (not a safetensors file?)")
        header = json.loads(fh.read(length))
    return [k for k in header if k != "__metadata__"]


def _unreadable(path: Path) -> str | None:
    if os.access(path, os.R_OK):
        return None
    try:
        st = path.stat()
        return f"{path} is not readable by you (mode {st.st_mode & 0o777:o}, owner uid {st.st_uid})"
    except OSError as exc:
        return f"{path} cannot be read ({exc})"


def sd_model_finding(key: str, spec: str, needs: Sequence[str] = tuple(SD_PREFIXES)) -> Finding:
    """An SD1.5 checkpoint spec (train.model, cache.model, eval.base_model) in a layout the loader reads,
    holding the components the stage loads (`needs`: UNet, VAE, CLIP; the cache stage loads only the VAE)."""
    fix = f"set {key} (-o {key}=PATH) to {SD_LAYOUT}"
    if _is_builtin(spec):
        return Finding("ok", key, f"{spec} (tiny random stand-in, built on first use)")
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        return Finding("error", key, f"{spec} does not exist; {fix}")
    if path.is_dir():
        if not ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()):
            return Finding("error", key, f"{path} is a folder but not a diffusers model (no model_index.json or "
                                         f"unet/config.json); {fix}")
        missing = []
        for sub in ("unet", "vae", "text_encoder"):
            folder = path / sub
            if not (folder / "config.json").is_file():
                missing.append(f"{sub}/config.json")
            elif not any(p.name.endswith(".safetensors") for p in folder.iterdir()):
                missing.append(f"{sub}/*.safetensors")
            elif problem := _unreadable(folder):
                return Finding("error", key, problem)
        if missing:
            return Finding("error", key, f"diffusers folder {path} lacks {', '.join(missing)}; {fix}")
        return Finding("ok", key, f"{path} (diffusers folder)")
    if problem := _unreadable(path):
        return Finding("error", key, f"{problem}; give yourself read access (chmod a+r) or copy it")
    suffix = path.suffix.lower()
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return Finding("ok", key, f"{path} (pickle checkpoint, {path.stat().st_size / GB:.1f} GB; "
                                  "read with torch.load(weights_only=True))")
    if suffix != ".safetensors":
        return Finding("error", key, f"{path} has the extension {suffix!r}; {fix}")
    try:
        keys = _safetensors_keys(path)
    except (OSError, ValueError) as exc:
        return Finding("error", key, f"{path}: not a readable safetensors file ({exc})")
    lacking = [name for name in needs if not any(k.startswith(SD_PREFIXES[name]) for k in keys)]
    if lacking:
        return Finding("error", key, f"{path} holds no {'/'.join(lacking)} weights "
                                     f"({', '.join(SD_PREFIXES[n] + '*' for n in lacking)}); {fix}")
    return Finding("ok", key, f"{path} (single file, {len(keys)} tensors, {path.stat().st_size / GB:.1f} GB)")


def tagger_finding(key: str, spec: str) -> Finding:
    """A WD tagger spec: builtin, a folder in the tagger layout, or a Hugging Face repo id."""
    if _is_builtin(spec):
        return Finding("ok", key, f"{spec} (tiny random stand-in, built on first use)")
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        looks_like_repo = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
        if looks_like_repo:
            return Finding("warn", key, f"{spec} is not a folder here: read as a Hugging Face repo id, fetched on "
                                        f"first use (needs network); offline, set {key} to {TAGGER_LAYOUT}")
        return Finding("error", key, f"{spec} does not exist; set {key} (-o {key}=PATH) to {TAGGER_LAYOUT}")
    from tasks.tag.model import open_folder  # the stage's own reader: same messages as the stage

    try:
        folder = open_folder(path, name=spec)
    except BooruflowError as exc:
        return Finding("error", key, str(exc))
    except OSError as exc:
        return Finding("error", key, f"{path} cannot be read ({exc})")
    for weights in (folder.onnx_path, folder.weights_path):
        if weights is not None and (problem := _unreadable(weights)):
            return Finding("error", key, problem)
    backends = [n for n, p in (("onnx", folder.onnx_path), ("torch", folder.weights_path)) if p]
    return Finding("ok", key, f"{path} ({len(folder.labels)} tags; {' + '.join(backends)})")


def check_models(cfg, stages: Sequence[str]) -> list[Finding]:
    found: list[Finding] = []
    if "tag" in stages:
        found.append(tagger_finding("tag.model", cfg.tag.model))
    if "cache" in stages:
        found.append(sd_model_finding("cache.model", cfg.cache.model, needs=("VAE",)))
    if "train" in stages:
        found.append(sd_model_finding("train.model", cfg.train.model))
    if "eval" in stages:  # what eval loads besides the train output, unless checked above already
        base_key = "eval.base_model" if cfg.eval.base_model else "train.model"
        base = cfg.eval.base_model or cfg.train.model
        if (cfg.eval.include_base or cfg.eval.checkpoints) and ("train" not in stages or base != cfg.train.model):
            found.append(sd_model_finding(base_key, base))
        tagger_key = "eval.tagger" if cfg.eval.tagger else "tag.model"
        tagger = cfg.eval.tagger or cfg.tag.model
        if cfg.eval.probe_space == "tagger" and ("tag" not in stages or tagger != cfg.tag.model):
            found.append(tagger_finding(tagger_key, tagger))
    if {"cache", "train"} <= set(stages) and cfg.cache.model != cfg.train.model:
        found.append(Finding("warn", "cache.model", f"differs from train.model ({cfg.cache.model} vs "
                                                    f"{cfg.train.model}): latents from one VAE, trained on another"))
    return found


# --- devices -------------------------------------------------------------------------------------------------
def cuda_status() -> tuple[int, str]:
    """(visible CUDA devices, description). Imports torch: call only when a stage asks for CUDA."""
    import torch

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    build = f"torch {torch.__version__}, {cuda}"
    if not torch.cuda.is_available():
        return 0, build
    n = torch.cuda.device_count()
    return n, f"{n} x {torch.cuda.get_device_name(0)} ({build})"


def check_devices(cfg, stages: Sequence[str], probe: Callable[[], tuple[int, str]] = cuda_status) -> list[Finding]:
    wants: list[tuple[str, list[str]]] = []
    if "tag" in stages and cfg.tag.device == "cuda":
        wants.append(("tag.device", ["tag"]))
    runtime_stages = [s for s in GPU_RUNTIME_STAGES if s in stages]
    if runtime_stages and cfg.runtime.device == "cuda":
        wants.append(("runtime.device", runtime_stages))
    if not wants:
        return []
    count, what = probe()
    found = []
    for key, users in wants:
        if count:
            found.append(Finding("ok", key, f"cuda for {', '.join(users)}: {what}"))
        else:
            found.append(Finding("error", key, f"is cuda (for {', '.join(users)}) but no CUDA device is visible "
                                               f"({what}); set -o {key}=auto (or cpu) or run on a GPU machine"))
    return found


# --- credentials and the Danbooru host -----------------------------------------------------------------------
def _crawls(cfg, stages: Sequence[str]) -> bool:
    """The ingest stage will talk to a real Danbooru host (not the embedded mini-booru, not a dump)."""
    from pipeline_config.ingest import EMBEDDED_URL

    return "ingest" in stages and cfg.ingest.source == "danbooru_api" and cfg.ingest.api.base_url != EMBEDDED_URL


def _credentials(cfg, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    api = cfg.ingest.api
    return ((env.get(api.login_env) or None) if api.login_env else None,
            (env.get(api.api_key_env) or None) if api.api_key_env else None)


def check_credentials(cfg, stages: Sequence[str], env: Mapping[str, str] | None = None) -> list[Finding]:
    if not _crawls(cfg, stages):
        return []
    env = os.environ if env is None else env
    api = cfg.ingest.api
    login, key = _credentials(cfg, env)
    if login and key:
        return [Finding("ok", "credentials", f"Danbooru login from ${api.login_env}, API key from ${api.api_key_env}")]
    if login or key:
        have, missing = (api.login_env, api.api_key_env) if login else (api.api_key_env, api.login_env)
        return [Finding("error", "credentials", f"only one Danbooru credential is set (${have}); export {missing} "
                                                f"too, or unset {have} to crawl anonymously")]
    return [Finding("warn", "credentials", f"none set: crawling anonymously (tag_limit 2, anonymous rate limits); "
                                           f"export {api.login_env} and {api.api_key_env} for an account (served "
                                           f"runs also read Prefect Secret blocks of those names, lowercase-dashed)")]


def probe_danbooru(cfg, timeout_s: float = 3.0, env: Mapping[str, str] | None = None) -> Finding:
    """GET <base_url>/posts.json?limit=1: is the host there, does it accept these credentials?"""
    api = cfg.ingest.api
    url = f"{api.base_url}/posts.json?limit=1"
    headers = {"User-Agent": api.user_agent, "Accept": "application/json"}
    login, key = _credentials(cfg, os.environ if env is None else env)
    if login and key:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{login}:{key}".encode()).decode()
    started = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
            body = resp.read(1_000_000)
            status = resp.status
    except urllib.error.HTTPError as exc:
        why = {401: "credentials rejected: check the login/API key", 403: "access denied (credentials, or a "
               "block/challenge in front of the host)", 429: "rate limited right now: lower "
               "ingest.api.requests_per_s or wait"}.get(exc.code, exc.reason)
        level: Level = "warn" if exc.code == 429 else "error"
        return Finding(level, "danbooru", f"GET {url} answered HTTP {exc.code} ({why})")
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Finding("error", "danbooru", f"GET {url} failed: {reason} (after {time.monotonic() - started:.1f} s); "
                                            "check the network or ingest.api.base_url")
    ms = (time.monotonic() - started) * 1000
    try:
        posts = json.loads(body)
    except ValueError:
        return Finding("error", "danbooru", f"GET {url} answered {status} but not JSON: is ingest.api.base_url a "
                                            "Danbooru host?")
    if not isinstance(posts, list):
        return Finding("error", "danbooru", f"GET {url} answered {status} with {type(posts).__name__}, not a list "
                                            "of posts: is ingest.api.base_url a Danbooru host?")
    return Finding("ok", "danbooru", f"{api.base_url} answers /posts.json in {ms:.0f} ms")


def check_source(cfg, stages: Sequence[str]) -> list[Finding]:
    """An offline dump: its files must be there."""
    if "ingest" not in stages or cfg.ingest.source != "danbooru_dump":
        return []
    dump = cfg.ingest.dump
    found = []
    for key, value in (("ingest.dump.posts_path", dump.posts_path), ("ingest.dump.images_path", dump.images_path)):
        if value is None:
            if key.endswith("posts_path"):
                found.append(Finding("error", "dump", f"{key} is not set; give the dump's posts file or folder"))
            continue
        if _is_url(value):
            found.append(Finding("ok", "dump", f"{key} {value} (remote: not checked)"))
        elif not Path(value).expanduser().exists():
            found.append(Finding("error", "dump", f"{key} {value} does not exist"))
        else:
            found.append(Finding("ok", "dump", f"{key} {value}"))
    return found


# --- data root and disk --------------------------------------------------------------------------------------
def estimate_bytes(cfg, stages: Sequence[str]) -> tuple[float, list[str]]:
    """What the selected stages will write under data_root, roughly, and how that was reckoned."""
    from pipeline_config.ingest import EMBEDDED_URL

    ingest = cfg.ingest
    if ingest.source == "danbooru_api" and ingest.api.base_url == EMBEDDED_URL:
        images, per_image = ingest.embedded.posts, EMBEDDED_IMAGE_BYTES
    elif ingest.source == "danbooru_api":
        images, per_image = sum(q.quota for q in ingest.queries) or 1000, DANBOORU_IMAGE_BYTES
    else:
        images, per_image = 0, 0.0  # a dump's images are already on disk
    parts: list[tuple[str, float]] = []
    if "ingest" in stages and images:
        parts.append((f"images {images:,} x ~{per_image / 1e6:.2g} MB", images * per_image))
    if "cache" in stages:
        latent = 4 * (cfg.bucket.resolution // 8) ** 2 * 2 * (2 if cfg.cache.store_std else 1)  # fp16 mean (+std)
        parts.append((f"latents {_gb(latent * max(images, 1))}", latent * max(images, 1)))
    if "train" in stages and not _is_builtin(cfg.train.model):
        size = SD15_TRAIN_STATE_BYTES * cfg.train.keep_last + SD15_EXPORT_BYTES
        parts.append((f"checkpoints {_gb(size)}", size))
    return sum(b for _, b in parts), [p for p, _ in parts]


def _nearest_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _real_recipe(cfg, stages: Sequence[str]) -> bool:
    return _crawls(cfg, stages) or not all(_is_builtin(m) for m in (cfg.train.model, cfg.cache.model))


def check_data_root(cfg, stages: Sequence[str], min_free: float | None = None) -> list[Finding]:
    root = cfg.data_root
    if _is_url(root):
        return [Finding("ok", "data_root", f"{root} (object storage: space and access not checked here)")]
    where = _nearest_existing(Path(root))
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        return [Finding("error", "data_root", f"{root}: {where} is not a writable folder for you; "
                                              f"set -o data_root=<a folder you can write>")]
    created = "" if where == Path(root).expanduser().absolute() else f" (to be created under {where})"
    found = [Finding("ok", "data_root", f"{root}{created} is writable")]
    free = shutil.disk_usage(where).free
    need, parts = estimate_bytes(cfg, stages)
    floor = min_free if min_free is not None else (REAL_RECIPE_MIN_FREE if _real_recipe(cfg, stages) else DEMO_MIN_FREE)
    wanted = max(need, floor)
    estimate = f"; this config writes up to ~{_gb(need)} ({', '.join(parts)})" if parts else ""
    if free < wanted:
        found.append(Finding("warn", "disk", f"{_gb(free)} free under {where}{estimate}; free some space or "
                                             f"point data_root elsewhere (outputs already there are reused)"))
    else:
        found.append(Finding("ok", "disk", f"{_gb(free)} free under {where}{estimate}"))
    return found


# --- all of it -----------------------------------------------------------------------------------------------
def preflight(cfg, stages: Sequence[str], *, network: bool = True, timeout_s: float = 3.0,
              env: Mapping[str, str] | None = None,
              cuda_probe: Callable[[], tuple[int, str]] = cuda_status) -> list[Finding]:
    """Every check for running `stages` of `cfg` (config and stage names already valid)."""
    found = check_data_root(cfg, stages)
    found += check_models(cfg, stages)
    found += check_devices(cfg, stages, cuda_probe)
    found += check_source(cfg, stages)
    found += check_credentials(cfg, stages, env)
    if _crawls(cfg, stages) and network and not has_errors(f for f in found if f.check == "credentials"):
        found.append(probe_danbooru(cfg, timeout_s, env))
    return found
