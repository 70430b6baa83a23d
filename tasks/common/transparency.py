"""Transparent pictures flattened onto white, the way every stage sees them (cache, dedup, report thumbnails)."""
from __future__ import annotations

from PIL import Image

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def on_white(img: Image.Image) -> Image.Image:
    """`img` with its transparency (an alpha band, or a palette's transparent index) composited onto white, as
    RGBA; an image without transparency is returned as it is (callers convert to the mode they need)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode not in ALPHA_MODES:
        return img
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba)
