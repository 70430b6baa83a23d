"""Two tagger backends with the same contract: uint8 RGB images in, float32 probabilities [N, C] out.

- onnx: ONNX Runtime session on model.onnx (CUDA provider only when torch sees a GPU and the provider
  exists, else CPU). Input/output names, input size and output size are read from the session; the
  batch dimension is used as dynamic when the graph says so, else the batch is cut to the fixed size.
- torch: timm model built from config.json + model.safetensors; NCHW, normalised mean = std = 0.5, RGB->BGR
  flip, sigmoid. bf16 weights on GPU, fp32 on CPU; optional torch.compile (static shapes: the last, short
  batch is padded to the compiled batch size).

Both check that the model's output size equals the label file's rows (ConfigError naming both numbers).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from data_contracts.errors import ConfigError
from tasks.tag.fast_swin import fuse_window_attention
from tasks.tag.model import TaggerFolder
from tasks.tag.preprocess import to_onnx_input, to_timm_input
from tasks.tag.timm_model import create_timm_model, head_size, load_timm_weights

log = logging.getLogger("booruflow.tag")


class Backend(Protocol):
    name: str
    device: str
    input_size: int
    n_outputs: int
    weights_path: Path

    def predict(self, batch_rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB [N, S, S, 3] -> float32 probabilities [N, C]."""
        ...


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("tag.device is cuda but torch sees no GPU; set tag.device to auto or cpu")
    return device


class OnnxBackend:
    name = "onnx"

    def __init__(self, folder: TaggerFolder, device: str = "auto", threads: int = 0) -> None:
        import onnxruntime as ort

        if folder.onnx_path is None:
            raise ConfigError(f"tag.backend onnx: {folder.path} has no model.onnx; use tag.backend torch or auto")
        self.weights_path = folder.onnx_path
        want_cuda = resolve_device(device) == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder.onnx_path), sess_options=opts, providers=providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        if len(inp.shape) != 4 or inp.shape[3] != 3:
            raise ConfigError(f"{folder.onnx_path}: input {inp.name} has shape {inp.shape}; expected [N, S, S, 3] "
                              "(the WD NHWC layout)")
        size = inp.shape[1] if isinstance(inp.shape[1], int) else folder.config_input_size
        if size is None:
            raise ConfigError(f"{folder.onnx_path}: the input size is symbolic and there is no config.json img_size")
        self.input_size = int(size)
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        n_out = out.shape[-1] if isinstance(out.shape[-1], int) else None
        if n_out is None:  # symbolic: ask the graph once
            n_out = self._run(np.full((1, self.input_size, self.input_size, 3), 255, np.uint8)).shape[-1]
        self.n_outputs = int(n_out)
        folder.labels.check_output_size(self.n_outputs, f"{folder.onnx_path.name} ({self.output_name})")

    def _run(self, batch_rgb: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: to_onnx_input(batch_rgb)})[0]

    def predict(self, batch_rgb: np.ndarray) -> np.ndarray:
        if len(batch_rgb) == 0:
            return np.zeros((0, self.n_outputs), np.float32)
        step = self.fixed_batch or len(batch_rgb)
        parts = []
        for start in range(0, len(batch_rgb), step):
            chunk = batch_rgb[start:start + step]
            short = step - len(chunk) if self.fixed_batch else 0
            if short:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
            parts.append(self._run(chunk)[: step - short])
        return np.concatenate(parts).astype(np.float32, copy=False)


class TorchBackend:
    name = "torch"

    def __init__(self, folder: TaggerFolder, device: str = "auto", compile: bool = False,
                 fused_attention: bool = True, dtype: torch.dtype | None = None) -> None:
        if folder.weights_path is None or folder.config is None:
            raise ConfigError(f"tag.backend torch: {folder.path} has no model.safetensors + config.json; "
                              "use tag.backend onnx or auto")
        self.weights_path = folder.weights_path
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device == "cuda" else torch.float32)
        model = create_timm_model(folder.config, where=str(folder.path / "config.json"))
        load_timm_weights(model, folder.weights_path)
        self.n_outputs = head_size(model)
        folder.labels.check_output_size(self.n_outputs, f"{folder.weights_path.name} (head)")
        if fused_attention:
            fuse_window_attention(model)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        size = folder.config_input_size
        if size is None:
            raise ConfigError(f"{folder.path / 'config.json'}: no img_size in model_args or pretrained_cfg.input_size")
        self.input_size = int(size)
        self.compiled_batch: int | None = None
        self._forward = self.model
        if compile:
            self._forward = torch.compile(self.model, dynamic=False)

    def normalise(self, x_rgb: torch.Tensor) -> torch.Tensor:
        """RGB NCHW 0–255 -> the model input (normalised BGR in the model dtype)."""
        return to_timm_input(x_rgb, self.dtype)

    @torch.inference_mode()
    def predict_tensor(self, x_rgb: torch.Tensor, normalised: bool = False) -> torch.Tensor:
        """RGB NCHW 0–255 (any float/uint8 dtype, on self.device) -> float32 probabilities on self.device.

        normalised=True: x is already `normalise(x)` (done on the decode stream by the GPU pipeline).
        """
        n = x_rgb.shape[0]
        if self._forward is not self.model:  # compiled: keep one static batch shape
            self.compiled_batch = self.compiled_batch or n
            if n < self.compiled_batch:
                pad = x_rgb[-1:].expand(self.compiled_batch - n, *x_rgb.shape[1:])
                x_rgb = torch.cat([x_rgb, pad])
        logits = self._forward(x_rgb if normalised else self.normalise(x_rgb))
        return torch.sigmoid(logits[:n].float())

    def predict(self, batch_rgb: np.ndarray) -> np.ndarray:
        if len(batch_rgb) == 0:
            return np.zeros((0, self.n_outputs), np.float32)
        x = torch.from_numpy(np.ascontiguousarray(batch_rgb)).to(self.device).permute(0, 3, 1, 2)
        return self.predict_tensor(x).cpu().numpy()


def choose_backend(folder: TaggerFolder, backend: str, device: str) -> str:
    """auto: torch on a GPU when timm weights exist (bf16, GPU pre-processing), else ONNX when present."""
    if backend != "auto":
        return backend
    if resolve_device(device) == "cuda" and folder.weights_path is not None:
        return "torch"
    return "onnx" if folder.onnx_path is not None else "torch"


def load_backend(folder: TaggerFolder, backend: str = "auto", device: str = "auto",
                 compile: bool = False) -> OnnxBackend | TorchBackend:
    kind = choose_backend(folder, backend, device)
    if kind == "onnx":
        return OnnxBackend(folder, device)
    return TorchBackend(folder, device, compile=compile)
