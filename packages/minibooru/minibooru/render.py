"""Procedural anime-style pictures for the mini-booru.

Every picture is drawn from a `Scene`: one or more characters (`Look`: hair colour and cut, eye colour,
outfit shape and colour, accessory), a background (the series' own scene or a simple one) and an artist
`Style` (outline width and colour, flat / gradient / cel shading, posterisation, hue shift, paper grain).
Traits are big, saturated shapes at fixed places relative to the head, so a model can learn a character
from them; a style changes the look of every picture by one artist the same way.

Drawing uses PIL's ImageDraw on an RGBA figure layer plus a few whole-image numpy passes, so a 768 px
picture costs a few tens of milliseconds on one core.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageOps

RGB = tuple[int, int, int]

# Colour words used in tags -> the RGB the renderer paints. Saturated and far apart in hue on purpose.
COLOURS: dict[str, RGB] = {
    "blonde": (250, 214, 80),
    "brown": (134, 84, 48),
    "black": (38, 36, 48),
    "red": (214, 40, 48),
    "blue": (46, 96, 226),
    "pink": (250, 136, 190),
    "purple": (140, 70, 200),
    "green": (50, 170, 80),
    "white": (244, 244, 250),
    "grey": (150, 152, 162),
    "orange": (246, 136, 36),
    "aqua": (60, 214, 220),
    "yellow": (246, 226, 40),
    "navy": (34, 42, 100),
    "silver": (196, 200, 212),
}
SKIN: RGB = (255, 226, 206)
LINE_DARK: RGB = (30, 24, 30)


@dataclass(frozen=True)
class Look:
    """Visual traits of one character (the same in every picture of them)."""

    hair: str  # colour word
    cut: str  # short | medium | long | twintails | ponytail
    eyes: str  # colour word
    outfit: str  # school_uniform | dress | hoodie | armor | kimono | maid | jacket
    outfit_colour: str
    accessory: str  # hair_ribbon | hairband | witch_hat | glasses | hair_flower | cat_ears | headphones | star_hair_ornament | goggles | none
    accessory_colour: str = "red"
    male: bool = False


@dataclass(frozen=True)
class Style:
    """An artist's rendering style."""

    line: float  # outline width per 40 px of head radius; 0 = lineless
    line_rgb: RGB = LINE_DARK
    shading: str = "flat"  # flat | gradient | cel
    posterize_bits: int = 0  # 0 = off, else 2..6
    hue_shift_deg: float = 0.0
    saturation: float = 1.0
    grain: float = 0.0  # std-dev of additive noise (0..255 scale)
    jpeg_quality: int = 90


@dataclass(frozen=True)
class Figure:
    look: Look
    expression: str = "smile"  # smile | open_mouth | closed_mouth
    closed_eyes: bool = False
    blush: bool = False
    looking_at_viewer: bool = True


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    figures: tuple[Figure, ...]
    background: str  # stars | petals | waves | city | forest | classroom | white | grey | colour | gradient | transparent
    palette: tuple[RGB, RGB, RGB]  # the series palette (bg base, bg accent, highlight)
    style: Style
    composition: str = "upper_body"  # portrait | upper_body | cowboy_shot | full_body
    comic_panels: int = 0  # >0: a comic page of that many panels
    greyscale: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)


# ----------------------------------------------------------------------------------------------- backgrounds

