"""Image -> the bucket stage's crop, as VAE input pixels in [-1, 1].

Geometry is the bucket contract's: resize the whole image to (resize_w, resize_h) (cover), crop the
box, flip when asked. Two implementations of the same operation:
- PIL on the CPU (bicubic with antialias), the reference and the CPU default;
- torch: JPEG decoded by torchvision (nvJPEG, batched, when the device is CUDA; libjpeg-turbo on the
  CPU), bicubic antialiased resize and crop on the device. Same function on CPU and GPU, so its logic
  is tested here; it agrees with the PIL path to about 1/255 (tests/cache/test_images.py).
Transparent images are composited onto white (what a viewer shows on Danbooru).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from tasks.common.transparency import on_white

JPEG_MAGIC = b"\xff\xd8\xff"


class ImageError(Exception):
    """A bad image: becomes a rejects row with `reason`, the stage goes on."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Geometry:
    width: int  # source size the bucket stage saw
    height: int
    resize_w: int
    resize_h: int
    box: tuple[int, int, int, int]  # left, top, right, bottom in the resized image
    flip: bool = False

    @property
    def out_size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageError("image_missing", f"{path} does not exist") from exc
    except OSError as exc:
        raise ImageError("image_unreadable", f"{path}: {exc}") from exc


def open_rgb(data: bytes, where: str = "") -> Image.Image:
    """Fully decode to RGB; alpha (RGBA, LA, palette transparency) composited onto white."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError("decode_error", f"{where}: {exc}") from exc
    img = on_white(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def _check_size(width: int, height: int, geo: Geometry, where: str) -> None:
    if (width, height) != (geo.width, geo.height):
        raise ImageError("size_mismatch", f"{where}: decoded {width}x{height}, bucket table says "
                         f"{geo.width}x{geo.height}")


def crop_pil(img: Image.Image, geo: Geometry, where: str = "") -> np.ndarray:
    """uint8 [h, w, 3] of the bucket crop (PIL bicubic, antialiased when downscaling)."""
    _check_size(img.width, img.height, geo, where)
    if img.size != (geo.resize_w, geo.resize_h):
        img = img.resize((geo.resize_w, geo.resize_h), Image.Resampling.BICUBIC)
    img = img.crop(geo.box)
    if geo.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img)


def load_pil(path: str | Path, geo: Geometry) -> np.ndarray:
    return crop_pil(open_rgb(read_bytes(path), str(path)), geo, str(path))


def uint8_to_pixels(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[B, h, w, 3] uint8 -> [B, 3, h, w] float32 in [-1, 1]."""
    t = torch.from_numpy(np.require(batch, requirements=["C", "W"])) if isinstance(batch, np.ndarray) else batch
    return t.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def crop_tensor(img: torch.Tensor, geo: Geometry, where: str = "") -> torch.Tensor:
    """[3, H, W] uint8 on any device -> [3, h, w] float32 in [-1, 1] of the bucket crop."""
    _check_size(img.shape[-1], img.shape[-2], geo, where)
    x = img[None].float()
    if (img.shape[-1], img.shape[-2]) != (geo.resize_w, geo.resize_h):
        x = F.interpolate(x, size=(geo.resize_h, geo.resize_w), mode="bicubic", antialias=True,
                          align_corners=False)
    left, top, right, bottom = geo.box
    x = x[..., top:bottom, left:right]
    if geo.flip:
        x = x.flip(-1)
    return x[0].clamp_(0, 255).div_(127.5).sub_(1.0)


def prepare(path: str | Path, cpu_jpeg: bool = False) -> bytes | np.ndarray | torch.Tensor:
    """CPU half of the torch path (runs in worker threads): JPEG bytes as read (the device decodes
    them), or with `cpu_jpeg` a [3, H, W] uint8 tensor decoded here by libjpeg-turbo; anything else
    decoded by PIL to uint8 [H, W, 3]."""
    data = read_bytes(path)
    if data[:3] != JPEG_MAGIC:
        return np.asarray(open_rgb(data, str(path)))
    if not cpu_jpeg:
        return data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return data  # let decode_tensors fall back to PIL (and reject if that fails too)


def decode_tensors(items: Sequence[bytes | np.ndarray | torch.Tensor], device: torch.device,
                   wheres: Sequence[str]) -> list:
    """[3, H, W] uint8 tensors on device from `prepare` outputs; an ImageError in place of a bad image.

    JPEGs go through torchvision's decoder in one batched call (nvJPEG on CUDA, libjpeg-turbo on the
    CPU); a JPEG it refuses (CMYK, unusual sampling) goes through PIL instead.
    """
    with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (for torchcodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_tensors(items, device, wheres)


def _decode_tensors(items: Sequence, device: torch.device, wheres: Sequence[str]) -> list:
    from tasks.common.nvjpeg import decode_jpegs

    out: list = [None] * len(items)
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):  # decoded on the CPU already
            out[i] = item.to(device, non_blocking=True)
    jpeg = [i for i, it in enumerate(items) if isinstance(it, (bytes, bytearray))]
    if jpeg:
        inputs = [torch.frombuffer(bytearray(items[i]), dtype=torch.uint8) for i in jpeg]
        try:
            for i, img in zip(jpeg, decode_jpegs(inputs, device)):
                out[i] = img
        except RuntimeError:
            for i, data in zip(jpeg, inputs):  # find the bad one(s); the rest stay on the fast decoder
                try:
                    out[i] = decode_jpegs(data, device)
                except RuntimeError:
                    pass
    for i, item in enumerate(items):
        if out[i] is not None:
            continue
        try:
            arr = item if isinstance(item, np.ndarray) else np.asarray(open_rgb(item, wheres[i]))
            out[i] = torch.from_numpy(np.require(arr, requirements=["C", "W"])).permute(2, 0, 1).to(device)
        except ImageError as exc:
            out[i] = exc
    return out
