"""A1111 prompt syntax, per-token weights, 75-token chunking, cond/uncond padding, weighted CLIP-skip-2."""
import pytest
import torch

from tasks.captions import render_tag
from tasks.models.text_encode import encode_chunks
from tasks.models.tokenizer import BOS_ID, EOS_ID, tokenize_text
from tasks.sample.prompt import (apply_emphasis, encode_prompt_pair, pack_prompts, pad_batches, parse_prompt_attention,
                                 tokenize_weighted)


@pytest.mark.parametrize("text,expected", [
    # The examples in AUTOMATIC1111's prompt_parser docstring.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    # more
    ("[faded]", [("faded", 1 / 1.1)]),
    ("[[x]]", [("x", 1 / 1.21)]),
    ("( red hair : 1.25 )", [(" red hair ", 1.25)]),
    ("x:1.2)", [("x:1.2)", 1.0)]),  # a weight without an open bracket is text
    ("time: noon", [("time: noon", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_escaped_parentheses_of_rendered_tags_stay_literal():
    tag = render_tag("aoi_(series)")  # captions escape brackets so prompt weighting leaves them alone
    assert parse_prompt_attention(f"1girl, {tag}, (smile:1.2)") == [
        ("1girl, aoi (series), ", 1.0), ("smile", 1.2)]


def test_nested_weights_multiply_and_break_splits():
    assert parse_prompt_attention("((a:1.5) b)") == [("a", pytest.approx(1.65)), (" b", pytest.approx(1.1))]
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]


@pytest.fixture(scope="module")
def tok(tiny):
    return tiny.components.tokenizer


def test_per_token_weights(tok):
    ids, w = tokenize_weighted(tok, "a (photo:1.5) of [a cat]")
    assert ids == tokenize_text(tok, "a photo of a cat")
    assert w == pytest.approx([1.0, 1.5, 1.0, 1 / 1.1, 1 / 1.1])


def test_prompts_over_75_tokens_split_into_77_token_chunks(tok):
    text = ", ".join(["long hair", "blue eyes", "smile"] * 12)  # 3 tokens per tag (with the comma)
    ids, _ = tokenize_weighted(tok, text)
    assert 75 < len(ids) <= 150
    batch = pack_prompts(tok, [text])
    assert batch.ids.shape == (1, 2, 77)
    first, second = batch.ids[0]
    assert first[0] == BOS_ID and first[-1] == EOS_ID and first[1:76].tolist() == ids[:75]
    rest = ids[75:]
    assert second[0] == BOS_ID and second[1:1 + len(rest)].tolist() == rest and second[1 + len(rest)] == EOS_ID
    assert pack_prompts(tok, [text], max_chunks=1).ids.shape == (1, 1, 77)  # NAI-style cap when asked


def test_break_starts_a_new_chunk(tok):
    batch = pack_prompts(tok, ["a cat BREAK a dog"])
    assert batch.ids.shape == (1, 2, 77)
    cat, dog = batch.ids[0]
    assert cat[:3].tolist() == [BOS_ID, *tokenize_text(tok, "a cat")] and cat[3] == EOS_ID
    assert dog[:3].tolist() == [BOS_ID, *tokenize_text(tok, "a dog")] and dog[3] == EOS_ID


def test_shorter_of_cond_and_uncond_is_padded_with_empty_chunks(tok):
    long = ", ".join(["smile"] * 90)  # 2 tokens per tag: 179 tokens, 3 chunks
    pos = pack_prompts(tok, [long, "short"])
    neg = pack_prompts(tok, ["worst quality", "bad"])
    assert pos.chunks == 3 and neg.chunks == 1
    pos2, neg2 = pad_batches(pos, neg)
    assert pos2.ids.shape == neg2.ids.shape == (2, 3, 77)
    empty = [BOS_ID, EOS_ID] + [EOS_ID] * 75
    assert neg2.ids[0, 1].tolist() == empty and neg2.ids[0, 2].tolist() == empty
    assert torch.equal(neg2.ids[:, 0], neg.ids[:, 0])
    assert torch.all(neg2.weights[:, 1:] == 1.0)


def test_emphasis_restores_each_chunks_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 2 * 77, 8, generator=g) + 0.3  # 2 prompts x 2 chunks, non-zero mean
    w = torch.ones(2, 2, 77)
    w[0, 1, 5] = 1.5
    out = apply_emphasis(z, w)
    torch.testing.assert_close(out[1], z[1])  # the other prompt is untouched (per-prompt, not per-batch)
    torch.testing.assert_close(out[0, :77], z[0, :77])  # and so is the unweighted chunk
    chunk, ref = out[0, 77:], z[0, 77:]
    torch.testing.assert_close(chunk.mean(), ref.mean())
    scale = ref.mean() / (ref.mean() + ref[5].sum() * 0.5 / ref.numel())
    torch.testing.assert_close(chunk[5], ref[5] * 1.5 * scale)
    torch.testing.assert_close(chunk[6], ref[6] * scale)


def test_emphasis_skips_the_mean_restore_when_the_mean_is_zero():
    z = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(1))
    z = z - z.mean(dim=-1, keepdim=True)  # LayerNorm without bias: every token has mean 0
    w = torch.ones(1, 1, 77)
    w[0, 0, 3] = 1.2
    out = apply_emphasis(z, w)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 3], z[0, 3] * 1.2)


def test_weighted_prompt_encoding(tiny, tok):
    te = tiny.components.text_encoder
    cond, uncond = encode_prompt_pair(te, tok, ["a (cat:1.5)"], ["a cat"])
    assert cond.shape == uncond.shape == (1, 77, te.config.hidden_size)
    assert torch.isfinite(cond).all()
    with torch.no_grad():
        plain = encode_chunks(te, pack_prompts(tok, ["a cat"]).ids, clip_skip=2)
    torch.testing.assert_close(uncond, plain)  # weight 1 everywhere changes nothing
    ratio = cond[0, 2].norm() / plain[0, 2].norm()  # token 2 is "cat"
    others = cond[0, 1].norm() / plain[0, 1].norm()
    assert ratio / others == pytest.approx(1.5, rel=1e-4)


def test_clip_skip_2_is_diffusers_clip_skip_1(tiny, tok):
    # diffusers counts skipped layers (clip_skip=1 -> penultimate hidden state + final LayerNorm);
    # A1111/NAI "Clip skip: 2" is that. diffusers 0.42 + transformers >= 5.6 cannot run its own clip_skip
    # path (CLIPTextModel lost `.text_model`, huggingface/diffusers#14124): then the reference is the same
    # computation spelled out.
    from diffusers import StableDiffusionPipeline

    c = tiny.components
    text = "1girl, red hair, smile"
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with torch.no_grad():
        try:
            ref, _ = pipe.encode_prompt(text, "cpu", 1, False, clip_skip=1)
        except AttributeError as e:
            assert "text_model" in str(e)
            ids = c.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
            hidden = c.text_encoder(ids, output_hidden_states=True).hidden_states
            ref = c.text_encoder.final_layer_norm(hidden[-2])
        last, _ = pipe.encode_prompt(text, "cpu", 1, False)  # no clip skip: last layer
    ours, _ = encode_prompt_pair(c.text_encoder, tok, [text], [""])
    torch.testing.assert_close(ours, ref)
    assert not torch.allclose(ours, last)
