"""A1111-style generation parameters in a PNG ``parameters`` text chunk (write and read back).

The text is what A1111/Forge write and what their "PNG Info" tab, ComfyUI loaders and civitai read:

    <prompt>
    Negative prompt: <negative>
    Steps: 48, Sampler: Euler, Schedule type: Simple, CFG scale: 6, Seed: 1, Size: 768x1024, ...

Values with a comma, colon or newline are JSON-quoted (as A1111's ``quote``); the last line is the
parameter line only when it holds at least 3 ``key: value`` pairs (as A1111's parser decides).
"""
from __future__ import annotations

import io
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
_NEGATIVE = "Negative prompt:"
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and not text.startswith('"'):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # "CFG scale: 6" like A1111, not "6.0"
    return str(value)


@dataclass
class GenerationInfo:
    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)  # ordered "Steps" -> "48", ...

    def to_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"{_NEGATIVE} {self.negative_prompt}")
        if self.params:
            lines.append(", ".join(f"{k}: {quote(format_value(v))}" for k, v in self.params.items()))
        return "\n".join(lines)


def parse_parameters(text: str) -> GenerationInfo:
    """Inverse of :meth:`GenerationInfo.to_text` (and of what A1111 writes)."""
    *lines, last = text.strip("\n").split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    neg_lines: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].lstrip(" ")
        (neg_lines if in_negative else prompt_lines).append(line)
    params = {k.strip(): unquote(v.strip()) for k, v in _PARAM.findall(last)}
    return GenerationInfo("\n".join(prompt_lines), "\n".join(neg_lines), params)


def png_bytes(image: Image.Image, info: GenerationInfo | None, extra: Mapping[str, str] | None = None) -> bytes:
    meta = PngInfo()
    if info is not None:
        meta.add_text(PARAMETERS_KEY, info.to_text())  # tEXt, or iTXt when not latin-1 (PIL decides)
    for k, v in (extra or {}).items():
        meta.add_text(k, str(v))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def save_png(path: Path, image: Image.Image, info: GenerationInfo | None,
             extra: Mapping[str, str] | None = None) -> Path:
    """Write the PNG with its parameters chunk atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(png_bytes(image, info, extra))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_png_info(path: Path) -> GenerationInfo | None:
    """The parameters chunk of a PNG, parsed; None when it has none."""
    with Image.open(path) as im:
        im.load()
        text = getattr(im, "text", {}).get(PARAMETERS_KEY) or im.info.get(PARAMETERS_KEY)
    return parse_parameters(text) if text else None
