"""Structured prompt segments and per-tag token ids against the real CLIP tokenizer."""
from __future__ import annotations

import pytest

from pipeline_config.cache import CacheConfig
from tasks.captions import join_caption, render_tag
from tasks.cache.captions import TagTokenizer, caption_columns, prompt_ids, prompt_text, segment_tags
from tasks.models.tokenizer import load_tokenizer

COMMA = 267


@pytest.fixture(scope="module")
def tok(model_cache):
    return load_tokenizer(None, cache_dir=model_cache)


def _raw(**kw):
    base = dict(general=["smile", "solo", "long_hair", "1girl", "^_^"], character=["hatsune_miku"],
                series=["vocaloid"], artist=["some_artist"], meta=["highres", "commentary_request"],
                rating="s", quality_label="good score", cfg=CacheConfig())
    base.update(kw)
    return segment_tags(**base)


def test_segments_follow_the_template():
    seg = _raw()
    assert seg == {
        "count": ["1girl", "solo"],
        "character": ["hatsune_miku"],
        "series": ["vocaloid"],
        "general": ["smile", "long_hair", "^_^"],
        "artist": ["some_artist"],
        "quality": ["good score", "sensitive", "highres"],  # commentary_request is not a kept meta tag
    }
    assert _raw(rating="explicit", cfg=CacheConfig(rating_tags={"e": "nsfw"}))["quality"] == ["good score", "nsfw",
                                                                                             "highres"]
    assert _raw(rating=None, quality_label=None, meta=[])["quality"] == []


def test_tokens_equal_the_tokenizer_on_the_rendered_caption(tok):
    raw = [_raw(), _raw(general=["1boy", "black_hair", "^_^"], character=["kawaragi_momoka_(girls_band_cry)"],
                        artist=[]), _raw(general=["smile"], rating=None, meta=[])]
    cols = caption_columns(raw, TagTokenizer(tok))
    for i, sample in enumerate(raw):
        rendered = {s: cols[f"tags_{s}"][i] for s in sample}
        assert rendered == {s: [render_tag(t) for t in sample[s]] for s in sample}
        order = [(s, j) for s in sample for j in range(len(sample[s]))]
        tokens = {s: cols[f"tokens_{s}"][i] for s in sample}
        sep = {s: cols[f"tokens_sep_{s}"][i] for s in sample}
        # The caption a user would type (escaped), as the prompt parser hands it to CLIP.
        caption = prompt_text(join_caption([sample[s] for s in sample]))
        assert prompt_ids(tokens, sep, order) == tok(caption, add_special_tokens=False).input_ids
        # tags that do not end in punctuation: the separator form is the tag's ids + the comma
        for s in sample:
            for tag, alone, with_sep in zip(rendered[s], tokens[s], sep[s]):
                if tag[-1].isalnum():
                    assert with_sep == alone + [COMMA]
    assert tok(",", add_special_tokens=False).input_ids == [COMMA]
    assert cols["tokens_quality"][0][0] == tok("good score", add_special_tokens=False).input_ids
    # trailing punctuation merges with the comma: `),` is one token, `^_^,` re-tokenizes
    j = raw[1]["character"].index("kawaragi_momoka_(girls_band_cry)")
    assert cols["tokens_sep_character"][1][j][-1] == tok("),", add_special_tokens=False).input_ids[0]
    k = raw[1]["general"].index("^_^")
    assert cols["tokens_sep_general"][1][k][:-1] != cols["tokens_general"][1][k]


def test_escaped_tags_are_tokenized_as_the_prompt_parser_sees_them(tok):
    tag = "kawaragi_momoka_(girls_band_cry)"
    rendered = render_tag(tag)
    assert rendered == "kawaragi momoka \\(girls band cry\\)"
    assert prompt_text(rendered) == "kawaragi momoka (girls band cry)"
    [ids] = TagTokenizer(tok).ids([rendered])
    assert ids == tok("kawaragi momoka (girls band cry)", add_special_tokens=False).input_ids
    backslash = tok("\\", add_special_tokens=False).input_ids[0]
    assert backslash not in ids
    assert 49406 not in ids and 49407 not in ids  # no BOS/EOS
