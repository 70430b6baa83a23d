"""Export a timm WD tagger to the WD ONNX layout: float32 0–255 BGR NHWC in, probabilities out.

The graph folds in what the published WD ONNX files expect the caller NOT to do: NHWC -> NCHW,
(x/255 − 0.5)/0.5 and the sigmoid. The input is already BGR, which is what the timm weights take.
Legacy exporter (dynamo=False) at opset 17, batch dimension dynamic.
"""
from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

INPUT_NAME = "input"
OUTPUT_NAME = "output"
OPSET = 17


class OnnxLayout(nn.Module):
    """BGR NHWC 0–255 -> timm model -> sigmoid."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2) * (1.0 / 127.5) - 1.0
        return torch.sigmoid(self.model(x))


def export_onnx(model: nn.Module, path: Path, input_size: int) -> Path:
    """Write model.onnx atomically (temp + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    dummy = torch.full((2, input_size, input_size, 3), 255.0)
    wrapped = OnnxLayout(model.eval()).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes
        torch.onnx.export(
            wrapped, (dummy,), str(tmp),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )
    os.replace(tmp, path)
    return path
