"""Issue 16: compiled graphs kept under runtime.cache_dir (keyed), and one graph for every bucket shape."""
from __future__ import annotations

import os

import pytest
import torch

from tasks.train.compile_cache import (
    CACHE_SUBDIR,
    DYNAMIC_HW_ATTR,
    KEY_FILE,
    compile_cache_key,
    configure_dynamic_shapes,
    environment_identity,
    model_identity,
    use_compile_cache,
)


@pytest.fixture
def restore_compile_state(monkeypatch):
    """What these tests switch process-wide goes back afterwards (env, duck sizing, inductor's stride patch)."""
    import torch._inductor.ir as ir
    import torch.fx.experimental._config as fx_config

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ir, "get_stride_order", ir.get_stride_order)
    duck = fx_config.use_duck_shape  # torch config modules: monkeypatch's undo would delete (hide) the key
    yield
    fx_config.use_duck_shape = duck
    torch._dynamo.reset()


def _tiny_unet(model_cache):
    from tasks.models.load import load_sd15
    from tasks.models.sources import resolve_model_source

    comps = load_sd15(resolve_model_source("builtin:tiny-sd15", model_cache), ("unet", "text_encoder"))
    return comps.unet, comps.text_encoder


def test_key_changes_with_model_options_torch_and_gpu():
    env = {"torch": "2.11.0", "cuda": "13.0", "gpu": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}
    model = {"class": "UNet2DConditionModel", "arch": {"block_out_channels": [320, 640, 1280, 1280]},
             "dtypes": ["torch.float32"]}
    opts = {"mode": "reduce-overhead", "strategy": "dynamic"}
    key = compile_cache_key(model, opts, env)
    assert key == compile_cache_key(dict(model), dict(opts), dict(env))  # stable
    assert len(key) == 20 and all(c in "0123456789abcdef" for c in key)
    others = [compile_cache_key({**model, "arch": {"block_out_channels": [32, 64, 64]}}, opts, env),
              compile_cache_key({**model, "dtypes": ["torch.bfloat16"]}, opts, env),
              compile_cache_key(model, {**opts, "strategy": "static"}, env),
              compile_cache_key(model, opts, {**env, "torch": "2.12.0"}),
              compile_cache_key(model, opts, {**env, "gpu": "NVIDIA H200", "capability": [9, 0]}),
              compile_cache_key(model, opts, {**env, "capability": [8, 9]})]
    assert len({key, *others}) == 1 + len(others)


def test_environment_and_model_identity_on_cpu():
    ident = environment_identity(torch.device("cpu"))
    assert ident["torch"] == torch.__version__ and ident["gpu"] == "cpu"
    lin = torch.nn.Linear(3, 2)
    assert model_identity(lin) == {"class": "Linear", "arch": [["weight", [2, 3]], ["bias", [2]]],
                                   "dtypes": ["torch.float32"]}


def test_use_compile_cache_points_inductor_and_triton_under_the_cache_dir(tmp_path, restore_compile_state):
    folder = use_compile_cache(tmp_path / "cache", "abc123", {"what": "test"})
    assert folder == (tmp_path / "cache" / CACHE_SUBDIR / "abc123").resolve() and folder.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(folder)  # what inductor itself will use
    assert '"what": "test"' in (folder / KEY_FILE).read_text()


