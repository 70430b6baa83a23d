"""Deterministic validation loss on held-out samples over a fixed σ grid.

Held-out samples are chosen by a hash of their id (`batches.is_heldout`); training gives them weight 0, so
they never move the weights. They are read straight from the cache contract's Parquet chunks. Each uses its
latent mean (no posterior sampling), its full prompt in template order (no shuffle, no dropout) and fixed
noise, so the number is comparable across steps, runs and objectives (for DDPM the grid maps to
t = round(σ·999)).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from data_contracts.cache import SEGMENTS, CacheManifest
from data_contracts.store import ArtifactStore
from tasks.diffusion.objectives import Objective, weighted_mse
from tasks.train.batches import is_heldout, validation_batch

_TOKEN_KINDS = ("tokens", "tokens_sep")
_COLUMNS = ["id", "bucket_w", "bucket_h", "latent_mean"] + [f"{k}_{s}" for s in SEGMENTS for k in _TOKEN_KINDS]


def load_heldout(manifest: CacheManifest, store: ArtifactStore, fraction: float, max_samples: int
                 ) -> list[dict[str, Any]]:
    """Held-out rows grouped by bucket: [{"id", "bucket", "latent_mean" [N,C,h,w] fp16, "tokens(_sep)_<seg>"}]."""
    if fraction <= 0 or max_samples <= 0:
        return []
    rows: dict[tuple[int, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    taken = 0
    for chunk in sorted(manifest.chunks, key=lambda c: c.path):
        table = pq.read_table(store.path(manifest, chunk.path), columns=_COLUMNS)
        ids = table.column("id").to_pylist()
        picked = [i for i, sid in enumerate(ids) if is_heldout(sid, fraction)]
        if not picked:
            continue
        sub = table.take(picked).to_pydict()
        for j in range(len(picked)):
            w, h = int(sub["bucket_w"][j]), int(sub["bucket_h"][j])
            group = rows[(w, h)]
            group["id"].append(int(sub["id"][j]))
            group["latent_mean"].append(
                np.frombuffer(sub["latent_mean"][j], dtype=np.float16).reshape(
                    manifest.latent_channels, h // manifest.latent_downscale, w // manifest.latent_downscale))
            for seg in SEGMENTS:
                for kind in _TOKEN_KINDS:
                    group[f"{kind}_{seg}"].append(sub[f"{kind}_{seg}"][j] or [])
            taken += 1
            if taken >= max_samples:
                break
        if taken >= max_samples:
            break
    out = []
    for (w, h), group in sorted(rows.items()):
        batch = dict(group)
        batch["bucket"] = (w, h)
        batch["latent_mean"] = torch.from_numpy(np.stack(batch["latent_mean"]))
        out.append(batch)
    return out


@torch.no_grad()
def validation_loss(groups: list[dict[str, Any]], *, denoise, encode, objective: Objective, sigmas: list[float],
                    scaling_factor: float, max_chunks: int, batch_size: int, device: torch.device,
                    autocast) -> dict[str, float]:
    """Mean MSE overall and per σ. `denoise(x_t, timestep, context)` and `encode(ids)` run the models."""
    per_sigma: dict[float, list[float]] = {s: [] for s in sigmas}
    for group in groups:
        n = len(group["id"])
        for start in range(0, n, batch_size):
            rows = {k: (v[start:start + batch_size] if k != "bucket" else v) for k, v in group.items()}
            for s in sigmas:
                b = validation_batch(rows, objective=objective, sigma_grid=[s], scaling_factor=scaling_factor,
                                     max_chunks=max_chunks)
                x0, noise = b.x0.to(device), b.noise.to(device)
                x_t, timestep, target, _ = objective.inputs(x0, noise, b.levels)
                with autocast():
                    pred = denoise(x_t, timestep, encode(b.token_ids.to(device)))
                _, per = weighted_mse(pred, target, torch.ones(b.size, device=device))
                per_sigma[s].extend(per.cpu().tolist())
    if not any(per_sigma.values()):
        return {}
    out = {f"val_loss_sigma_{s:g}": float(np.mean(v)) for s, v in per_sigma.items() if v}
    out["val_loss"] = float(np.mean([x for v in per_sigma.values() for x in v]))
    return out
