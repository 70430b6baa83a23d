"""Prompts in the A1111 syntax users paste from model cards -> weighted, chunked CLIP conditioning.

Syntax (AUTOMATIC1111 ``prompt_parser.parse_prompt_attention`` semantics):
  ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:w)`` ×w, nesting multiplies, unbalanced brackets close at the end,
  ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters, ``BREAK`` starts a new 75-token chunk.
Neighbouring fragments of equal weight are merged. Each fragment is tokenised on its own (as A1111
does), giving per-token weights; tokens are laid out in 75-token chunks wrapped ``BOS … EOS`` to 77
(``tasks.models.text_encode``), encoded chunk by chunk with CLIP skip 2 and concatenated (77·K);
cond and uncond are padded with empty-prompt chunks to the same K. Emphasis is applied A1111-style
("Original" mode): embeddings × weight, then rescaled so each chunk keeps its original mean.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from tasks.models.text_encode import (empty_chunk, encode_chunks, pack_token_chunks, pack_weight_chunks,
                                      pad_to_chunks)
from tasks.models.tokenizer import CHUNK_TOKENS, EOS_ID, PAD_ID, tokenize_text

ROUND_MULT = 1.1
SQUARE_MULT = 1 / 1.1
BREAK = "BREAK"

# One token of the attention grammar per alternative, tried in this order.
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # escaped literal: \( \) \[ \] \\
  | \\                      # a lone backslash (dropped, as in A1111)
  | \(                      # open emphasis
  | \[                      # open de-emphasis
  | :\s*([+-]?[.\d]+)\s*\)  # explicit weight closing a round bracket
  | \)
  | \]
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that is not a weight
    """,
    re.X,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``'a (b:1.2) [c]'`` -> ``[('a ', 1.0), ('b', 1.2), (' ', 1.0), ('c', 1/1.1)]`` (A1111 semantics)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, mult: float) -> None:
        for item in res[start:]:
            item[1] *= mult

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                mult = float(weight)
            except ValueError:  # e.g. "(x:1.2.3)" — A1111 would crash; keep the text instead
                res.append([tok, 1.0])
                continue
            scale_from(round_open.pop(), mult)
        elif tok == ")" and round_open:
            scale_from(round_open.pop(), ROUND_MULT)
        elif tok == "]" and square_open:
            scale_from(square_open.pop(), SQUARE_MULT)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(tok)):
                if i > 0:
                    res.append([BREAK, -1.0])
                res.append([part, 1.0])
    for pos in round_open:
        scale_from(pos, ROUND_MULT)
    for pos in square_open:
        scale_from(pos, SQUARE_MULT)
    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, float(w)) for t, w in merged]


def tokenize_weighted(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """Token ids (no BOS/EOS) and one weight per token. BREAK pads to the next 75-token boundary."""
    ids: list[int] = []
    weights: list[float] = []
    for frag, weight in parse_prompt_attention(text):
        if weight == -1.0 and frag == BREAK:
            fill = (-len(ids)) % CHUNK_TOKENS
            if fill == 0 and ids:  # already at a boundary: BREAK still means "next chunk", i.e. nothing
                continue
            # Pad ids equal EOS for SD1, so [BOS, toks, PAD.., EOS] is exactly A1111's [BOS, toks, EOS, PAD..].
            ids += [PAD_ID] * fill
            weights += [1.0] * fill
            continue
        toks = tokenize_text(tokenizer, frag)
        ids += toks
        weights += [weight] * len(toks)
    return ids, weights


def chunk_count(n_tokens: int) -> int:
    return max(1, -(-n_tokens // CHUNK_TOKENS))


@dataclass
class PromptBatch:
    ids: torch.Tensor      # LongTensor[B, K, 77]
    weights: torch.Tensor  # FloatTensor[B, K, 77]

    @property
    def chunks(self) -> int:
        return self.ids.shape[1]


def pack_prompts(tokenizer, prompts: Sequence[str], *, min_chunks: int = 1,
                 max_chunks: int | None = None) -> PromptBatch:
    """Prompts -> ids/weights [B, K, 77]; K = the longest prompt's chunk count (≥ min_chunks).

    ``max_chunks`` None means no limit (A1111); NAI trained with up to 3 (225 tokens).
    """
    tokenized = [tokenize_weighted(tokenizer, p) for p in prompts]
    need = max([min_chunks] + [chunk_count(len(ids)) for ids, _ in tokenized])
    cap = need if max_chunks is None else max(1, max_chunks)
    k = min(need, cap)
    ids = [pad_to_chunks(pack_token_chunks(t, cap), k, empty_chunk()) for t, _ in tokenized]
    ws = [pad_to_chunks(pack_weight_chunks(w, cap), k, torch.ones(ids[0].shape[-1])) for _, w in tokenized]
    return PromptBatch(torch.stack(ids), torch.stack(ws))


def pad_batches(a: PromptBatch, b: PromptBatch) -> tuple[PromptBatch, PromptBatch]:
    """Give cond and uncond the same chunk count by appending empty-prompt chunks (weight 1)."""
    k = max(a.chunks, b.chunks)

    def grow(p: PromptBatch) -> PromptBatch:
        return PromptBatch(pad_to_chunks(p.ids, k, empty_chunk()),
                           pad_to_chunks(p.weights, k, torch.ones(p.ids.shape[-1])))
    return grow(a), grow(b)


@torch.no_grad()
def encode_prompt_pair(text_encoder, tokenizer, prompts: Sequence[str], negatives: Sequence[str], *,
                       clip_skip: int = 2, max_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [B, 77K, D], uncond [B, 77K, D]) with the same K, weighted, CLIP skip applied."""
    if len(prompts) != len(negatives):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    pos, neg = pad_batches(pack_prompts(tokenizer, prompts, max_chunks=max_chunks),
                           pack_prompts(tokenizer, negatives, max_chunks=max_chunks))
    cond = apply_emphasis(encode_chunks(text_encoder, pos.ids, clip_skip=clip_skip), pos.weights)
    uncond = apply_emphasis(encode_chunks(text_encoder, neg.ids, clip_skip=clip_skip), neg.weights)
    return cond, uncond


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A1111 "Original" emphasis on encoded chunks: z[B, 77K, D] × per-token weight, then each chunk is
    rescaled to its original mean (per prompt and chunk, so batching does not change a prompt).

    Guard: when a chunk's weighted mean is ~0 relative to its magnitude (|mean| < eps·mean|z|, e.g. a
    text encoder whose final LayerNorm has no bias), the ratio is meaningless (0/0) and is skipped.
    """
    b, k, n = weights.shape
    if torch.all(weights == 1.0):
        return z
    zc = z.reshape(b, k, n, -1)
    w = weights.to(device=z.device, dtype=z.dtype).reshape(b, k, n, 1)
    orig_mean = zc.mean(dim=(2, 3), keepdim=True)
    out = zc * w
    new_mean = out.mean(dim=(2, 3), keepdim=True)
    scale_ok = new_mean.abs() >= eps * out.abs().mean(dim=(2, 3), keepdim=True)
    ratio = torch.where(scale_ok, orig_mean / torch.where(scale_ok, new_mean, torch.ones_like(new_mean)),
                        torch.ones_like(new_mean))
    return (out * ratio).reshape(z.shape)


# BREAK padding relies on SD1's pad id being EOS (see tokenize_weighted).
assert PAD_ID == EOS_ID
