"""Warm-up that does not scale with the bucket count: compiled graphs kept on disk, graphs shared by shapes.

Chosen by `prepare_unet` (tasks/train/engine.py):

- a persistent, keyed compile cache: inductor's FX-graph cache, AOTAutograd's cache and Triton's kernels go
  to `<runtime.cache_dir>/torch-compile/<key>/`, where the key hashes everything that must never be mixed up
  (torch / CUDA / cuDNN / Triton versions, the GPU and its compute capability, the model's config and dtype,
  the compile options). Inductor keys its entries by graph too; the folder key keeps a changed model or a
  moved cache folder from ever meeting a stale entry and makes the folder easy to drop.
- regional compilation (`train.compile_strategy: regional`): each ResNet / transformer block of the UNet is
  compiled on its own with its input's height and width symbolic. Blocks of one class and width share a
  graph and every bucket shape uses it, so a fresh run compiles a few small graphs once instead of the whole
  UNet once per bucket (H100: 159 s for the first bucket, then 5-17 s per new bucket for cuDNN autotuning and
  CUDA-graph recording, against ~160 s per bucket for the whole-UNet static graphs).
- "dynamic" (tests and the benchmark only): the whole UNet with symbolic height/width. One graph, but its
  cold compile had not finished after 420 s on an H100, so the config does not offer it.

No Prefect here; only torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger("booruflow.train")

CACHE_SUBDIR = "torch-compile"
KEY_FILE = "key.json"
# Set on a UNet by prepare_unet when its latent height/width are to be marked dynamic (read by the Engine).
DYNAMIC_HW_ATTR = "_booruflow_dynamic_hw"
# Distinct shapes one compiled graph sees (17 buckets x up to 3-8 prompt chunk counts): below it no warning.
DYNAMIC_SHAPES_EXPECTED = 17 * 8


def environment_identity(device: torch.device | None = None) -> dict[str, Any]:
    """What compiled kernels depend on besides the graph: library versions and the GPU."""
    ident: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "python": platform.python_version_tuple()[:2], "machine": platform.machine()}
    try:
        import triton

        ident["triton"] = triton.__version__
    except ImportError:
        ident["triton"] = None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        ident["gpu"] = torch.cuda.get_device_name(index)
        ident["capability"] = list(torch.cuda.get_device_capability(index))
        ident["cudnn"] = torch.backends.cudnn.version()
    else:
        ident["gpu"] = "cpu"
    return ident


def model_identity(module: torch.nn.Module) -> dict[str, Any]:
    """The architecture (diffusers config when there is one, else parameter shapes) and parameter dtypes."""
    config = getattr(module, "config", None)
    if config is not None:
        arch: Any = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    else:
        arch = [[name, list(p.shape)] for name, p in module.named_parameters()]
    dtypes = sorted({str(p.dtype) for p in module.parameters()})
    return {"class": type(module).__name__, "arch": arch, "dtypes": dtypes}


def compile_cache_key(model: Mapping[str, Any], options: Mapping[str, Any], environment: Mapping[str, Any]) -> str:
    """Short stable hash of (model identity, compile options, environment)."""
    blob = json.dumps({"model": model, "options": options, "env": environment}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def use_compile_cache(root: str | os.PathLike[str], key: str, describe: Mapping[str, Any] | None = None) -> Path:
    """Point inductor (and Triton, through it) at `<root>/torch-compile/<key>` for this process.

    Must run before the first compile of the process: inductor reads TORCHINDUCTOR_CACHE_DIR when it first
    needs the folder, and some lookups are memoised (cleared here). Returns the folder.
    """
    folder = Path(root).expanduser().resolve() / CACHE_SUBDIR / key
    folder.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if previous and Path(previous).resolve() != folder:
        log.info("compile cache: TORCHINDUCTOR_CACHE_DIR %s replaced by %s (train.compile_cache)", previous, folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    # Triton's own cache defaults to ~/.triton; keep its kernels with the graphs that use them.
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    _enable_local_caches()
    if describe is not None and not (folder / KEY_FILE).exists():
        try:  # for people: what this folder was built for (never read back)
            tmp = folder / f".{KEY_FILE}.{os.getpid()}"
            tmp.write_text(json.dumps(describe, indent=1, sort_keys=True, default=str))
            os.replace(tmp, folder / KEY_FILE)
        except OSError as exc:  # a read-only or full disk must not stop training
            log.warning("compile cache: could not write %s: %s", folder / KEY_FILE, exc)
    return folder


def _enable_local_caches() -> None:
    """FX-graph and AOTAutograd caches on (the defaults of recent torch, set in case a user turned them off),
    memoised cache paths forgotten so the new folder takes effect."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True
    try:
        from torch._inductor.utils import clear_caches
    except ImportError:  # pragma: no cover - older torch
        return
    clear_caches()


