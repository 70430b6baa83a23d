"""Turn a reader batch (cached latents + per-tag token ids) into the tensors one training step needs.

Every random draw of a sample (its latent from mean/std, its noise ε, its noise level, its prompt) comes
from generators seeded by (seed, epoch, sample id), so the same sample gets the same draws whichever rank
or batch position it lands in: N processes with batch B train exactly like one with batch N·B, and a
resumed run repeats the uninterrupted one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from data_contracts.cache import SEGMENTS
from tasks.diffusion.objectives import NoiseLevels, Objective
from tasks.models.text_encode import pack_batch
from tasks.models.vae import sample_latents
from tasks.train.prompts import COMMA_ID, prompt_ids, sample_generator

HOLDOUT_SALT = "booruflow-val"


def is_heldout(sample_id: int, fraction: float) -> bool:
    """Stable validation split by id hash (independent of the seed, so runs compare on the same samples)."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{HOLDOUT_SALT}:{int(sample_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


@dataclass
class PromptOptions:
    max_chunks: int = 3
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    shuffle_general: bool = True
    comma_id: int = COMMA_ID


@dataclass
class StepBatch:
    """CPU tensors of one micro-batch (pinned when a GPU will read them)."""

    ids: list[int]
    bucket: tuple[int, int]
    x0: torch.Tensor  # [B,4,h,w] fp32, model space (scaled)
    noise: torch.Tensor  # [B,4,h,w] fp32
    levels: NoiseLevels
    token_ids: torch.Tensor  # [B,K,77] int64
    weight: torch.Tensor  # [B] fp32: tag_weight × (0 for held-out samples)
    epoch: int = 0
    reader_state: Any = None  # the reader's state right after this batch (for exact resume)
    extra: dict = field(default_factory=dict)

    def pin(self) -> "StepBatch":
        self.x0, self.noise, self.token_ids, self.weight = (
            t.pin_memory() for t in (self.x0, self.noise, self.token_ids, self.weight))
        return self

    @property
    def size(self) -> int:
        return len(self.ids)


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.tolist()]
    return [int(v) for v in value]


def sample_tokens(batch: Mapping[str, Any], row: int
                  ) -> tuple[dict[str, Sequence[Sequence[int]]], dict[str, Sequence[Sequence[int]]] | None]:
    """Row `row`'s per-tag ids by segment, and the ids with separators (None for caches without them)."""
    def column(kind: str, seg: str):
        values = batch.get(f"{kind}_{seg}")
        return (values[row] or []) if values is not None else None

    tokens = {seg: column("tokens", seg) or [] for seg in SEGMENTS}
    sep = {seg: column("tokens_sep", seg) for seg in SEGMENTS}
    return tokens, (None if any(v is None for v in sep.values()) else sep)


def prepare_batch(batch: Mapping[str, Any], *, epoch: int, seed: int, objective: Objective,
                  scaling_factor: float, prompts: PromptOptions, holdout_fraction: float = 0.0,
                  reader_state: Any = None) -> StepBatch:
    ids = _as_ids(batch["id"])
    mean = torch.as_tensor(batch["latent_mean"])
    std = batch.get("latent_std")
    std = torch.as_tensor(std) if std is not None else None
    x0, noise, sigmas, ts, prompts_ids = [], [], [], [], []
    for i, sid in enumerate(ids):
        g = sample_generator(seed, epoch, sid, "noise")
        m = mean[i].float()
        x0.append(sample_latents(m, std[i].float() if std is not None else None, scaling_factor, generator=g))
        noise.append(torch.randn(m.shape, generator=g, dtype=torch.float32))
        sigma, t = objective.draw(g)
        sigmas.append(sigma)
        ts.append(t)
        prompts_ids.append(prompt_ids(*sample_tokens(batch, i), seed=seed, epoch=epoch, sample_id=sid,
                                      caption_dropout=prompts.caption_dropout, tag_dropout=prompts.tag_dropout,
                                      shuffle_general=prompts.shuffle_general, comma_id=prompts.comma_id))
    tag_weight = torch.as_tensor(batch["tag_weight"], dtype=torch.float32).reshape(-1)
    keep = torch.tensor([0.0 if is_heldout(s, holdout_fraction) else 1.0 for s in ids])
    bucket = tuple(int(v) for v in batch["bucket"])
    return StepBatch(
        ids=ids, bucket=(bucket[0], bucket[1]), x0=torch.stack(x0), noise=torch.stack(noise),
        levels=objective.levels(sigmas, ts), token_ids=pack_batch(prompts_ids, prompts.max_chunks),
        weight=tag_weight * keep, epoch=epoch, reader_state=reader_state)


def validation_batch(rows: Mapping[str, Any], *, objective: Objective, sigma_grid: list[float],
                     scaling_factor: float, max_chunks: int, seed: int = 0) -> StepBatch:
    """Held-out rows at every σ of the grid with fixed noise, the latent mean and the full ordered prompt."""
    ids = _as_ids(rows["id"])
    mean = torch.as_tensor(rows["latent_mean"]).float()
    n = len(ids)
    noise = torch.stack([torch.randn(mean.shape[1:], generator=sample_generator(seed, -1, s, "val"))
                         for s in ids])
    prompts_ids = [prompt_ids(*sample_tokens(rows, i), seed=seed, epoch=-1, sample_id=s, shuffle_general=False)
                   for i, s in enumerate(ids)]
    tokens = pack_batch(prompts_ids, max_chunks)
    g = len(sigma_grid)
    bucket = tuple(int(v) for v in rows["bucket"])
    return StepBatch(
        ids=ids * g, bucket=(bucket[0], bucket[1]), x0=(mean * scaling_factor).repeat(g, 1, 1, 1),
        noise=noise.repeat(g, 1, 1, 1), levels=objective.fixed_levels(sigma_grid, n),
        token_ids=tokens.repeat(g, 1, 1), weight=torch.ones(n * g))
