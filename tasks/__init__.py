import importlib as _importlib
import importlib.util as _importlib_util
import logging as _logging
import sys as _sys
import threading as _threading
import types as _types

# bitsandbytes, imported by diffusers, warns on every import (CPUs with AVX512-BF16) that the Hub kernel of an
# optional 4-bit CPU op is untrusted; this project never builds 4-bit layers, so the line is noise in every log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())


def _load_bitsandbytes_on_first_use() -> None:
    """diffusers imports bitsandbytes whenever it is installed (for its quantizers, which this project never uses),
    and `import bitsandbytes` costs ~5 s of CPU (its CPU backend wraps ops in torch.compile at import). In every
    process that imports diffusers (the CLI, each worker, each test subprocess) that was measured 7.3 -> 6.0 s of
    CPU for `import tasks; from diffusers import UNet2DConditionModel` (diffusers imports torch._dynamo itself).
    So `bitsandbytes` starts as a stand-in module that has the package's file attributes (what
    `inspect.getmodule` reads of every module) and imports the real package on the first other attribute asked of
    it -- the adamw8bit optimiser -- and never otherwise."""
    if "bitsandbytes" in _sys.modules:
        return
    try:
        spec = _importlib_util.find_spec("bitsandbytes")
    except (ImportError, ValueError):
        return
    if spec is None or spec.loader is None:
        return
    stand_in = _types.ModuleType("bitsandbytes", "bitsandbytes, imported on first use (tasks/__init__.py)")
    stand_in.__spec__, stand_in.__file__, stand_in.__loader__ = spec, spec.origin, spec.loader
    stand_in.__package__ = "bitsandbytes"
    # No __path__: `import bitsandbytes.optim` / `from bitsandbytes.optim import X` ask for it, which runs the
    # package's own __init__ first (it registers the ops the submodules call).
    lock = _threading.Lock()

    def __getattr__(name: str) -> object:
        with lock:  # two first uses at once: one import
            if _sys.modules.get("bitsandbytes") is stand_in:
                del _sys.modules["bitsandbytes"]
                try:
                    real = _importlib.import_module("bitsandbytes")
                except BaseException:
                    _sys.modules["bitsandbytes"] = stand_in
                    raise
                stand_in.__dict__.update(real.__dict__)  # holders of the stand-in see the package from now on
        return getattr(_importlib.import_module("bitsandbytes"), name)

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    _sys.modules["bitsandbytes"] = stand_in


_load_bitsandbytes_on_first_use()
