"""WD tagger pre-processing, the reference (PIL) way.

1. alpha composited onto white (any mode goes through RGBA, as the reference does);
2. padded to a centred square with white: left = (side - w) // 2, top = (side - h) // 2;
3. resized to the model's input size with PIL bicubic (skipped when the square already has that size);
4. kept as uint8 RGB HWC here. Each backend then makes its own layout from the same pixels:
   ONNX takes float32 0–255 BGR NHWC; timm weights take NCHW, (x/255 − 0.5)/0.5, then the channel flip.

The input size is always read from the model (448 for the real WD v3 taggers, 64 for the tiny one).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

WHITE = (255, 255, 255)
MISSING = "image_missing"  # the reason code the cache stage uses for the same fault


def pool_relative(detail: str, path: Path, rel: str, pool: Path) -> str:
    """A reject detail naming the image by its pool-relative path: rejects tables travel between machines,
    and this machine's pool folder means nothing elsewhere."""
    return detail.replace(str(path), rel).replace(f"{pool}/", "")


class ImageError(Exception):
    """An image that cannot be tagged; `reason` is the rejects-table reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def open_image(source: bytes | Path) -> Image.Image:
    """Decode fully (so truncation is found here, not later); typed ImageError on failure."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
        img.load()
        return img
    except FileNotFoundError as exc:
        raise ImageError(MISSING, f"{source} does not exist") from exc
    except Image.DecompressionBombError as exc:  # > 2x PIL's pixel limit: refuse, do not exhaust memory
        raise ImageError("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("undecodable_image", str(exc)) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation and bad streams as OSError
        reason = "truncated_image" if "truncated" in str(exc).lower() else "undecodable_image"
        raise ImageError(reason, str(exc)) from exc


def composite_white(img: Image.Image) -> Image.Image:
    """Any mode -> RGB with transparency composited onto white (reference: via RGBA)."""
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(side, left, top) of the centred white square around a width x height image."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def pad_square(img: Image.Image) -> Image.Image:
    side, left, top = pad_offsets(*img.size)
    if img.size == (side, side):
        return img
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(img, (left, top))
    return canvas


def preprocess_pil(img: Image.Image, size: int) -> np.ndarray:
    """Decoded image -> uint8 RGB [size, size, 3], the reference way."""
    square = pad_square(composite_white(img))
    if square.size != (size, size):
        square = square.resize((size, size), Image.BICUBIC)
    return np.array(square, dtype=np.uint8)  # writable (torch.from_numpy shares it)


def load_and_preprocess(source: bytes | Path, size: int) -> np.ndarray:
    return preprocess_pil(open_image(source), size)


def to_onnx_input(batch_rgb: np.ndarray) -> np.ndarray:
    """uint8/float RGB NHWC -> float32 0–255 BGR NHWC (the WD ONNX input)."""
    return np.ascontiguousarray(batch_rgb[..., ::-1], dtype=np.float32)


def to_timm_input(batch_rgb_nchw, dtype=None):
    """torch RGB NCHW 0–255 -> normalised (mean = std = 0.5) BGR NCHW (the WD timm input)."""
    x = batch_rgb_nchw.float() * (1.0 / 127.5) - 1.0
    x = x.flip(1)  # RGB -> BGR
    return x if dtype is None else x.to(dtype)