def configure_dynamic_shapes() -> None:
    """Process-wide switches for one graph over all latent shapes.

    - no duck sizing: otherwise a square first bucket (64x64) gives height and width one symbol, guarded
      equal, and the first non-square bucket compiles a second graph;
    - CUDA graphs record one graph per distinct shape: ~17 buckets x chunk counts is expected, not a warning;
    - inductor's stride ordering of saved views with symbolic strides (pytorch/pytorch#185510: torch 2.11
      and 2.14, a view saved by the diffusers attention processor): given the shape environment, which knows
      every size is >= 2, the comparison is decidable.
    """
    import torch.fx.experimental._config as fx_config
    import torch._inductor.config as inductor_config

    fx_config.use_duck_shape = False
    triton_cfg = getattr(inductor_config, "triton", None)
    if triton_cfg is not None and hasattr(triton_cfg, "cudagraph_dynamic_shape_warn_limit"):
        limit = triton_cfg.cudagraph_dynamic_shape_warn_limit
        if limit is not None and limit < DYNAMIC_SHAPES_EXPECTED:
            triton_cfg.cudagraph_dynamic_shape_warn_limit = DYNAMIC_SHAPES_EXPECTED
    _patch_symbolic_stride_order()


def _patch_symbolic_stride_order() -> None:
    import torch._inductor.ir as ir

    original = ir.get_stride_order
    if getattr(original, "_booruflow_patched", False):
        return

    def get_stride_order(seq, shape_env=None):  # type: ignore[no-untyped-def]
        if shape_env is None and any(_symbolic(s) for s in seq):
            from torch._inductor.virtualized import V

            try:
                shape_env = V.graph.sizevars.shape_env
            except (AttributeError, AssertionError):  # outside a graph lowering: as before
                shape_env = None
        return original(seq, shape_env)

    get_stride_order._booruflow_patched = True  # type: ignore[attr-defined]
    ir.get_stride_order = get_stride_order


def _symbolic(value: Any) -> bool:
    if isinstance(value, int):
        return False
    if isinstance(value, torch.SymInt):
        return True
    return not getattr(value, "is_Integer", False)


# The UNet's repeated blocks (22 ResNet blocks, 16 transformer blocks in SD1.5); the few convolutions,
# samplers and concatenations between them stay eager.
REGION_CLASSES = ("ResnetBlock2D", "Transformer2DModel")


def compile_regions(unet: torch.nn.Module, *, mode: str | None, backend: str = "inductor") -> int:
    """Compile each repeated block of the UNet on its own, its input's height/width symbolic.

    Blocks of one class and channel count share one compiled graph (dynamo treats the module as an input),
    and the symbolic height/width lets that graph serve every bucket, so a fresh run compiles ~13 small
    graphs instead of one whole-UNet graph per bucket shape. Returns the number of blocks compiled.
    """
    n = 0
    for module in unet.modules():
        if type(module).__name__ in REGION_CLASSES:
            compiled = torch.compile(module._call_impl, dynamic=False, mode=mode, backend=backend)
            module._compiled_call_impl = _marking_call(compiled, module._call_impl)  # as nn.Module.compile()
            n += 1
    return n


def _marking_call(compiled, eager):  # type: ignore[no-untyped-def]
    def call(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not torch.is_grad_enabled():  # sampling / validation (no_grad): their shapes never compile
            return eager(*args, **kwargs)
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            mark_latent_dynamic(x)
        return compiled(*args, **kwargs)

    return call


def mark_latent_dynamic(x: torch.Tensor) -> None:
    """Latent height and width symbolic in the next compile (a hint: a graph that must specialise still may)."""
    torch._dynamo.maybe_mark_dynamic(x, 2)
    torch._dynamo.maybe_mark_dynamic(x, 3)
