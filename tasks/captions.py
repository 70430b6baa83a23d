"""Caption rendering shared by the tag, cache, train, sample and eval stages.

Stored tags keep Danbooru spelling (`long_hair`, `aoi_(series)`); prompts use the rendered form
(`long hair`, `aoi \\(series\\)`) that NAI-style models were trained on: underscores become spaces except
in kaomoji such as `^_^`, and parentheses are escaped so A1111/ComfyUI prompt weighting leaves them alone.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

# Tags whose underscores are part of the face, not word separators (same list as the WD tagger tools).
KAOMOJI = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
        "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)
# Count tags lead the structured prompt (NAI template: 1girl/1boy, character, series, ..., artists, quality).
COUNT_TAG = re.compile(r"^(\d\+?(girl|boy|other)s?|multiple_(girls|boys|others)|no_humans|solo)$")
COUNT_TAGS_ORDER = ("1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple_girls",
                    "1boy", "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple_boys",
                    "1other", "2others", "multiple_others", "no_humans", "solo")


def render_tag(tag: str) -> str:
    """`long_hair` -> `long hair`; `aoi_(series)` -> `aoi \\(series\\)`; kaomoji kept as is."""
    text = tag if tag in KAOMOJI or len(tag) <= 3 else tag.replace("_", " ")
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def is_count_tag(tag: str) -> bool:
    return bool(COUNT_TAG.match(tag))


def split_count_tags(general: Iterable[str]) -> tuple[list[str], list[str]]:
    """Separate count tags (kept in canonical order) from the other general tags (order kept)."""
    count, rest = [], []
    for tag in general:
        (count if is_count_tag(tag) else rest).append(tag)
    rank = {t: i for i, t in enumerate(COUNT_TAGS_ORDER)}
    count.sort(key=lambda t: (rank.get(t, len(rank)), t))
    return count, rest


def join_caption(segments: Sequence[Sequence[str]]) -> str:
    """Rendered tags of every segment, in order, comma separated."""
    return ", ".join(render_tag(t) for seg in segments for t in seg)
