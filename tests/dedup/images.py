"""Pictures with structure for dedup tests and bench/bench_dedup.py: mini-booru scenes and their edits.

`scene_image(seed, w, h)` renders a random mini-booru picture (character, series background, artist
style, composition all drawn from the seed); `sibling_image` renders a *different* picture of the same
character, series, artist and composition (another seed: other pose jitter, expression, background
details) -- the hardest kind of distinct image, closer than two random Danbooru posts usually are.
`EDITS` are the near-duplicate edits a booru sees (re-encodes, resizes, small crops, colour variants), each
with the file format it is uploaded in; `edited_file` makes those bytes.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from minibooru.generate import ARTISTS, CHARACTERS, SERIES
from minibooru.render import Figure, Scene, render_scene
from PIL import Image

COMPOSITIONS = ("portrait", "upper_body", "cowboy_shot", "full_body")
BACKGROUNDS = ("white", "grey", "colour", "gradient")


def _scene(rng: np.random.Generator, w: int, h: int, seed: int, base: dict | None = None) -> tuple[Scene, dict]:
    if base is None:
        char = CHARACTERS[int(rng.integers(len(CHARACTERS)))]
        series = next(s for s in SERIES if s.tag == char.series)
        base = {
            "char": char,
            "series": series,
            "artist": ARTISTS[int(rng.integers(len(ARTISTS)))],
            "composition": COMPOSITIONS[int(rng.integers(len(COMPOSITIONS)))],
            "background": series.background if rng.random() < 0.6 else BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        }
    figure = Figure(base["char"].look, expression=str(rng.choice(["smile", "open_mouth", "closed_mouth"])),
                    blush=bool(rng.random() < 0.3), looking_at_viewer=bool(rng.random() < 0.7))
    scene = Scene(w, h, (figure,), base["background"], base["series"].palette, base["artist"].style,
                  base["composition"], seed=seed)
    return scene, base


def danbooru_size(rng: np.random.Generator, lo: int = 800, hi: int = 2000) -> tuple[int, int]:
    """A Danbooru-like size: long side lo..hi px, mostly portrait."""
    long_side = int(rng.integers(lo, hi + 1))
    ratio = float(rng.choice([2 / 3, 3 / 4, 0.7, 9 / 16, 1.0, 4 / 3, 16 / 9], p=[.25, .2, .15, .1, .12, .1, .08]))
    return (max(16, round(long_side * ratio)), long_side) if ratio <= 1 else (long_side, max(16, round(long_side / ratio)))


def scene_image(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    scene, _ = _scene(rng, w, h, seed)
    return render_scene(scene).convert("RGB")


def sibling_image(seed: int, w: int, h: int, k: int = 1) -> Image.Image:
    """Another picture with everything scene_image(seed) chose but the per-picture randomness."""
    rng = np.random.default_rng(seed)
    _, base = _scene(rng, w, h, seed)
    other = np.random.default_rng(seed + 7919 * k)
    scene, _ = _scene(other, w, h, seed + 7919 * k, base)
    return render_scene(scene).convert("RGB")


# --- edits ------------------------------------------------------------------------------------------------
def resize(img: Image.Image, scale: float) -> Image.Image:
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)


def crop(img: Image.Image, frac: float, edges: str = "r") -> Image.Image:
    """Cut `frac` of the width/height off each named edge (l, r, t, b)."""
    dx, dy = round(img.width * frac), round(img.height * frac)
    box = [dx if "l" in edges else 0, dy if "t" in edges else 0,
           img.width - (dx if "r" in edges else 0), img.height - (dy if "b" in edges else 0)]
    return img.crop(tuple(box))


def hue_shift(img: Image.Image, deg: float, saturation: float = 1.0) -> Image.Image:
    """Rotate hue around the grey axis (YIQ), as a colour-variant upload would."""
    th = math.radians(deg)
    c, s = math.cos(th) * saturation, math.sin(th) * saturation
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    m = np.linalg.inv(to_yiq) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ to_yiq
    return img.convert("RGB", (m[0, 0], m[0, 1], m[0, 2], 0.0, m[1, 0], m[1, 1], m[1, 2], 0.0,
                               m[2, 0], m[2, 1], m[2, 2], 0.0))


def swap_channels(img: Image.Image, order: str = "BRG") -> Image.Image:
    """A recolour that keeps every shape (e.g. the blue-haired version of a red-haired picture)."""
    bands = dict(zip("RGB", img.split()))
    return Image.merge("RGB", [bands[c] for c in order])


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    """The file bytes of `img` as an uploader would save it (JPEG at `quality`, or PNG)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _same(im: Image.Image) -> Image.Image:
    return im


# name -> (edit, file format, JPEG quality): the edited picture as it would be uploaded again. The original
# is a PNG; every edit below is a new file (JPEG unless said otherwise).
EDITS: dict[str, tuple[Callable[[Image.Image], Image.Image], str, int]] = {
    "jpeg_q92": (_same, "JPEG", 92),
    "jpeg_q70": (_same, "JPEG", 70),
    "jpeg_q40": (_same, "JPEG", 40),
    "resize_0.5": (lambda im: resize(im, 0.5), "JPEG", 92),
    "resize_0.35_q80": (lambda im: resize(im, 0.35), "JPEG", 80),
    "resize_0.5_png": (lambda im: resize(im, 0.5), "PNG", 0),
    "crop_2%_right": (lambda im: crop(im, 0.02, "r"), "JPEG", 92),
    "crop_4%_bottom": (lambda im: crop(im, 0.04, "b"), "JPEG", 92),
    "crop_3%_all": (lambda im: crop(im, 0.03, "lrtb"), "JPEG", 92),
    "crop_6%_top": (lambda im: crop(im, 0.06, "t"), "JPEG", 92),
    "hue_+30": (lambda im: hue_shift(im, 30), "JPEG", 92),
    "hue_+90": (lambda im: hue_shift(im, 90), "JPEG", 92),
    "hue_180": (lambda im: hue_shift(im, 180), "JPEG", 92),
    "desaturate_0.3": (lambda im: hue_shift(im, 0, 0.3), "JPEG", 92),
    "channels_BRG": (lambda im: swap_channels(im, "BRG"), "JPEG", 92),
    "crop_3%+resize_0.5_q75": (lambda im: resize(crop(im, 0.03, "r"), 0.5), "JPEG", 75),
}


def edited_file(img: Image.Image, name: str) -> bytes:
    edit, fmt, quality = EDITS[name]
    return encode(edit(img), fmt, quality)
