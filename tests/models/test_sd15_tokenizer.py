from __future__ import annotations

import json

import pytest

from data_contracts.errors import ConfigError
from tasks.models.tokenizer import (SELF_CHECK_IDS, builtin_tokenizer_dir, load_tokenizer, tokenize_text,
                                    tokenizer_identity)

TEXTS = [
    "a photo of a cat",
    "1girl, hatsune miku, vocaloid, long hair, twintails, aqua eyes, masterpiece, good score",
    "kita ikuyo, bocchi the rock!, (smile:1.2), looking at viewer, \\(artist\\)",
    "Frieren  SOUSOU NO FRIEREN   café naïve 日本語 emoji 🙂 it's don't we'll",
]


def test_known_ids(model_cache):
    tok = load_tokenizer(None, cache_dir=model_cache)
    assert tok("a photo of a cat").input_ids == SELF_CHECK_IDS
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    assert len(tok) == 49408 and tok.model_max_length == 77


@pytest.mark.parametrize("text", TEXTS)
def test_matches_open_clip_reference_tokenizer(model_cache, text):
    # open_clip's SimpleTokenizer is an independent implementation over the same BPE file.
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    tok = load_tokenizer(None, cache_dir=model_cache)
    assert tokenize_text(tok, text) == ref.encode(text)


def test_builtin_dir_is_reused_and_stable(model_cache):
    d1 = builtin_tokenizer_dir(model_cache)
    ident = tokenizer_identity(d1)
    mtime = (d1 / "vocab.json").stat().st_mtime_ns
    d2 = builtin_tokenizer_dir(model_cache)
    assert d1 == d2 and (d2 / "vocab.json").stat().st_mtime_ns == mtime
    assert tokenizer_identity(d2) == ident
    assert not [p for p in d1.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_folder_tokenizer_preferred_and_checked(model_cache, tmp_path):
    src = builtin_tokenizer_dir(model_cache)
    folder = tmp_path / "model" / "tokenizer"
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    assert load_tokenizer(tmp_path / "model", cache_dir=model_cache)("a photo of a cat").input_ids == SELF_CHECK_IDS
    # A folder tokenizer with a different vocabulary is the wrong tokenizer: refuse it.
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab["cat</w>"], vocab["photo</w>"] = vocab["photo</w>"], vocab["cat</w>"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ConfigError, match="not the SD1.5 CLIP tokenizer"):
        load_tokenizer(tmp_path / "model", cache_dir=model_cache)


def test_no_truncation_in_tokenize_text(model_cache):
    tok = load_tokenizer(None, cache_dir=model_cache)
    ids = tokenize_text(tok, ", ".join(["red hair"] * 60))
    assert len(ids) == 60 * 2 + 59 and 49406 not in ids and 49407 not in ids
