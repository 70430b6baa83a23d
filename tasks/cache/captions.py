"""Structured prompt segments per sample, and the CLIP token ids of every tag.

Segments (data_contracts.cache.SEGMENTS): count tags (1girl, solo...), characters, series (= Danbooru
copyright), general tags, artists, then quality label + rating + kept meta tags. Tag text is the shared
rendering (tasks.captions.render_tag: `long hair`, `aoi \\(series\\)`), i.e. what a user types into a
prompt. Token ids are those of the text the prompt parser of A1111/ComfyUI hands to CLIP, where `\\(`
has become `(`: training on backslash tokens would teach the model tokens it never sees at inference.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from data_contracts.cache import SEGMENTS
from pipeline_config.cache import CacheConfig
from tasks.captions import render_tag, split_count_tags

_UNESCAPE = re.compile(r"\\(.)")
RATING_LETTERS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}


def prompt_text(rendered: str) -> str:
    """`aoi \\(series\\)` -> `aoi (series)`: the text CLIP sees after prompt-weight parsing."""
    return _UNESCAPE.sub(r"\1", rendered)


def _dedupe(tags: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for tag in tags:
        if tag and tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


def rating_letter(value: str | None) -> str | None:
    """Danbooru letter (g/s/q/e) or tagger name (general/...) -> letter; None when unknown."""
    if not value:
        return None
    value = value.strip().lower()
    return value if value in ("g", "s", "q", "e") else RATING_LETTERS.get(value)


def segment_tags(
    *,
    general: Sequence[str],
    character: Sequence[str],
    series: Sequence[str],
    artist: Sequence[str],
    meta: Sequence[str],
    rating: str | None,
    quality_label: str | None,
    cfg: CacheConfig,
) -> dict[str, list[str]]:
    """Danbooru-spelled tags of one sample, by segment, in template order (not rendered yet)."""
    count, rest = split_count_tags(general or [])
    keep_meta = set(cfg.meta_tags)
    letter = rating_letter(rating)
    quality = [quality_label] if quality_label else []
    rating_tag = cfg.rating_tags.get(letter, "") if letter else ""
    if rating_tag:
        quality.append(rating_tag)
    quality += [t for t in (meta or []) if t in keep_meta]
    return {
        "count": _dedupe(count),
        "character": _dedupe(character or []),
        "series": _dedupe(series or []),
        "general": _dedupe(rest),
        "artist": _dedupe(artist or []),
        "quality": _dedupe(quality),
    }


class TagTokenizer:
    """CLIP ids per rendered tag, alone and followed by its ", " separator; memoised (a dataset repeats
    the same few thousand tags)."""

    SEPARATOR = ","  # the space after it only splits words, CLIP drops it

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._memo: dict[tuple[str, bool], list[int]] = {}

    def ids(self, rendered: Sequence[str], sep: bool = False) -> list[list[int]]:
        missing = [t for t in dict.fromkeys(rendered) if (t, sep) not in self._memo]
        if missing:
            texts = [prompt_text(t) + (self.SEPARATOR if sep else "") for t in missing]
            out = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
            for tag, ids in zip(missing, out):
                self._memo[(tag, sep)] = [int(i) for i in ids]
        return [self._memo[(t, sep)] for t in rendered]


def _per_row(flat: list, rows: Sequence[Sequence]) -> list[list]:
    out, pos = [], 0
    for row in rows:
        out.append(flat[pos : pos + len(row)])
        pos += len(row)
    return out


def caption_columns(raw: Sequence[dict[str, list[str]]], tokens: TagTokenizer) -> dict[str, list]:
    """Rendered `tags_<seg>`, `tokens_<seg>` and `tokens_sep_<seg>` columns for the samples' raw segments."""
    cols: dict[str, list] = {}
    for seg in SEGMENTS:
        rendered = [[render_tag(t) for t in sample[seg]] for sample in raw]
        flat = [t for row in rendered for t in row]
        cols[f"tags_{seg}"] = rendered
        cols[f"tokens_{seg}"] = _per_row(tokens.ids(flat), rendered)
        cols[f"tokens_sep_{seg}"] = _per_row(tokens.ids(flat, sep=True), rendered)
    return cols


def prompt_ids(tokens: dict[str, Sequence[Sequence[int]]], sep_tokens: dict[str, Sequence[Sequence[int]]],
               order: Sequence[tuple[str, int]]) -> list[int]:
    """Exact CLIP ids (no BOS/EOS) of the caption of the tags in `order` joined by ", "."""
    out: list[int] = []
    for n, (seg, i) in enumerate(order):
        out.extend(tokens[seg][i] if n == len(order) - 1 else sep_tokens[seg][i])
    return out
