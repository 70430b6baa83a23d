from __future__ import annotations

import pytest
import torch

from tasks.models.text_encode import (empty_chunk, encode_chunks, num_chunks, pack_batch, pack_token_chunks,
                                      pack_weight_chunks, pad_chunks)

BOS, EOS, PAD = 49406, 49407, 49407


def _toks(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def test_empty_prompt_is_one_chunk():
    out = pack_token_chunks([])
    assert out.shape == (1, 77) and out.dtype == torch.long
    assert out[0, 0] == BOS and out[0, 1] == EOS and (out[0, 2:] == PAD).all()
    assert torch.equal(out[0], empty_chunk())


def test_75_tokens_fill_one_chunk_exactly():
    out = pack_token_chunks(_toks(75))
    assert out.shape == (1, 77)
    assert out[0, 0] == BOS and out[0, 76] == EOS
    assert out[0, 1:76].tolist() == _toks(75)


def test_76_tokens_spill_into_second_chunk():
    out = pack_token_chunks(_toks(76))
    assert out.shape == (2, 77)
    assert out[0, 1:76].tolist() == _toks(75) and out[0, 76] == EOS
    assert out[1, :3].tolist() == [BOS, 1075, EOS] and (out[1, 3:] == PAD).all()


def test_200_tokens_three_chunks_in_order():
    ids = _toks(200)
    out = pack_token_chunks(ids)
    assert out.shape == (3, 77)
    assert (out[:, 0] == BOS).all()
    body = torch.cat([out[0, 1:76], out[1, 1:76], out[2, 1:51]]).tolist()
    assert body == ids
    assert out[2, 51] == EOS and (out[2, 52:] == PAD).all()


def test_over_max_chunks_truncates():
    out = pack_token_chunks(_toks(300), max_chunks=3)
    assert out.shape == (3, 77) and out[2, 75].item() == 1000 + 224 and out[2, 76] == EOS
    assert pack_token_chunks(_toks(300), max_chunks=1).shape == (1, 77)
    assert num_chunks(0) == 1 and num_chunks(75) == 1 and num_chunks(76) == 2 and num_chunks(10_000) == 3


def test_custom_pad_id():
    out = pack_token_chunks(_toks(3), pad=0)
    assert out[0, :5].tolist() == [BOS, 1000, 1001, 1002, EOS] and (out[0, 5:] == 0).all()


def test_pad_chunks_2d_and_3d():
    a, b = pack_token_chunks(_toks(200)), pack_token_chunks(_toks(5))
    pa, pb = pad_chunks(a, b)
    assert pa.shape == pb.shape == (3, 77)
    assert torch.equal(pa, a) and torch.equal(pb[0], b[0])
    assert torch.equal(pb[1], empty_chunk()) and torch.equal(pb[2], empty_chunk())
    # symmetric, and batched [B, K, 77]
    qb, qa = pad_chunks(b.unsqueeze(0).repeat(2, 1, 1), a.unsqueeze(0).repeat(2, 1, 1))
    assert qb.shape == qa.shape == (2, 3, 77) and torch.equal(qb[1, 2], empty_chunk())


def test_pack_batch_pads_to_longest():
    out = pack_batch([_toks(0), _toks(80), _toks(10)])
    assert out.shape == (3, 2, 77)
    assert torch.equal(out[0, 1], empty_chunk()) and torch.equal(out[2, 1], empty_chunk())
    assert pack_batch([_toks(3)], min_chunks=3).shape == (1, 3, 77)


def test_pack_weight_chunks_layout():
    w = pack_weight_chunks([2.0] * 76)
    assert w.shape == (2, 77) and w[0, 0] == 1 and w[0, 76] == 1 and (w[0, 1:76] == 2).all()
    assert w[1, 1] == 2 and w[1, 2] == 1


def _direct(te, chunk: torch.Tensor, skip: int) -> torch.Tensor:
    out = te(input_ids=chunk.unsqueeze(0), output_hidden_states=True)
    return te.final_layer_norm(out.hidden_states[-skip])[0]


def test_clip_skip_2_is_penultimate_plus_final_layer_norm(tiny):
    te = tiny.text_encoder
    ids = pack_batch([_toks(100), _toks(20, start=5000)])  # [2, 2, 77]
    with torch.no_grad():
        z = encode_chunks(te, ids, clip_skip=2)
        assert z.shape == (2, 154, te.config.hidden_size)
        for b in range(2):
            for k in range(2):
                ref = _direct(te, ids[b, k], 2)
                torch.testing.assert_close(z[b, 77 * k:77 * (k + 1)], ref, rtol=1e-5, atol=1e-5)
        # skip 2 really differs from skip 1, and skip 1 is the usual last_hidden_state
        z1 = encode_chunks(te, ids, clip_skip=1)
        assert (z1 - z).abs().max() > 1e-3
        last = te(input_ids=ids[0, 0:1]).last_hidden_state[0]
        torch.testing.assert_close(z1[0, :77], last, rtol=1e-5, atol=1e-5)


def test_chunks_encoded_independently(tiny):
    # Chunk 2 of a long prompt encodes exactly as that chunk alone: no attention across chunks.
    te = tiny.text_encoder
    ids = pack_batch([_toks(100)])
    with torch.no_grad():
        z = encode_chunks(te, ids)
        alone = encode_chunks(te, ids[:, 1:2])
    torch.testing.assert_close(z[:, 77:], alone, rtol=1e-5, atol=1e-5)


def test_emphasis_weights(tiny):
    te = tiny.text_encoder
    ids = pack_batch([_toks(10)])
    with torch.no_grad():
        z = encode_chunks(te, ids)
        ones = encode_chunks(te, ids, weights=torch.ones(1, 1, 77))
        torch.testing.assert_close(ones, z)
        w = pack_weight_chunks([1.5] * 3 + [1.0] * 7).unsqueeze(0)
        zw = encode_chunks(te, ids, weights=w)
    torch.testing.assert_close(zw.mean(), z.mean(), rtol=1e-4, atol=1e-6)  # mean restored
    ratio = (zw[0, 1] / z[0, 1]) / (zw[0, 5] / z[0, 5])
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.5), rtol=1e-4, atol=1e-4)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError):
        encode_chunks(tiny.text_encoder, torch.zeros(1, 1, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds"):
        encode_chunks(tiny.text_encoder, pack_batch([[]]), clip_skip=10)
