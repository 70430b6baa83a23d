"""Prompt assembly from cached per-tag ids: template order, seeded per-epoch shuffle, dropout rates."""
from __future__ import annotations

import math

import pytest

from data_contracts.cache import SEGMENTS
from tasks.models.text_encode import pack_batch
from tasks.models.tokenizer import tokenize_text
from tasks.train.prompts import COMMA_ID, assemble_ids, assemble_text, prompt_ids, prompt_order

from .conftest import sample_rows, unescape


def _row(tokenizer, i: int = 0):
    row = sample_rows(i + 1, [(64, 64)], tokenizer)[i]
    tags = {seg: row[f"tags_{seg}"] for seg in SEGMENTS}
    tokens = {seg: row[f"tokens_{seg}"] for seg in SEGMENTS}
    sep = {seg: row[f"tokens_sep_{seg}"] for seg in SEGMENTS}
    return tags, tokens, sep


def test_comma_id_is_the_tokenizers(tokenizer):
    assert tokenize_text(tokenizer, ",") == [COMMA_ID]


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_ids_equal_the_tokenizer_on_the_caption(tokenizer, epoch):
    # sample 1's character is `frieren \(sousou no frieren\)`: its ", " merges into a `),` token
    tags, tokens, sep = _row(tokenizer, 1)
    order = prompt_order(tokens, seed=1, epoch=epoch, sample_id=7)
    text = unescape(assemble_text(tags, order))
    assert "frieren (sousou no frieren), " in text
    assert assemble_ids(tokens, order, sep) == tokenize_text(tokenizer, text)
    assert assemble_ids(tokens, order) != tokenize_text(tokenizer, text)  # a lone comma is not enough there


def test_template_order_kept_and_general_shuffled_per_seed_epoch(tokenizer):
    tags, tokens, _ = _row(tokenizer)
    seen = set()
    for epoch in range(8):
        order = prompt_order(tokens, seed=0, epoch=epoch, sample_id=5)
        segs = [seg for seg, _ in order]
        # segments appear in template order: count, character, series, general..., artist, quality
        assert segs == sorted(segs, key=SEGMENTS.index)
        assert [i for seg, i in order if seg == "character"] == [0]
        general = tuple(i for seg, i in order if seg == "general")
        assert sorted(general) == list(range(len(tags["general"])))
        seen.add(general)
        # reproducible: the same (seed, epoch, id) gives the same order, in any process
        assert order == prompt_order(tokens, seed=0, epoch=epoch, sample_id=5)
    assert len(seen) >= 4  # reshuffled across epochs (4 tags: 24 orders)
    other_seed = [tuple(i for s, i in prompt_order(tokens, seed=9, epoch=e, sample_id=5) if s == "general")
                  for e in range(8)]
    assert other_seed != [tuple(i for s, i in prompt_order(tokens, seed=0, epoch=e, sample_id=5) if s == "general")
                          for e in range(8)]


def test_caption_dropout_rate(tokenizer):
    _, tokens, _ = _row(tokenizer)
    n, p = 4000, 0.05
    dropped = sum(prompt_ids(tokens, seed=0, epoch=e, sample_id=s, caption_dropout=p) == []
                  for e in range(4) for s in range(n // 4))
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped - n * p) < 4 * sd, dropped
    assert all(prompt_ids(tokens, seed=0, epoch=0, sample_id=s, caption_dropout=0.0) for s in range(200))
    # the empty prompt packs to one [BOS, EOS, pad...] chunk, as at inference with an empty negative
    empty = pack_batch([[]], 3)
    assert empty.shape == (1, 1, 77) and empty[0, 0, :3].tolist() == [49406, 49407, 49407]


def test_tag_dropout_only_drops_general_tags(tokenizer):
    _, tokens, _ = _row(tokenizer)
    kept = 0
    for s in range(500):
        order = prompt_order(tokens, seed=0, epoch=0, sample_id=s, tag_dropout=0.5)
        segs = [seg for seg, _ in order]
        assert segs.count("character") == 1 and segs.count("artist") == 1 and segs.count("count") == 1
        kept += segs.count("general")
    assert kept / (500 * 4) == pytest.approx(0.5, abs=0.05)
