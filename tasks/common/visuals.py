"""Pictures for the Prefect UI: thumbnails, contact sheets with captions, histograms and line plots.

Every stage's `visuals.py` builds on these. Conventions:
- images go to `<out_dir>/visuals/<name>.png` (written atomically) and functions return
  {caption: path relative to out_dir}, ready to merge into `StageReport.images`;
- selection is deterministic: `pick` orders rows by a hash of (seed, id), so the same seed shows
  the same samples, and a growing table mostly keeps the ones already shown;
- sheets stay modest: thumbnails of 128..192 px, at most ~1600 px wide.
Plots use matplotlib's object API with the Agg canvas (no pyplot state, safe in worker threads).
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from data_contracts.store import atomic_write_bytes
from tasks.common.transparency import on_white

VISUALS_DIR = "visuals"
THUMB = 160
MAX_WIDTH = 1600
MIN_WIDTH = 480  # room for the title of a sheet with one or two tiles
TITLE_ROWS = 3
PAD = 6
FONT_SIZE = 11
BACKGROUND = (246, 246, 246)
LETTERBOX = (214, 214, 214)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
GREEN = (20, 120, 40)
RED = (190, 30, 30)
BOX = (255, 0, 170)  # crop boxes: a colour no anime palette hides

Color = tuple[int, int, int]


# --- selection ---------------------------------------------------------------------------------
def _mix64(values: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (value, seed): a fixed pseudo-random order that does not depend on row order."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def pick(ids: Sequence[int] | np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Row indices of k rows chosen by seed (the k smallest hashes of their ids), in that order."""
    arr = np.asarray(ids, dtype=np.int64)
    if k <= 0 or len(arr) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = _mix64(arr.view(np.uint64), seed)
    order = np.lexsort((arr, keys))  # ties (equal ids) broken by id, then stable
    return order[: min(k, len(arr))]


def slug(text: str, max_len: int = 48) -> str:
    """A file-name-safe form of a user-given name, with a short hash so distinct names stay distinct."""
    base = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len] or "x"
    return f"{base}-{hashlib.blake2b(text.encode(), digest_size=3).hexdigest()}"


# --- images ------------------------------------------------------------------------------------
def open_rgb(path: str | Path, draft: tuple[int, int] | None = None) -> Image.Image | None:
    """The image as RGB (alpha composited onto white), or None when missing or undecodable.

    `draft` lets the JPEG decoder scale down by 1/2..1/8 while decoding (much faster for thumbnails).
    """
    try:
        img = Image.open(path)
        if draft and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return on_white(img).convert("RGB")


def fit_size(width: int, height: int, box: int) -> tuple[int, int]:
    """The size of a width x height image scaled to fit a box x box square (aspect kept, >= 1 px)."""
    scale = box / max(width, height, 1)
    return max(1, round(width * scale)), max(1, round(height * scale))


