"""Cache pictures: cached latents decoded back through the same VAE beside the cropped source images.

The visual (and numeric) proof that the cache holds what training will see: each sampled chunk row's
latent mean is decoded (model space = mean x scaling_factor) and compared with the source image cut
exactly as the cache cut it (tasks/cache/images.py, PIL path: resize to cover, crop box, flip). The
PSNR of every decode vs its own source is reported, and, as the baseline a broken pairing would sit
at, the mean PSNR of every decode vs the *other* sampled sources.

Inputs: chunk rows (data_contracts/cache.py CHUNK_SCHEMA; id, bucket_w, bucket_h, flip, latent_mean),
the bucket table (geometry), the ingest posts (image_path), the pool, and a decode function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from tasks.cache.images import Geometry, ImageError, load_pil
from tasks.common.visuals import (
    MUTED,
    Line,
    Tile,
    contact_sheet,
    pick,
    psnr,
    save_png,
    side_by_side,
    side_by_side_width,
    uint8_image,
)

DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # model-space latents [1, C, h, w] -> pixels [1, 3, H, W] in [-1, 1]
THUMB = 144  # per image; a tile is source | decoded


def vae_decoder(vae: torch.nn.Module) -> DecodeFn:
    """The DecodeFn of a diffusers AutoencoderKL, through the shared tasks.models.decode_latents."""
    from tasks.models.vae import decode_latents

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return decode_latents(vae, latents)

    return decode


def _in_fs(path: Path | str, fs: Any) -> str:
    """The path as the filesystem names it (fsspec strips its protocol: s3://b/k -> b/k)."""
    return str(path) if fs is None else fs._strip_protocol(str(path))


def read_chunk_sample(paths: Sequence[Path | str], *, seed: int = 0, max_items: int = 12,
                      filesystems: Sequence[Any] | None = None,
                      ids_per_file: Sequence[np.ndarray] | None = None) -> pa.Table:
    """max_items chunk rows chosen by seed across all chunk files, reading only the id column of every
    file (or nothing, when `ids_per_file` gives them) and then only the chosen rows (latents are large;
    the id filter skips row groups by their statistics). filesystems: per path, an fsspec filesystem to read
    it through in place (ranged reads of a chunk on object storage), or None for a local file."""
    fss = list(filesystems) if filesystems is not None else [None] * len(paths)
    found: list[tuple[int, int]] = []  # (file index, id)
    for i, path in enumerate(paths):
        file_ids = ids_per_file[i] if ids_per_file is not None else \
            pq.read_table(_in_fs(path, fss[i]), columns=["id"], filesystem=fss[i]).column("id").to_numpy()
        found += [(i, int(x)) for x in file_ids]
    if not found:
        return pa.table({})
    ids = np.array([x for _, x in found], dtype=np.int64)
    chosen = pick(ids, max_items, seed)
    by_file: dict[int, list[int]] = {}
    for k in chosen:
        by_file.setdefault(found[k][0], []).append(found[k][1])
    parts = []
    for i, wanted in sorted(by_file.items()):
        table = pq.read_table(_in_fs(paths[i], fss[i]), filters=[("id", "in", wanted)], filesystem=fss[i])
        parts.append(table)
    table = pa.concat_tables(parts, promote_options="default")
    order = {int(x): n for n, x in enumerate(ids[chosen])}  # keep the seed order
    keys = [order[int(x)] for x in table.column("id").to_pylist()]
    return table.take(pa.array(np.argsort(keys, kind="stable")))


@dataclass
class DecodeCheck:
    ids: list[int] = field(default_factory=list)
    sources: list[np.ndarray] = field(default_factory=list)  # uint8 [h, w, 3], the cache's crop
    decoded: list[np.ndarray] = field(default_factory=list)  # uint8 [h, w, 3]
    psnr: list[float] = field(default_factory=list)  # decode vs own source, dB
    shuffled_psnr: float | None = None  # mean over every decode vs every other source (resized), dB
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason", "detail"}: source unreadable

    @property
    def mean_psnr(self) -> float | None:
        return float(np.mean(self.psnr)) if self.psnr else None

    def stats(self) -> dict:
        """For the stage's manifest stats / summary (JSON-safe: an exact match reads 99 dB, not inf)."""
        def db(value: float | None) -> float | None:
            return None if value is None else round(min(float(value), 99.0), 2)

        return {
            "decode_check_samples": len(self.ids),
            "decode_psnr_db": db(self.mean_psnr),
            "decode_psnr_min_db": db(min(self.psnr)) if self.psnr else None,
            "decode_psnr_shuffled_db": db(self.shuffled_psnr),
            "decode_check_skipped": len(self.skipped),
        }


def _latent(blob: bytes, channels: int, h: int, w: int) -> torch.Tensor:
    arr = np.frombuffer(blob, dtype=np.float16)
    if arr.size != channels * h * w:
        raise ValueError(f"latent holds {arr.size} values, expected {channels}x{h}x{w}")
    return torch.from_numpy(arr.astype(np.float32).reshape(1, channels, h, w))


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> uint8 [H, W, 3] (the inverse of uint8_to_pixels)."""
    x = pixels.detach().float().cpu()[0].clamp(-1, 1).add(1).mul(127.5).round()
    return x.permute(1, 2, 0).numpy().astype(np.uint8)


def _resized(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == shape:
        return img
    return np.asarray(Image.fromarray(img).resize((shape[1], shape[0]), Image.Resampling.BICUBIC))


def decode_check(
    rows: pa.Table,
    buckets: pa.Table,
    posts: pa.Table,
    pool: Path,
    decode: DecodeFn,
    *,
    scaling_factor: float,
    latent_channels: int = 4,
    latent_downscale: int = 8,
    seed: int = 0,
    max_items: int = 12,
) -> DecodeCheck:
    """Decode up to max_items of `rows` (chosen by seed) and compare each with its source crop."""
    check = DecodeCheck()
    if rows.num_rows == 0:
        return check
    rows = rows.take(pa.array(pick(rows.column("id").to_numpy(), max_items, seed)))
    geo_rows = buckets.filter(pc.is_in(buckets.column("id"), rows.column("id"))).to_pylist()
    geometry = {r["id"]: r for r in geo_rows}
    paths = dict(zip(posts.column("id").to_pylist(), posts.column("image_path").to_pylist()))
    for row in rows.select(["id", "bucket_w", "bucket_h", "flip", "latent_mean"]).to_pylist():
        post_id, g, path = row["id"], geometry.get(row["id"]), paths.get(row["id"])
        if g is None or path is None:
            check.skipped.append({"id": post_id, "reason": "missing_upstream",
                                  "detail": "no bucket row" if g is None else "no ingest post"})
            continue
        geo = Geometry(g["width"], g["height"], g["resize_w"], g["resize_h"],
                       (g["crop_left"], g["crop_top"], g["crop_right"], g["crop_bottom"]), bool(row["flip"]))
        try:
            source = load_pil(Path(pool) / path, geo)
        except ImageError as exc:
            check.skipped.append({"id": post_id, "reason": exc.reason, "detail": exc.detail})
            continue
        f = latent_downscale
        latent = _latent(row["latent_mean"], latent_channels, row["bucket_h"] // f, row["bucket_w"] // f)
        decoded = _to_uint8(decode(latent * scaling_factor))
        check.ids.append(post_id)
        check.sources.append(source)
        check.decoded.append(decoded)
        check.psnr.append(psnr(decoded, _resized(source, decoded.shape[:2])))
    n = len(check.ids)
    if n >= 2:
        others = [psnr(check.decoded[i], _resized(check.sources[j], check.decoded[i].shape[:2]))
                  for i in range(n) for j in range(n) if j != i]
        check.shuffled_psnr = float(np.mean(others))
    return check


def make_decoded_sheet(check: DecodeCheck, out_dir: Path, *, thumb: int = THUMB) -> dict[str, str]:
    """Tiles of source | decoded with the PSNR of each pair; {} when nothing was decoded."""
    if not check.ids:
        return {}
    tiles = [
        Tile(side_by_side([uint8_image(s), uint8_image(d)], thumb),
             [f"#{i} · PSNR {p:.1f} dB", Line(f"source {s.shape[1]}x{s.shape[0]} | decoded", MUTED)])
        for i, s, d, p in zip(check.ids, check.sources, check.decoded, check.psnr)
    ]
    shuffled = f"{check.shuffled_psnr:.1f} dB" if check.shuffled_psnr is not None else "n/a"
    title = (f"cache: {len(tiles)} cached latents (mean) decoded by the VAE beside their source crops; "
             f"mean PSNR {check.mean_psnr:.1f} dB (mismatched pairs: {shuffled})")
    sheet = contact_sheet(tiles, title, thumb=thumb, thumb_w=side_by_side_width(2, thumb))
    return {"decoded latents vs source": save_png(sheet, out_dir, "cache-decoded")}
