"""Grids of generated images that explain themselves.

* ``make_grid``: images in rows with a caption under each tile (e.g. seed and shortened prompt), as the
  ``fm sample`` grid and the train sample grids;
* ``labelled_grid``: a matrix with a label per row (e.g. the concept) and per column (e.g. the seed), as the
  eval grid.
Captions are wrapped to the tile width in pixels (danbooru tags have no spaces: a long tag breaks after an
underscore, else anywhere) and end in "…" where they are cut, so no text ever runs into the next tile.
Small images (the demo's 32..64 px) are enlarged by an integer factor with nearest-neighbour sampling:
the tiles become readable and the pixels stay the model's.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from PIL import Image, ImageDraw

from tasks.common.visuals import FONT_SIZE, MUTED, TEXT, ellipsize, font, line_height, text_width, wrap

MIN_CELL = 128      # smaller images are enlarged to at least this
MAX_CELL = 256      # labelled_grid thumbnails larger images down to this
_BG = (255, 255, 255)
_EMPTY = (225, 225, 225)
_BREAK_AFTER = re.compile(r"(?<=[_,/\-])")  # where a tag without spaces may break


def caption_font(cell_width: int):
    """Bundled font sized to the tile: 11 px up to 352-px tiles, then growing (a 768-px tile gets 24 px)."""
    return font(max(FONT_SIZE, cell_width // 32))


def wrap_label(text: str, width: int, fnt=None, max_lines: int | None = None) -> list[str]:
    """``text`` in lines no wider than ``width`` px: breaks at spaces, then after ``_ , / -`` inside a long
    tag, then between characters; with ``max_lines``, the last kept line ends in "…" when text was cut."""
    fnt = fnt or font()
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        for k, piece in enumerate(p for p in _BREAK_AFTER.split(word) if p):
            candidate = current + (" " if current and k == 0 else "") + piece
            if text_width(candidate, fnt) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            *full, current = wrap(piece, width, fnt)  # a piece wider than a line: break by characters
            lines += full
    if current or not lines:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = ellipsize(lines[-1] + "…", width, fnt)
    return lines


def _paragraph_lines(label: str, width: int, fnt, max_lines: int) -> list[tuple[str, tuple[int, int, int]]]:
    """Lines of a label whose paragraphs are separated by newlines: the first in TEXT, the rest MUTED."""
    out: list[tuple[str, tuple[int, int, int]]] = []
    for k, para in enumerate(label.split("\n")):
        out += [(line, TEXT if k == 0 else MUTED) for line in wrap_label(para, width, fnt)]
    if len(out) > max_lines:
        text, color = out[max_lines - 1]
        out = out[:max_lines - 1] + [(ellipsize(text + "…", width, fnt), color)]
    return out


def enlarge(im: Image.Image, min_side: int) -> Image.Image:
    """``im`` scaled up by the smallest integer factor that makes its longer side >= min_side (nearest)."""
    factor = max(1, math.ceil(min_side / max(im.width, im.height, 1)))
    return im if factor == 1 else im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)


def make_grid(images: Sequence[Image.Image], cols: int | None = None, labels: Sequence[str] | None = None,
              pad: int = 4, label_lines: int = 2, *, min_cell: int = MIN_CELL) -> Image.Image:
    """A grid of ``images`` (cell = the largest image, enlarged to ``min_cell``), ``cols`` per row (default:
    about square). ``labels``: one caption per image, wrapped into ``label_lines`` lines under it; a newline
    starts a second, grey paragraph (e.g. "seed 3\\n1girl, solo, …")."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    n = len(images)
    cols = max(1, min(n, cols or math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    factor = max(1, math.ceil(min_cell / max(max(im.width, im.height) for im in images)))
    tiles = [im.convert("RGB") if factor == 1 else
             im.convert("RGB").resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
             for im in images]
    cw = max(t.width for t in tiles)
    ch = max(t.height for t in tiles)
    fnt = caption_font(cw)
    lh = line_height(fnt)
    strip = (label_lines * lh + 4) if labels else 0
    grid = Image.new("RGB", (cols * cw + (cols + 1) * pad, rows * (ch + strip) + (rows + 1) * pad), _BG)
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x = pad + c * (cw + pad)
        y = pad + r * (ch + strip + pad)
        grid.paste(tile, (x + (cw - tile.width) // 2, y + (ch - tile.height) // 2))
        if labels:
            for j, (line, color) in enumerate(_paragraph_lines(labels[i], cw - 4, fnt, label_lines)):
                draw.text((x + 2, y + ch + 2 + j * lh), line, fill=color, font=fnt)
    return grid


def _fit_cell(im: Image.Image, cell: int) -> Image.Image:
    """``im`` centred in a cell x cell square: enlarged (nearest, integer) when small, else shrunk."""
    im = enlarge(im.convert("RGB"), cell)
    if max(im.size) > cell:
        im = im.copy()
        im.thumbnail((cell, cell), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (cell, cell), _BG)
    out.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return out


def labelled_grid(rows: Sequence[Sequence[Image.Image | None]], row_labels: Sequence[str],
                  col_labels: Sequence[str], *, title: str = "", min_cell: int = MIN_CELL,
                  max_cell: int = MAX_CELL, pad: int = 4) -> Image.Image:
    """A matrix of images with a wrapped label left of each row and a label above each column.

    Cells are square: the largest image side clamped to [min_cell, max_cell]. A None image (or a short
    row) leaves a grey cell. Row labels may hold newlines: later paragraphs are drawn grey."""
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    present = [im for row in rows for im in row if im is not None]
    if not present:
        raise ValueError("labelled_grid needs at least one image")
    ncols = max(len(col_labels), max(len(r) for r in rows))
    cell = min(max_cell, max(min_cell, max(max(im.size) for im in present)))
    fnt = font()
    lh = line_height(fnt)
    label_w = max(MIN_CELL, cell)  # room for ~20 characters a line
    width = 2 * pad + label_w + ncols * (cell + pad)
    title_lines = wrap_label(title, width - 2 * pad, fnt, 3) if title else []
    head_h = len(title_lines) * lh + (pad if title_lines else 0)
    col_h = 2 * lh + pad  # column labels: up to two lines
    top = pad + head_h + col_h
    sheet = Image.new("RGB", (width, top + len(rows) * (cell + pad)), _BG)
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(title_lines):
        draw.text((pad, pad + j * lh), line, fill=TEXT, font=fnt)
    for c, label in enumerate(col_labels):
        x = pad + label_w + pad + c * (cell + pad)
        for j, line in enumerate(wrap_label(label, cell - 4, fnt, 2)):
            draw.text((x + 2, pad + head_h + j * lh), line, fill=TEXT, font=fnt)
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + r * (cell + pad)
        for j, (line, color) in enumerate(_paragraph_lines(label, label_w - 4, fnt, max(1, cell // lh))):
            draw.text((pad, y + j * lh), line, fill=color, font=fnt)
        for c in range(ncols):
            x = pad + label_w + pad + c * (cell + pad)
            im = row[c] if c < len(row) else None
            if im is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_EMPTY)
            else:
                sheet.paste(_fit_cell(im, cell), (x, y))
    return sheet
