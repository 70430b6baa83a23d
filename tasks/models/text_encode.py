"""Prompt tokens -> CLIP conditioning, shared by training and sampling (A1111/ComfyUI semantics).

* Tokens are split into 75-token chunks; each chunk is wrapped ``BOS … EOS`` and padded to 77 with
  the pad id (EOS for SD1). An empty prompt is one chunk ``BOS EOS pad…``. NAI trained with up to
  3 chunks (225 tokens); longer prompts are truncated to ``max_chunks``.
* Each chunk is encoded separately and the results are concatenated along the sequence: 77·K tokens.
* CLIP skip 2 = the penultimate hidden state passed through the final layer norm (skip 1 = the usual
  last_hidden_state).
* Cond and uncond must have the same K for batched CFG: the shorter is padded with empty chunks.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tasks.models.tokenizer import BOS_ID, CHUNK_TOKENS, EOS_ID, MAX_LENGTH, PAD_ID


def num_chunks(n_tokens: int, max_chunks: int = 3) -> int:
    """Chunks a prompt of ``n_tokens`` (without BOS/EOS) takes: at least 1, at most ``max_chunks``."""
    return max(1, min(max_chunks, -(-n_tokens // CHUNK_TOKENS)))


def empty_chunk(*, bos: int = BOS_ID, eos: int = EOS_ID, pad: int = PAD_ID) -> torch.Tensor:
    """The chunk of an empty prompt: ``[BOS, EOS, pad × 75]``."""
    row = torch.full((MAX_LENGTH,), pad, dtype=torch.long)
    row[0], row[1] = bos, eos
    return row


def pack_token_chunks(token_ids: Sequence[int], max_chunks: int = 3, *, bos: int = BOS_ID,
                      eos: int = EOS_ID, pad: int = PAD_ID, min_chunks: int = 1) -> torch.Tensor:
    """Token ids (no BOS/EOS) -> LongTensor[K, 77], K = max(min_chunks, ceil(n/75)) capped at max_chunks.

    Extra chunks up to ``min_chunks`` are empty-prompt chunks (as :func:`pad_chunks` adds).
    """
    if max_chunks < 1:
        raise ValueError("max_chunks must be >= 1")
    ids = list(token_ids)[: max_chunks * CHUNK_TOKENS]
    k = max(num_chunks(len(ids), max_chunks), min(min_chunks, max_chunks))
    out = torch.full((k, MAX_LENGTH), pad, dtype=torch.long)
    for c in range(k):
        part = ids[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        out[c, 0] = bos
        if part:
            out[c, 1:1 + len(part)] = torch.tensor(part, dtype=torch.long)
        out[c, 1 + len(part)] = eos
    return out


def pack_weight_chunks(weights: Sequence[float], max_chunks: int = 3, *, min_chunks: int = 1) -> torch.Tensor:
    """Per-token emphasis weights laid out like :func:`pack_token_chunks` (1.0 on BOS/EOS/padding)."""
    w = list(weights)[: max_chunks * CHUNK_TOKENS]
    k = max(num_chunks(len(w), max_chunks), min(min_chunks, max_chunks))
    out = torch.ones((k, MAX_LENGTH), dtype=torch.float32)
    for c in range(k):
        part = w[c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]
        if part:
            out[c, 1:1 + len(part)] = torch.tensor(part, dtype=torch.float32)
    return out


def pad_to_chunks(x: torch.Tensor, k: int, fill: torch.Tensor) -> torch.Tensor:
    """Append ``fill`` rows ([77]) along the chunk axis of [K,77] or [B,K,77] until it has ``k`` chunks."""
    axis = x.dim() - 2
    have = x.shape[axis]
    if have >= k:
        return x
    shape = list(x.shape)
    shape[axis] = k - have
    extra = fill.to(device=x.device, dtype=x.dtype).expand(*shape)
    return torch.cat([x, extra], dim=axis)


def pad_chunks(a: torch.Tensor, b: torch.Tensor, *, bos: int = BOS_ID, eos: int = EOS_ID,
               pad: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Equalise the chunk counts of two id tensors ([K,77] or [B,K,77]) with empty-prompt chunks."""
    k = max(a.shape[-2], b.shape[-2])
    fill = empty_chunk(bos=bos, eos=eos, pad=pad)
    return pad_to_chunks(a, k, fill), pad_to_chunks(b, k, fill)


def pack_batch(batch_token_ids: Sequence[Sequence[int]], max_chunks: int = 3, *, min_chunks: int = 1,
               bos: int = BOS_ID, eos: int = EOS_ID, pad: int = PAD_ID) -> torch.Tensor:
    """Several prompts -> LongTensor[B, K, 77], K = the largest chunk count, shorter ones padded
    with empty-prompt chunks (the same padding A1111 applies between cond and uncond)."""
    packed = [pack_token_chunks(t, max_chunks, bos=bos, eos=eos, pad=pad) for t in batch_token_ids]
    k = max([min(min_chunks, max_chunks)] + [p.shape[0] for p in packed])
    fill = empty_chunk(bos=bos, eos=eos, pad=pad)
    return torch.stack([pad_to_chunks(p, k, fill) for p in packed])


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel; older versions (and *WithProjection) nest text_model.
    if hasattr(text_encoder, "final_layer_norm"):
        return text_encoder.final_layer_norm
    return text_encoder.text_model.final_layer_norm


def encode_chunks(text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int = 2,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """LongTensor[B, K, 77] -> Tensor[B, 77·K, D]: each chunk encoded alone, concatenated in order.

    ``clip_skip`` ≥ 1 picks ``hidden_states[-clip_skip]`` and applies the final layer norm.
    ``weights`` ([B,K,77], optional) applies A1111 emphasis: scale each token's embedding, then
    rescale the chunk so its mean is unchanged (A1111 takes that mean over the whole batch; here it is
    per sample and chunk, so a prompt's conditioning does not depend on what it is batched with).
    """
    if ids.dim() == 2:
        ids = ids.unsqueeze(0)
    if ids.dim() != 3 or ids.shape[-1] != MAX_LENGTH:
        raise ValueError(f"ids must be [B, K, {MAX_LENGTH}], got {tuple(ids.shape)}")
    if clip_skip < 1:
        raise ValueError("clip_skip must be >= 1")
    b, k, n = ids.shape
    device = next(text_encoder.parameters()).device
    flat = ids.reshape(b * k, n).to(device)
    out = text_encoder(input_ids=flat, output_hidden_states=True)
    hidden = out.hidden_states
    if clip_skip > len(hidden) - 1:
        raise ValueError(f"clip_skip {clip_skip} exceeds the text encoder's {len(hidden) - 1} layers")
    z = final_layer_norm(text_encoder)(hidden[-clip_skip])
    z = z.reshape(b, k, n, z.shape[-1])
    if weights is not None:
        w = weights.to(device=z.device, dtype=z.dtype).reshape(b, k, n, 1)
        orig_mean = z.mean(dim=(2, 3), keepdim=True)
        z = z * w
        z = z * (orig_mean / z.mean(dim=(2, 3), keepdim=True))
    return z.reshape(b, k * n, z.shape[-1])