def letterbox(img: Image.Image, size: int | tuple[int, int] = THUMB, fill: Color = LETTERBOX) -> Image.Image:
    """img scaled to fit a size x size square (or a (w, h) box), centred on `fill` (aspect kept)."""
    bw, bh = (size, size) if isinstance(size, int) else size
    scale = min(bw / img.width, bh / img.height)
    target = (max(1, min(bw, round(img.width * scale))), max(1, min(bh, round(img.height * scale))))
    if img.size != target:
        img = img.resize(target, Image.Resampling.BICUBIC)
    if img.size == (bw, bh):
        return img
    out = Image.new("RGB", (bw, bh), fill)
    out.paste(img, ((bw - img.width) // 2, (bh - img.height) // 2))
    return out


def thumbnail(path: str | Path, size: int = THUMB) -> Image.Image | None:
    """A letterboxed size x size thumbnail of an image file, or None when it cannot be read."""
    img = open_rgb(path, draft=(size * 2, size * 2))
    return None if img is None else letterbox(img, size)


def uint8_image(array: np.ndarray) -> Image.Image:
    """[h, w, 3] uint8 (or float in [0, 255]) -> PIL RGB."""
    return Image.fromarray(np.clip(np.asarray(array), 0, 255).astype(np.uint8), "RGB")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape images (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak * peak / mse))


# --- text --------------------------------------------------------------------------------------
_FONTS: dict[int, ImageFont.ImageFont | ImageFont.FreeTypeFont] = {}


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font (no system fonts: the same pixels on every machine)."""
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def line_height(fnt=None) -> int:
    fnt = fnt or font()
    left, top, right, bottom = fnt.getbbox("Ag|_(")
    return bottom - min(top, 0) + 3


def text_width(text: str, fnt=None) -> float:
    return (fnt or font()).getlength(text)


def wrap(text: str, width: int, fnt=None) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are broken by characters."""
    fnt = fnt or font()
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if text_width(candidate, fnt) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while text_width(word, fnt) > width and len(word) > 1:  # hard-break a long tag
            cut = len(word)
            while cut > 1 and text_width(word[:cut], fnt) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines


def ellipsize(text: str, width: int, fnt=None) -> str:
    fnt = fnt or font()
    if text_width(text, fnt) <= width:
        return text
    while text and text_width(text + "…", fnt) > width:
        text = text[:-1]
    return text + "…"


@dataclass
class Line:
    """One caption paragraph, wrapped to the tile width, in one colour."""

    text: str
    color: Color = TEXT


@dataclass
class Tile:
    image: Image.Image | None  # None: a grey "no image" placeholder
    lines: list[Line | str] = field(default_factory=list)


def _caption_rows(lines: Iterable[Line | str], width: int, max_rows: int, fnt) -> list[tuple[str, Color]]:
    rows: list[tuple[str, Color]] = []
    for item in lines:
        line = item if isinstance(item, Line) else Line(item)
        rows += [(text, line.color) for text in wrap(line.text, width, fnt)]
    if len(rows) > max_rows:  # keep the tile height fixed: mark what was cut
        text, color = rows[max_rows - 1]
        rows = rows[: max_rows - 1] + [(ellipsize(text + " …", width, fnt), color)]
    return rows


def contact_sheet(
    tiles: Sequence[Tile],
    title: str = "",
    *,
    thumb: int = THUMB,
    thumb_w: int | None = None,
    caption_rows: int = 2,
    max_width: int = MAX_WIDTH,
) -> Image.Image:
    """A grid of tiles (thumb_w x thumb, default square) with wrapped captions under each, and a
    title bar on top."""
    fnt = font()
    lh = line_height(fnt)
    tw = thumb_w or thumb
    cols = max(1, min(len(tiles) or 1, (max_width - PAD) // (tw + PAD)))
    rows = -(-len(tiles) // cols) if tiles else 0
    cell_h = thumb + caption_rows * lh + PAD
    width = max(MIN_WIDTH, cols * (tw + PAD) + PAD)
    title_lines = _caption_rows([title], width - 2 * PAD, TITLE_ROWS, fnt) if title else []
    title_h = len(title_lines) * lh + 2 * PAD if title else PAD
    height = title_h + rows * (cell_h + PAD) + (PAD if not tiles else 0)
    sheet = Image.new("RGB", (width, max(height, title_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for j, (text, color) in enumerate(title_lines):
        draw.text((PAD, PAD + j * lh), text, fill=color, font=fnt)
    for i, tile in enumerate(tiles):
        x = PAD + (i % cols) * (tw + PAD)
        y = title_h + (i // cols) * (cell_h + PAD)
        if tile.image is None:
            draw.rectangle([x, y, x + tw - 1, y + thumb - 1], fill=LETTERBOX)
            label = "no image"
            draw.text((x + (tw - text_width(label, fnt)) / 2, y + thumb / 2 - lh / 2), label, fill=MUTED, font=fnt)
        else:
            sheet.paste(letterbox(tile.image, (tw, thumb)), (x, y))
        for j, (text, color) in enumerate(_caption_rows(tile.lines, tw, caption_rows, fnt)):
            draw.text((x, y + thumb + 2 + j * lh), text, fill=color, font=fnt)
    return sheet


def side_by_side(images: Sequence[Image.Image], size: int = THUMB, gap: int = 2) -> Image.Image:
    """Several images letterboxed into one strip of size x size cells (e.g. source | decoded)."""
    out = Image.new("RGB", (side_by_side_width(len(images), size, gap), size), BACKGROUND)
    for i, img in enumerate(images):
        out.paste(letterbox(img, size), (i * (size + gap), 0))
    return out


def side_by_side_width(n: int, size: int = THUMB, gap: int = 2) -> int:
    return n * size + (n - 1) * gap


# --- writing -----------------------------------------------------------------------------------
def png_rel(name: str) -> str:
    return f"{VISUALS_DIR}/{name}.png"


def save_png(img: Image.Image, out_dir: Path, name: str) -> str:
    """Write `<out_dir>/visuals/<name>.png` atomically; returns the path relative to out_dir."""
    rel = png_rel(name)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # ~3x faster than the default 6, ~15 % larger sheets
    atomic_write_bytes(Path(out_dir) / rel, buf.getvalue())
    return rel


def new_figure(width_in: float = 7.0, height_in: float = 3.0, dpi: int = 100):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, out_dir: Path, name: str) -> str:
    """Render a Figure to `<out_dir>/visuals/<name>.png` (no metadata: same bytes every run)."""
    rel = png_rel(name)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(Path(out_dir) / rel, buf.getvalue())
    return rel


def histogram(
    values: np.ndarray,
    out_dir: Path,
    name: str,
    *,
    bins: int = 50,
    value_range: tuple[float, float] | None = None,
    xlabel: str = "",
    title: str = "",
    vlines: Sequence[tuple[float, str]] = (),
    groups: Sequence[tuple[str, np.ndarray]] = (),
) -> str:
    """A histogram PNG (700 x 300 px). `groups`: (label, mask) pairs stacked in colour instead of one
    bar series; `vlines`: (x, label) markers drawn dashed and labelled."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    fig = new_figure()
    ax = fig.add_subplot()
    if groups:
        data = [values[np.asarray(mask, dtype=bool) & finite] for _, mask in groups]
        ax.hist(data, bins=bins, range=value_range, stacked=True, label=[g for g, _ in groups])
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.hist(values[finite], bins=bins, range=value_range, color="#4477aa")
    for x, label in vlines:
        ax.axvline(x, color="#333333", lw=1, ls="--")
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                    ha="right", va="top", color="#333333")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average ignoring NaN (same length; the first points average what exists)."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    csum = np.cumsum(np.where(ok, values, 0.0))
    ccount = np.cumsum(ok)
    window = max(1, int(window))
    lo_sum = np.concatenate([np.zeros(window), csum[:-window]])[: len(values)]
    lo_count = np.concatenate([np.zeros(window), ccount[:-window]])[: len(values)]
    n = ccount - lo_count
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (csum - lo_sum) / np.maximum(n, 1), np.nan)