def _vertical_gradient(w: int, h: int, top: RGB, bottom: RGB) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    a = np.asarray(top, np.float32)[None, None, :]
    b = np.asarray(bottom, np.float32)[None, None, :]
    col = a + (b - a) * t
    return np.broadcast_to(col, (h, w, 3)).astype(np.uint8)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def draw_background(kind: str, w: int, h: int, palette: tuple[RGB, RGB, RGB], rng: np.random.Generator) -> Image.Image:
    base, accent, hi = palette
    if kind == "transparent":
        return Image.new("RGBA", (w, h), (0, 0, 0, 0))
    if kind == "white":
        return Image.new("RGBA", (w, h), (255, 255, 255, 255))
    if kind == "grey":
        return Image.new("RGBA", (w, h), (196, 196, 200, 255))
    if kind == "colour":
        return Image.new("RGBA", (w, h), _mix(base, (255, 255, 255), 0.35) + (255,))
    if kind == "gradient":
        arr = _vertical_gradient(w, h, _mix(base, (255, 255, 255), 0.6), base)
        return Image.fromarray(arr, "RGB").convert("RGBA")

    # Series scenes: each has its own composition so the series is recognisable from the background alone.
    if kind == "stars":
        img = Image.fromarray(_vertical_gradient(w, h, (10, 12, 40), base), "RGB")
        d = ImageDraw.Draw(img)
        for _ in range(int(w * h / 900) + 8):
            x, y = rng.integers(0, w), rng.integers(0, h)
            s = int(rng.integers(1, 3))
            d.ellipse([x - s, y - s, x + s, y + s], fill=hi)
        for _ in range(3):  # a few big four-point stars
            x, y, s = rng.integers(0, w), rng.integers(0, h // 2 + 1), max(4, min(w, h) // 25)
            d.polygon([(x, y - s), (x + s // 4, y), (x, y + s), (x - s // 4, y)], fill=hi)
            d.polygon([(x - s, y), (x, y + s // 4), (x + s, y), (x, y - s // 4)], fill=hi)
    elif kind == "petals":
        img = Image.fromarray(_vertical_gradient(w, h, (255, 240, 246), base), "RGB")
        d = ImageDraw.Draw(img)
        tx = int(w * (0.08 if rng.random() < 0.5 else 0.85))
        d.rectangle([tx, int(h * 0.25), tx + max(4, w // 14), h], fill=(110, 70, 50))
        for _ in range(int(w * h / 2500) + 10):
            x, y = rng.integers(0, w), rng.integers(0, h)
            s = int(rng.integers(3, max(4, min(w, h) // 40) + 1))
            d.ellipse([x - s, y - s // 2, x + s, y + s // 2], fill=accent)
    elif kind == "waves":
        img = Image.fromarray(_vertical_gradient(w, h, (150, 210, 255), (235, 248, 255)), "RGB")
        d = ImageDraw.Draw(img)
        horizon = int(h * 0.55)
        d.rectangle([0, horizon, w, h], fill=base)
        band = max(3, h // 30)
        for i, y in enumerate(range(horizon + band, h, band * 2)):
            d.rectangle([0, y, w, y + band // 2], fill=accent if i % 2 == 0 else hi)
        cx, cy, r = int(w * 0.8), int(h * 0.15), max(6, min(w, h) // 12)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 250, 220))
    elif kind == "city":
        img = Image.fromarray(_vertical_gradient(w, h, base, accent), "RGB")
        d = ImageDraw.Draw(img)
        x = 0
        while x < w:
            bw = int(rng.integers(max(6, w // 16), max(8, w // 6)))
            bh = int(h * rng.uniform(0.25, 0.7))
            d.rectangle([x, h - bh, x + bw, h], fill=(30, 24, 46))
            for wy in range(h - bh + 6, h - 4, max(6, h // 40)):
                for wx in range(x + 4, x + bw - 4, max(6, w // 40)):
                    if rng.random() < 0.5:
                        d.rectangle([wx, wy, wx + 2, wy + 2], fill=hi)
            x += bw + int(rng.integers(1, max(2, w // 50)))
    elif kind == "forest":
        img = Image.fromarray(_vertical_gradient(w, h, (196, 236, 200), base), "RGB")
        d = ImageDraw.Draw(img)
        for _ in range(10 + w // 60):
            x = int(rng.integers(0, w))
            tw = int(rng.integers(max(8, w // 14), max(10, w // 5)))
            top = int(h * rng.uniform(0.05, 0.45))
            d.polygon([(x, top), (x - tw // 2, h), (x + tw // 2, h)], fill=accent if rng.random() < 0.5 else hi)
    elif kind == "classroom":
        img = Image.new("RGB", (w, h), base)
        d = ImageDraw.Draw(img)
        d.rectangle([int(w * 0.05), int(h * 0.12), int(w * 0.62), int(h * 0.45)], fill=(40, 90, 60),
                    outline=(120, 80, 40), width=max(2, w // 100))  # chalkboard
        wx0 = int(w * 0.7)
        d.rectangle([wx0, int(h * 0.08), int(w * 0.97), int(h * 0.5)], fill=(180, 220, 250))
        d.line([(wx0 + (w - wx0) // 2, int(h * 0.08)), (wx0 + (w - wx0) // 2, int(h * 0.5))], fill=hi, width=max(2, w // 120))
        d.rectangle([0, int(h * 0.75), w, h], fill=accent)  # desks / floor
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img.convert("RGBA")


# -------------------------------------------------------------------------------------------------- figures

def _box(cx: float, cy: float, rx: float, ry: float) -> list[float]:
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def _darker(c: RGB, f: float = 0.7) -> RGB:
    return tuple(int(v * f) for v in c)  # type: ignore[return-value]


def draw_figure(layer: Image.Image, fig: Figure, cx: float, cy: float, r: float, style: Style) -> None:
    """Draw one character with head centre (cx, cy) and head radius r onto an RGBA layer."""
    d = ImageDraw.Draw(layer, "RGBA")
    lk = fig.look
    hair = COLOURS[lk.hair]
    eye = COLOURS[lk.eyes]
    cloth = COLOURS[lk.outfit_colour]
    acc = COLOURS.get(lk.accessory_colour, COLOURS["red"])
    lw = int(round(style.line * r / 40.0))
    line = style.line_rgb if lw > 0 else None
    lw = max(lw, 1) if line else 0

    def ell(box, fill, outline=True):
        d.ellipse(box, fill=fill, outline=line if outline else None, width=lw if outline else 0)

    def poly(pts, fill, outline=True):
        d.polygon(pts, fill=fill, outline=line if outline else None, width=lw if (outline and line) else 1)

    sh_y = cy + 1.3 * r  # shoulder line
    # --- hair behind the body
    if lk.cut == "long":
        d.rounded_rectangle([cx - 1.3 * r, cy - 1.05 * r, cx + 1.3 * r, cy + 4.4 * r], radius=r, fill=hair,
                            outline=line, width=lw)
    elif lk.cut == "medium":
        d.rounded_rectangle([cx - 1.22 * r, cy - 1.05 * r, cx + 1.22 * r, cy + 1.9 * r], radius=0.8 * r, fill=hair,
                            outline=line, width=lw)
    elif lk.cut == "twintails":
        for sx in (-1, 1):
            ell(_box(cx + sx * 1.55 * r, cy + 1.7 * r, 0.55 * r, 2.2 * r), hair)
    elif lk.cut == "ponytail":
        ell(_box(cx + 1.05 * r, cy + 1.3 * r, 0.6 * r, 1.9 * r), hair)
    if lk.outfit == "hoodie":  # hood hanging behind the neck
        ell(_box(cx, sh_y - 0.1 * r, 1.1 * r, 0.55 * r), _darker(cloth, 0.85))

    # --- legs (visible in cowboy shots and full-body pictures)
    waist_y = sh_y + 2.7 * r
    hem_y = waist_y + 1.9 * r
    leg_col = (40, 40, 56) if lk.male else SKIN
    for sx in (-1, 1):
        d.rectangle([cx + sx * 0.55 * r - 0.3 * r, waist_y, cx + sx * 0.55 * r + 0.3 * r, hem_y + 3.2 * r],
                    fill=leg_col, outline=line, width=lw)
        d.rectangle([cx + sx * 0.55 * r - 0.36 * r, hem_y + 3.0 * r, cx + sx * 0.55 * r + 0.36 * r, hem_y + 3.5 * r],
                    fill=(60, 40, 36))  # shoes

    # --- torso, sleeves, skirt
    sw = 1.45 * r  # half shoulder width
    torso = [(cx - sw, sh_y), (cx + sw, sh_y), (cx + 1.0 * r, waist_y), (cx - 1.0 * r, waist_y)]
    body_col = (30, 30, 36) if lk.outfit == "maid" else cloth
    for sx in (-1, 1):  # sleeves / arms
        wide = lk.outfit == "kimono"
        arm = [(cx + sx * sw, sh_y), (cx + sx * (sw + (1.0 if wide else 0.45) * r), sh_y + 2.4 * r),
               (cx + sx * (sw - 0.2 * r), sh_y + 2.5 * r), (cx + sx * (sw - 0.45 * r), sh_y + 0.5 * r)]
        poly(arm, _darker(body_col, 0.9))
        d.ellipse(_box(cx + sx * (sw + (0.55 if wide else 0.15) * r), sh_y + 2.6 * r, 0.25 * r, 0.25 * r), fill=SKIN)
    poly(torso, body_col)
    if lk.outfit in ("dress", "maid", "school_uniform", "kimono") and not lk.male:
        flare = 2.1 if lk.outfit == "dress" else 1.6
        skirt_col = cloth if lk.outfit != "maid" else (30, 30, 36)
        poly([(cx - 1.0 * r, waist_y), (cx + 1.0 * r, waist_y), (cx + flare * r, hem_y), (cx - flare * r, hem_y)], skirt_col)
        if lk.outfit == "school_uniform":  # pleats
            for i in range(-3, 4):
                d.line([(cx + i * 0.28 * r, waist_y), (cx + i * 0.46 * r, hem_y)], fill=_darker(skirt_col, 0.6),
                       width=max(1, int(r / 25)))
        if lk.outfit == "dress":  # frills at the hem
            for i in range(9):
                x = cx - flare * r + (i + 0.5) * (2 * flare * r / 9)
                d.ellipse(_box(x, hem_y, 0.24 * r, 0.15 * r), fill=(255, 255, 255))
    elif lk.male or lk.outfit in ("jacket", "hoodie", "armor"):
        d.rectangle([cx - 1.05 * r, waist_y, cx + 1.05 * r, waist_y + 0.9 * r], fill=(50, 50, 70), outline=line, width=lw)

    # --- outfit details
    if lk.outfit == "school_uniform":
        poly([(cx - sw, sh_y), (cx + sw, sh_y), (cx, sh_y + 1.5 * r)], (255, 255, 255))  # sailor collar
        d.line([(cx - sw * 0.8, sh_y + 0.15 * r), (cx, sh_y + 1.3 * r), (cx + sw * 0.8, sh_y + 0.15 * r)],
               fill=cloth, width=max(2, int(r / 10)))
        poly([(cx - 0.45 * r, sh_y + 1.2 * r), (cx + 0.45 * r, sh_y + 1.2 * r), (cx, sh_y + 2.0 * r)], COLOURS["red"])
    elif lk.outfit == "dress":
        for sx in (-1, 1):  # puffy sleeves
            ell(_box(cx + sx * sw, sh_y + 0.2 * r, 0.55 * r, 0.45 * r), _mix(cloth, (255, 255, 255), 0.25))
        d.rectangle([cx - 1.0 * r, waist_y - 0.25 * r, cx + 1.0 * r, waist_y + 0.05 * r], fill=(255, 255, 255))
    elif lk.outfit == "hoodie":
        d.rounded_rectangle([cx - 0.8 * r, sh_y + 1.6 * r, cx + 0.8 * r, sh_y + 2.5 * r], radius=0.2 * r,
                            fill=_darker(cloth, 0.8), outline=line, width=lw)  # pocket
        for sx in (-1, 1):
            d.line([(cx + sx * 0.3 * r, sh_y), (cx + sx * 0.3 * r, sh_y + 1.2 * r)], fill=(255, 255, 255),
                   width=max(2, int(r / 12)))
    elif lk.outfit == "armor":
        metal = COLOURS["silver"]
        poly([(cx - 1.2 * r, sh_y + 0.3 * r), (cx + 1.2 * r, sh_y + 0.3 * r), (cx + 0.9 * r, sh_y + 2.2 * r),
              (cx, sh_y + 2.6 * r), (cx - 0.9 * r, sh_y + 2.2 * r)], metal)
        for sx in (-1, 1):
            ell(_box(cx + sx * sw, sh_y + 0.15 * r, 0.6 * r, 0.4 * r), metal)
        d.ellipse(_box(cx, sh_y + 1.2 * r, 0.2 * r, 0.2 * r), fill=cloth)
    elif lk.outfit == "kimono":
        white = (255, 255, 255)
        d.line([(cx - 0.8 * r, sh_y), (cx + 0.3 * r, sh_y + 1.9 * r)], fill=white, width=max(2, int(r / 6)))
        d.line([(cx + 0.8 * r, sh_y), (cx - 0.1 * r, sh_y + 1.5 * r)], fill=white, width=max(2, int(r / 6)))
        d.rectangle([cx - 1.08 * r, sh_y + 1.9 * r, cx + 1.08 * r, sh_y + 2.6 * r], fill=COLOURS["yellow"],
                    outline=line, width=lw)  # obi
    elif lk.outfit == "maid":
        white = (255, 255, 255)
        d.rounded_rectangle([cx - 0.75 * r, sh_y + 1.0 * r, cx + 0.75 * r, hem_y - 0.2 * r], radius=0.3 * r, fill=white,
                            outline=line, width=lw)  # apron
        poly([(cx - 0.7 * r, sh_y), (cx + 0.7 * r, sh_y), (cx, sh_y + 0.6 * r)], white)
    elif lk.outfit == "jacket":
        white = (255, 255, 255)
        poly([(cx - 0.5 * r, sh_y), (cx + 0.5 * r, sh_y), (cx + 0.45 * r, waist_y), (cx - 0.45 * r, waist_y)], white)
        poly([(cx - 0.12 * r, sh_y + 0.1 * r), (cx + 0.12 * r, sh_y + 0.1 * r), (cx + 0.16 * r, sh_y + 1.9 * r),
              (cx, sh_y + 2.1 * r), (cx - 0.16 * r, sh_y + 1.9 * r)], COLOURS["red"])  # necktie

    # --- neck and head
    d.rectangle([cx - 0.28 * r, cy + 0.7 * r, cx + 0.28 * r, sh_y + 0.1 * r], fill=SKIN)
    ell([cx - r, cy - r, cx + r, cy + 1.05 * r], SKIN)

    # --- eyes
    ey = cy + 0.18 * r
    look_dx = 0.0 if fig.looking_at_viewer else 0.09 * r
    for sx in (-1, 1):
        ex = cx + sx * 0.42 * r
        if fig.closed_eyes:
            d.arc(_box(ex, ey, 0.22 * r, 0.14 * r), 200, 340, fill=LINE_DARK, width=max(2, int(r / 14)))
            continue
        d.ellipse(_box(ex, ey, 0.2 * r, 0.27 * r), fill=(255, 255, 255))
        d.ellipse(_box(ex + look_dx, ey + 0.03 * r, 0.17 * r, 0.24 * r), fill=eye)
        d.ellipse(_box(ex + look_dx, ey + 0.1 * r, 0.09 * r, 0.12 * r), fill=_darker(eye, 0.45))
        d.ellipse(_box(ex + look_dx - 0.06 * r, ey - 0.06 * r, 0.05 * r, 0.05 * r), fill=(255, 255, 255))
        d.line([(ex - 0.24 * r, ey - 0.25 * r), (ex + 0.24 * r, ey - 0.3 * r)], fill=LINE_DARK, width=max(2, int(r / 12)))
    if fig.blush:
        for sx in (-1, 1):
            d.ellipse(_box(cx + sx * 0.55 * r, cy + 0.5 * r, 0.18 * r, 0.08 * r), fill=(255, 110, 130, 150))
    my = cy + 0.68 * r
    if fig.expression == "smile":
        d.arc(_box(cx, my - 0.08 * r, 0.2 * r, 0.12 * r), 20, 160, fill=(140, 40, 50), width=max(1, int(r / 16)))
    elif fig.expression == "open_mouth":
        d.ellipse(_box(cx, my, 0.12 * r, 0.1 * r), fill=(170, 50, 60))
    else:
        d.line([(cx - 0.1 * r, my), (cx + 0.1 * r, my)], fill=(140, 40, 50), width=max(1, int(r / 18)))

    # --- hair in front: crown + bangs (+ side locks)
    d.chord([cx - 1.1 * r, cy - 1.15 * r, cx + 1.1 * r, cy + 0.5 * r], 180, 360, fill=hair, outline=line, width=lw)
    teeth = 5
    for i in range(teeth):
        x0 = cx - 1.0 * r + i * (2.0 * r / teeth)
        poly([(x0, cy - 0.3 * r), (x0 + 2.0 * r / teeth, cy - 0.3 * r), (x0 + r / teeth, cy - 0.02 * r)], hair,
             outline=False)
    if lk.cut in ("medium", "long"):
        for sx in (-1, 1):
            d.rounded_rectangle([cx + sx * 0.98 * r - 0.2 * r, cy - 0.3 * r, cx + sx * 0.98 * r + 0.2 * r, cy + 1.2 * r],
                                radius=0.15 * r, fill=hair, outline=line, width=lw)

    # --- accessory
    a = lk.accessory
    if a == "hair_ribbon":
        bx, by = cx + 0.75 * r, cy - 0.85 * r
        poly([(bx, by), (bx - 0.55 * r, by - 0.35 * r), (bx - 0.55 * r, by + 0.35 * r)], acc)
        poly([(bx, by), (bx + 0.55 * r, by - 0.35 * r), (bx + 0.55 * r, by + 0.35 * r)], acc)
        d.ellipse(_box(bx, by, 0.12 * r, 0.12 * r), fill=_darker(acc))
        if lk.cut == "twintails":
            bx2 = cx - 0.75 * r
            poly([(bx2, by), (bx2 - 0.55 * r, by - 0.35 * r), (bx2 - 0.55 * r, by + 0.35 * r)], acc)
            poly([(bx2, by), (bx2 + 0.55 * r, by - 0.35 * r), (bx2 + 0.55 * r, by + 0.35 * r)], acc)
    elif a == "hairband":
        d.arc([cx - 1.02 * r, cy - 1.05 * r, cx + 1.02 * r, cy + 0.9 * r], 200, 340, fill=acc, width=max(3, int(r / 5)))
    elif a == "witch_hat":
        ell(_box(cx, cy - 0.85 * r, 1.6 * r, 0.3 * r), acc)
        poly([(cx - 0.8 * r, cy - 0.9 * r), (cx + 0.8 * r, cy - 0.9 * r), (cx + 0.5 * r, cy - 2.6 * r)], acc)
    elif a == "glasses":
        for sx in (-1, 1):
            d.ellipse(_box(cx + sx * 0.42 * r, cy + 0.18 * r, 0.3 * r, 0.3 * r), outline=acc, width=max(2, int(r / 14)))
        d.line([(cx - 0.12 * r, cy + 0.15 * r), (cx + 0.12 * r, cy + 0.15 * r)], fill=acc, width=max(2, int(r / 14)))
    elif a == "hair_flower":
        fx, fy = cx - 0.8 * r, cy - 0.6 * r
        for k in range(5):
            ang = 2 * math.pi * k / 5
            d.ellipse(_box(fx + 0.22 * r * math.cos(ang), fy + 0.22 * r * math.sin(ang), 0.17 * r, 0.17 * r), fill=acc)
        d.ellipse(_box(fx, fy, 0.1 * r, 0.1 * r), fill=COLOURS["yellow"])
    elif a == "cat_ears":
        for sx in (-1, 1):
            ex = cx + sx * 0.62 * r
            poly([(ex - 0.35 * r, cy - 0.7 * r), (ex + 0.35 * r, cy - 0.7 * r), (ex + sx * 0.15 * r, cy - 1.55 * r)], hair)
            poly([(ex - 0.18 * r, cy - 0.78 * r), (ex + 0.18 * r, cy - 0.78 * r), (ex + sx * 0.1 * r, cy - 1.3 * r)],
                 COLOURS["pink"], outline=False)
    elif a == "headphones":
        d.arc([cx - 1.15 * r, cy - 1.25 * r, cx + 1.15 * r, cy + 0.9 * r], 190, 350, fill=acc, width=max(3, int(r / 6)))
        for sx in (-1, 1):
            ell(_box(cx + sx * 1.05 * r, cy + 0.05 * r, 0.25 * r, 0.35 * r), acc)
    elif a == "star_hair_ornament":
        sx0, sy0, s = cx + 0.72 * r, cy - 0.7 * r, 0.32 * r
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = s if k % 2 == 0 else s * 0.45
            pts.append((sx0 + rad * math.cos(ang), sy0 + rad * math.sin(ang)))
        poly(pts, acc)
    elif a == "goggles":
        d.line([(cx - 1.0 * r, cy - 0.75 * r), (cx + 1.0 * r, cy - 0.75 * r)], fill=(60, 60, 60), width=max(3, int(r / 7)))
        for sx in (-1, 1):
            ell(_box(cx + sx * 0.38 * r, cy - 0.78 * r, 0.3 * r, 0.22 * r), acc)


# ------------------------------------------------------------------------------------------ compositions

_COMPOSITION = {  # head radius as a fraction of (box width, box height), head centre y as a fraction of height
    "portrait": (0.30, 0.24, 0.42),
    "upper_body": (0.19, 0.15, 0.30),
    "cowboy_shot": (0.15, 0.10, 0.18),
    "full_body": (0.13, 0.066, 0.12),
}


def _place(composition: str, x0: float, y0: float, bw: float, bh: float, jitter: float) -> tuple[float, float, float]:
    fw, fh, fy = _COMPOSITION[composition]
    r = min(fw * bw, fh * bh)
    return x0 + bw * (0.5 + jitter), y0 + bh * fy + r * 0.1, r


def _style_pass(img: Image.Image, style: Style, rng: np.random.Generator, greyscale: bool) -> Image.Image:
    """Whole-image artist post-processing (posterise, hue/saturation matrix, grain)."""
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    rgb = img.convert("RGB")
    if style.hue_shift_deg or style.saturation != 1.0:
        rgb = rgb.convert("RGB", _hue_sat_matrix(style.hue_shift_deg, style.saturation))
    if style.posterize_bits:
        rgb = ImageOps.posterize(rgb, style.posterize_bits)
    if greyscale:
        rgb = rgb.convert("L").convert("RGB")
    if style.grain > 0:
        arr = np.asarray(rgb, dtype=np.int16)
        noise = rng.normal(0.0, style.grain, size=arr.shape[:2]).astype(np.int16)[:, :, None]
        rgb = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")
    if alpha is not None:
        rgb.putalpha(alpha)
    return rgb


def _hue_sat_matrix(deg: float, sat: float) -> tuple[float, ...]:
    """RGB->RGB matrix rotating hue by `deg` around the grey axis and scaling saturation (YIQ space)."""
    th = math.radians(deg)
    c, s = math.cos(th) * sat, math.sin(th) * sat
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return (m[0, 0], m[0, 1], m[0, 2], 0.0, m[1, 0], m[1, 1], m[1, 2], 0.0, m[2, 0], m[2, 1], m[2, 2], 0.0)


def _shade(layer: Image.Image, style: Style, centres: list[tuple[float, float, float]]) -> Image.Image:
    if style.shading == "flat":
        return layer
    arr = np.asarray(layer).copy()
    h, w = arr.shape[:2]
    if style.shading == "gradient":
        ramp = np.linspace(1.12, 0.78, h, dtype=np.float32)[:, None, None]
        arr[:, :, :3] = np.clip(arr[:, :, :3].astype(np.float32) * ramp, 0, 255).astype(np.uint8)
    elif style.shading == "cel":
        mask = np.zeros((h, w), bool)
        xs = np.arange(w)
        for cx, cy, r in centres:  # hard shadow on the right third of each figure
            cols = (xs > cx + 0.35 * r) & (xs < cx + 3.5 * r)
            top = max(0, int(cy - 1.2 * r))
            mask[top:, cols] = True
        sub = arr[:, :, :3][mask].astype(np.uint16)
        arr[:, :, :3][mask] = (sub * 3 // 4).astype(np.uint8)
    return Image.fromarray(arr, "RGBA")


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene; returns RGBA when the background is transparent, else RGB."""
    rng = np.random.default_rng(scene.seed)
    w, h = scene.width, scene.height
    if scene.comic_panels:
        return _render_comic(scene, rng)
    bg = draw_background(scene.background, w, h, scene.palette, rng)
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    n = len(scene.figures)
    centres = []
    for i, fig in enumerate(scene.figures):
        jitter = float(rng.uniform(-0.08, 0.08)) if n == 1 else 0.0
        cx, cy, r = _place(scene.composition, w * i / n, 0, w / n, h, jitter)
        draw_figure(layer, fig, cx, cy, r, scene.style)
        centres.append((cx, cy, r))
    layer = _shade(layer, scene.style, centres)
    out = Image.alpha_composite(bg, layer)
    out = _style_pass(out, scene.style, rng, scene.greyscale)
    return out if scene.background == "transparent" else out.convert("RGB")


def _render_comic(scene: Scene, rng: np.random.Generator) -> Image.Image:
    w, h = scene.width, scene.height
    page = Image.new("RGBA", (w, h), (255, 255, 255, 255))
    n = scene.comic_panels
    vertical = h >= w
    gap = max(3, min(w, h) // 40)
    d = ImageDraw.Draw(page)
    for i in range(n):
        if vertical:
            x0, y0, pw, ph = gap, gap + i * (h - gap) / n, w - 2 * gap, (h - gap) / n - gap
        else:
            x0, y0, pw, ph = gap + i * (w - gap) / n, gap, (w - gap) / n - gap, h - 2 * gap
        pw_i, ph_i = max(8, int(pw)), max(8, int(ph))
        bg = draw_background(scene.background if scene.background != "transparent" else "white", pw_i, ph_i,
                             scene.palette, rng)
        layer = Image.new("RGBA", (pw_i, ph_i), (0, 0, 0, 0))
        fig = scene.figures[i % len(scene.figures)]
        cx, cy, r = _place("portrait" if i % 2 == 0 else "upper_body", 0, 0, pw_i, ph_i, float(rng.uniform(-0.2, 0.2)))
        draw_figure(layer, fig, cx, cy, r, scene.style)
        panel = Image.alpha_composite(bg, _shade(layer, scene.style, [(cx, cy, r)]))
        pd = ImageDraw.Draw(panel)
        bx, by = int(pw_i * 0.62), int(ph_i * 0.08)  # speech bubble
        pd.ellipse([bx, by, bx + pw_i // 3, by + ph_i // 5], fill=(255, 255, 255), outline=(0, 0, 0), width=max(1, gap // 3))
        page.paste(panel, (int(x0), int(y0)))
        d.rectangle([int(x0), int(y0), int(x0) + pw_i, int(y0) + ph_i], outline=(0, 0, 0), width=max(2, gap // 2))
    out = _style_pass(page, scene.style, rng, scene.greyscale)
    return out.convert("RGB")


def placeholder(width: int, height: int, label_rgb: RGB = (90, 90, 100)) -> Image.Image:
    """A neutral frame (used as the poster of a video/ugoira and for their thumbnails)."""
    img = Image.new("RGB", (width, height), (30, 30, 34))
    d = ImageDraw.Draw(img)
    s = min(width, height) // 4
    cx, cy = width // 2, height // 2
    d.polygon([(cx - s // 2, cy - s), (cx - s // 2, cy + s), (cx + s, cy)], fill=label_rgb)
    return img