def test_prepare_unet_keys_the_cache_by_model_and_shapes(tmp_path, model_cache, restore_compile_state):
    from tasks.train.engine import prepare_unet

    unet, _ = _tiny_unet(model_cache)
    prepare_unet(unet, compile=True, compile_strategy="static", compile_cache_dir=tmp_path, compile_backend="eager")
    static_dir = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert getattr(unet, DYNAMIC_HW_ATTR) is False
    prepare_unet(unet, compile=True, compile_strategy="dynamic", compile_cache_dir=tmp_path, compile_backend="eager")
    dynamic_dir = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert getattr(unet, DYNAMIC_HW_ATTR) is True
    root = (tmp_path / CACHE_SUBDIR).resolve()
    assert os.path.dirname(static_dir) == str(root) == os.path.dirname(dynamic_dir) and static_dir != dynamic_dir
    other = torch.nn.Linear(4, 4)
    prepare_unet(other, compile=True, compile_cache_dir=tmp_path, compile_backend="eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] not in (static_dir, dynamic_dir)  # another model, another key


def test_prepare_unet_without_compile_marks_nothing_and_rejects_unknown_shapes(restore_compile_state):
    from data_contracts.errors import ConfigError
    from tasks.train.engine import prepare_unet

    lin = torch.nn.Linear(2, 2)
    prepare_unet(lin, compile=False, compile_strategy="dynamic")
    assert getattr(lin, DYNAMIC_HW_ATTR) is False and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    with pytest.raises(ConfigError, match="compile_strategy"):
        prepare_unet(lin, compile=True, compile_strategy="symbolic")


def test_symbolic_stride_order_is_decided_with_the_shape_environment(restore_compile_state):
    """pytorch/pytorch#185510: a saved view with strides [32*h*w, 1, 32, 4] made inductor's stride sort ask
    sympy whether 32*h*w < 4 (undecidable without the shape environment, which knows h, w >= 2)."""
    import torch._inductor.ir as ir
    from torch._dynamo.source import ConstantSource
    from torch._inductor.virtualized import V
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    h = env.create_symbol(64, ConstantSource("h"), dynamic_dim=DimDynamic.DYNAMIC)
    w = env.create_symbol(48, ConstantSource("w"), dynamic_dim=DimDynamic.DYNAMIC)

    class Graph:
        class sizevars:
            shape_env = env

    strides = [32 * h * w, 1, 32, 4]
    configure_dynamic_shapes()
    with V.set_graph_handler(Graph()):
        assert list(ir.get_stride_order(strides)) == [3, 0, 2, 1]
    assert list(ir.get_stride_order([8, 1, 4, 2])) == [3, 0, 2, 1]  # plain ints: unchanged path


def _train(model_cache, strategy: str | None, steps: list[tuple[int, int]]) -> tuple[list[float], list[int]]:
    """Losses of a few optimiser steps of the tiny UNet through the Engine, eager (None) or compiled with
    the aot_eager backend (the same dynamo + AOTAutograd tracing as the GPU path, no code generation)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch._dynamo.utils import counters

    from tasks.diffusion.objectives import Objective
    from tasks.models.text_encode import pack_batch
    from tasks.train.batches import StepBatch
    from tasks.train.engine import Engine, make_optimizer, prepare_unet

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    unet, te = _tiny_unet(model_cache)
    prepare_unet(unet, compile=strategy is not None, compile_strategy=strategy or "static",
                 compile_backend="aot_eager")
    te.requires_grad_(False).eval()
    opt = make_optimizer([{"params": list(unet.parameters())}], kind="adamw", lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    obj = Objective("flow", shift=2.0)
    engine = Engine(acc, unet, opt, sched, obj, grad_accum=2, max_grad_norm=1.0, text_encoder=te)
    assert engine.dynamic_hw is (strategy == "dynamic")
    g = torch.Generator().manual_seed(0)
    losses, graphs = [], []
    for lh, lw in steps:
        b = StepBatch(ids=[1, 2], bucket=(lw * 8, lh * 8), x0=torch.randn(2, 4, lh, lw, generator=g),
                      noise=torch.randn(2, 4, lh, lw, generator=g), levels=obj.levels([0.3, 0.6], [0, 0]),
                      token_ids=pack_batch([[320, 1125], [539]], 3), weight=torch.ones(2))
        engine.micro_step(b)
        graphs.append(counters["stats"].get("unique_graphs", 0))
        if engine.window_full:
            out = engine.optimizer_step()
            assert out.applied
            losses.append(out.loss)
    return losses, graphs


# Four latent shapes, a square first (as 512x512 often is); eager losses computed once for both strategies.
STEPS = [(8, 8), (8, 16), (16, 8), (8, 8)]
_EAGER: dict[str, list[float]] = {}


def _eager_losses(model_cache) -> list[float]:
    if "losses" not in _EAGER:
        _EAGER["losses"], _ = _train(model_cache, None, STEPS)
    return _EAGER["losses"]


def test_dynamic_shapes_train_every_bucket_with_one_graph_and_the_eager_loss(model_cache, restore_compile_state):
    """One whole-UNet graph with H/W symbolic for every shape (static compiles one per shape), the same
    losses as eager."""
    eager = _eager_losses(model_cache)
    dynamic, dynamic_graphs = _train(model_cache, "dynamic", STEPS)
    assert dynamic_graphs == [1] * len(STEPS)
    assert len(eager) == 2 and all(torch.isfinite(torch.tensor(eager)))
    assert dynamic == pytest.approx(eager, rel=1e-4, abs=1e-6)


def test_regional_compile_serves_every_bucket_with_the_first_shapes_graphs(model_cache, restore_compile_state):
    """Regional: each ResNet / transformer block compiled alone, H/W symbolic. All graphs exist after the first
    shape (one per block class and width), no shape adds one, and training matches eager."""
    eager = _eager_losses(model_cache)
    regional, graphs = _train(model_cache, "regional", STEPS)
    assert 1 < graphs[0] == graphs[-1]  # several block graphs, none added by the later shapes
    assert regional == pytest.approx(eager, rel=1e-4, abs=1e-6)


def test_regional_blocks_run_eagerly_without_grad(model_cache, restore_compile_state):
    """Sampling and validation run under no_grad at their own batch sizes: the compiled blocks must not
    compile (or record CUDA graphs) for them, as a whole-UNet compile's unet.forward does not."""
    from torch._dynamo.utils import counters

    from tasks.train.engine import prepare_unet

    torch._dynamo.reset()
    counters.clear()
    unet, _ = _tiny_unet(model_cache)
    prepare_unet(unet, compile=True, compile_strategy="regional", compile_backend="aot_eager")
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 77, 64)
    with torch.no_grad():
        out = unet.forward(x, torch.full((3,), 500.0), encoder_hidden_states=ctx).sample
    assert out.shape == x.shape and counters["stats"].get("unique_graphs", 0) == 0
    unet(x, torch.full((3,), 500.0), encoder_hidden_states=ctx).sample.sum().backward()
    assert counters["stats"].get("unique_graphs", 0) > 0  # with grad: the compiled blocks


def test_compile_keys_are_execution_only():
    """Changing how the graphs are compiled or cached resumes the same training output."""
    from pipeline_config.load import load_config, section_dict

    base = load_config("demo")
    other = load_config("demo", ["train.compile_strategy=regional", "train.compile_cache=false"])
    assert other.train.compile_strategy == "regional" and other.train.compile_cache is False
    assert section_dict(base, "train") == section_dict(other, "train")
    assert "compile_strategy" not in section_dict(base, "train")


def test_auto_strategy_is_regional_on_one_process_and_static_under_ddp():
    from pipeline_config.load import load_config
    from tasks.train.engine import resolve_compile_strategy

    assert resolve_compile_strategy("auto", ddp=False) == "regional"
    assert resolve_compile_strategy("auto", ddp=True) == "static"
    assert resolve_compile_strategy("static", ddp=False) == "static"  # an explicit choice is kept
    assert load_config("demo", []).train.compile_strategy == "auto"
