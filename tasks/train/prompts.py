"""Assemble a training prompt's token ids from the cache's per-tag token ids, in template order.

Template (NAI / the seed recipe): count, character, series, general (reshuffled every epoch), artist,
quality/meta. The cache stores each tag's ids twice: alone (`tokens_<seg>`) and followed by its ", "
separator (`tokens_sep_<seg>`; the comma can merge with trailing punctuation, e.g. `),`), so a prompt's exact
ids — those the tokenizer gives for the caption joined with ", " — are tokens_sep of every tag but the last,
then tokens of the last.

Every random choice comes from a generator seeded by (seed, epoch, sample id, purpose), so a sample's
prompt is the same whichever rank, batch or resume point it is drawn in.
"""
from __future__ import annotations

import hashlib
import random
from typing import Mapping, Sequence

import torch

from data_contracts.cache import SEGMENTS

COMMA_ID = 267  # CLIP BPE id of "," (checked against the tokenizer in the tests)
SHUFFLED_SEGMENTS = ("general",)
DROPPABLE_SEGMENTS = ("general",)  # tag dropout never removes identity (character/series/artist) tags


def sample_seed(seed: int, epoch: int, sample_id: int, purpose: str) -> int:
    """A 63-bit seed for one sample's draws of one kind (noise, prompt, ...)."""
    h = hashlib.blake2b(f"{seed}:{epoch}:{sample_id}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def sample_rng(seed: int, epoch: int, sample_id: int, purpose: str) -> random.Random:
    return random.Random(sample_seed(seed, epoch, sample_id, purpose))


def sample_generator(seed: int, epoch: int, sample_id: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, epoch, sample_id, purpose))


def order_tags(segments: Mapping[str, Sequence], rng: random.Random, *, shuffle_general: bool = True,
               tag_dropout: float = 0.0) -> list[tuple[str, int]]:
    """(segment, index) of every kept tag in prompt order.

    Segments keep the template order; only general tags are shuffled and (optionally) dropped.
    """
    order: list[tuple[str, int]] = []
    for seg in SEGMENTS:
        idx = list(range(len(segments.get(seg) or [])))
        if seg in SHUFFLED_SEGMENTS and shuffle_general:
            rng.shuffle(idx)
        if seg in DROPPABLE_SEGMENTS and tag_dropout > 0:
            idx = [i for i in idx if rng.random() >= tag_dropout]
        order.extend((seg, i) for i in idx)
    return order


def assemble_ids(tokens: Mapping[str, Sequence[Sequence[int]]], order: Sequence[tuple[str, int]],
                 sep_tokens: Mapping[str, Sequence[Sequence[int]]] | None = None,
                 comma_id: int = COMMA_ID) -> list[int]:
    """The prompt's ids for the tags in `order` (no BOS/EOS: chunking adds them).

    Without `sep_tokens` (older caches) a lone comma id stands between tags, which differs from the
    tokenizer only where a tag ends in punctuation the comma would merge with.
    """
    out: list[int] = []
    last = len(order) - 1
    for n, (seg, i) in enumerate(order):
        if n < last and sep_tokens is not None:
            out.extend(int(t) for t in sep_tokens[seg][i])
            continue
        out.extend(int(t) for t in tokens[seg][i])
        if n < last:
            out.append(comma_id)
    return out


def assemble_text(tags: Mapping[str, Sequence[str]], order: Sequence[tuple[str, int]]) -> str:
    """The rendered caption the ids stand for (for logs and tests)."""
    return ", ".join(tags[seg][i] for seg, i in order)


def prompt_order(segments: Mapping[str, Sequence], *, seed: int, epoch: int, sample_id: int,
                 caption_dropout: float = 0.0, tag_dropout: float = 0.0,
                 shuffle_general: bool = True) -> list[tuple[str, int]]:
    """One sample's tag order for one epoch; [] (the empty prompt) when the caption is dropped."""
    rng = sample_rng(seed, epoch, sample_id, "prompt")
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return []
    return order_tags(segments, rng, shuffle_general=shuffle_general, tag_dropout=tag_dropout)


def prompt_ids(tokens: Mapping[str, Sequence[Sequence[int]]],
               sep_tokens: Mapping[str, Sequence[Sequence[int]]] | None = None, *, seed: int, epoch: int,
               sample_id: int, caption_dropout: float = 0.0, tag_dropout: float = 0.0, shuffle_general: bool = True,
               comma_id: int = COMMA_ID) -> list[int]:
    """One sample's prompt ids for one epoch ([] when the caption is dropped)."""
    order = prompt_order(tokens, seed=seed, epoch=epoch, sample_id=sample_id, caption_dropout=caption_dropout,
                         tag_dropout=tag_dropout, shuffle_general=shuffle_general)
    return assemble_ids(tokens, order, sep_tokens, comma_id)
