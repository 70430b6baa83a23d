"""Contact sheets: images in rows, optional caption strip under each cell."""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

_BG = (255, 255, 255)
_FG = (20, 20, 20)


def _wrap(text: str, width_chars: int, max_lines: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + (1 if cur else 0) > width_chars and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width_chars - 1)] + "…"
    return lines


def make_grid(images: Sequence[Image.Image], cols: int | None = None, labels: Sequence[str] | None = None,
              pad: int = 4, label_lines: int = 2) -> Image.Image:
    """A grid of ``images`` (cell = the largest image), ``cols`` per row (default: about square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    n = len(images)
    cols = max(1, min(n, cols or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    cw = max(im.width for im in images)
    ch = max(im.height for im in images)
    font = ImageFont.load_default()
    line_h = 12
    strip = (label_lines * line_h + 4) if labels else 0
    grid = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * (ch + strip) + (rows + 1) * pad), _BG)
    draw = ImageDraw.Draw(grid)
    chars = max(4, cw // 6)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x = pad + c * (cw + pad)
        y = pad + r * (ch + strip + pad)
        grid.paste(im.convert("RGB"), (x + (cw - im.width) // 2, y + (ch - im.height) // 2))
        if labels:
            for j, line in enumerate(_wrap(labels[i], chars, label_lines)):
                draw.text((x + 2, y + ch + 2 + j * line_h), line, fill=_FG, font=font)
    return grid
