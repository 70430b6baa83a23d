"""JPEG decode on the GPU (torchvision's nvJPEG wrapper), made safe against nvJPEG's stream-ordering bug.

nvJPEG's hardware engine does not honour the CUDA stream it is given: `nvjpegDecodeBatched` may write
its output buffers before work already queued on that stream has run. The outputs come from PyTorch's
caching allocator, which reuses a block as soon as it is freed on that stream — so the decoder can
overwrite memory that queued kernels (the previous batch's resize) still read, giving wrong pixels or
NaN probabilities with no error (pytorch/vision#9606, meta-pytorch/torchcodec#1634). We met it as 6 NaN
rows in 32,768 when the tag stage ran on two H100s. The cure is a host barrier on the decoding stream
before each decode; the decode threads run on a side stream, so the model's stream keeps running.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg


def decode_jpegs(data: torch.Tensor | Sequence[torch.Tensor], device: str | torch.device
                 ) -> torch.Tensor | list[torch.Tensor]:
    """decode_jpeg(data, RGB, device) with the current stream drained first when the device is CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (for torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data if isinstance(data, torch.Tensor) else list(data), mode=ImageReadMode.RGB,
                           device=dev)
