"""Cached latents decoded back beside their source crops: a real comparison, not a hard-coded one.

The builtin tiny-sd15 VAE is random: its decode barely depends on its input (see pooling_vae.py), so
the "matches its own source better than the others" check runs with a hand-set AutoencoderKL of the
same class whose decode(encode(x)) is a known blocky copy of x. The builtin VAE is still run through
the same functions (load, decode, sheet) to prove the wiring works with the real loading path.
"""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from data_contracts.cache import CHUNK_SCHEMA
from data_contracts.tables import write_table
from tasks.cache.images import Geometry, load_pil, uint8_to_pixels
from tasks.cache.visuals import THUMB, decode_check, make_decoded_sheet, read_chunk_sample, vae_decoder
from tasks.common import visuals as v
from tasks.models.vae import encode_latent_dist
from tests.visuals import data
from tests.visuals.pooling_vae import pooling_vae

SCALING = 2.0  # the builtin tiny codec VAE's scaling factor (tasks/models/tiny.py)


def write_chunks(world, vae, out: Path) -> tuple[list[Path], pa.Table]:
    """Cache the world's images the way the cache stage does: crop (PIL path), encode, fp16 mean bytes,
    one Parquet chunk per bucket under chunks/bucket=<w>x<h>/."""
    buckets = data.buckets_table(world.post_rows, world.tmp)
    by_id = {r["id"]: r for r in world.post_rows}
    per_bucket: dict[str, list[dict]] = {}
    for g in buckets.to_pylist():
        geo = Geometry(g["width"], g["height"], g["resize_w"], g["resize_h"],
                       (g["crop_left"], g["crop_top"], g["crop_right"], g["crop_bottom"]), g["flip"])
        crop = load_pil(world.pool / by_id[g["id"]]["image_path"], geo)
        with torch.inference_mode():
            mean, std = encode_latent_dist(vae, uint8_to_pixels(crop[None]))
        row = {name: None for name in CHUNK_SCHEMA.names}
        row.update(id=g["id"], bucket_w=g["bucket_w"], bucket_h=g["bucket_h"], flip=g["flip"],
                   latent_mean=mean[0].to(torch.float16).numpy().tobytes(),
                   latent_std=std[0].to(torch.float16).numpy().tobytes(), quality_label="good score", tag_weight=1.0)
        per_bucket.setdefault(f"{g['bucket_w']}x{g['bucket_h']}", []).append(row)
    paths = []
    for name, rows in sorted(per_bucket.items()):
        path = out / "chunks" / f"bucket={name}" / "part-00000.parquet"
        write_table(pa.Table.from_pylist(rows, schema=CHUNK_SCHEMA), path, CHUNK_SCHEMA)
        paths.append(path)
    return paths, buckets


@pytest.fixture(scope="module")
def pool_vae():
    return pooling_vae()


def test_decoded_latents_match_their_own_source_better_than_a_shuffled_pairing(world, pool_vae):
    paths, buckets = write_chunks(world, pool_vae, world.tmp / "cache")
    rows = read_chunk_sample(paths, seed=0, max_items=8)
    assert rows.num_rows == 8 and rows.schema.names == CHUNK_SCHEMA.names  # no hive 'bucket' column added
    check = decode_check(rows, buckets, world.posts, world.pool, vae_decoder(pool_vae), scaling_factor=SCALING)
    assert sorted(check.ids) == sorted(r["id"] for r in world.post_rows) and not check.skipped
    assert check.shuffled_psnr is not None
    assert check.mean_psnr > check.shuffled_psnr + 6.0, (check.psnr, check.shuffled_psnr)
    assert min(check.psnr) > check.shuffled_psnr  # every single pair, not just on average
    stats = check.stats()
    assert stats["decode_check_samples"] == 8 and stats["decode_psnr_db"] == pytest.approx(check.mean_psnr, abs=0.01)

    # The comparison can fail: give two rows each other's latents and their PSNR drops to the baseline.
    table = rows.to_pylist()
    same = [i for i, r in enumerate(table) if (r["bucket_w"], r["bucket_h"]) == (64, 64)][:2]
    a, b = table[same[0]], table[same[1]]
    a["latent_mean"], b["latent_mean"] = b["latent_mean"], a["latent_mean"]
    swapped = decode_check(pa.Table.from_pylist(table, schema=CHUNK_SCHEMA), buckets, world.posts, world.pool,
                           vae_decoder(pool_vae), scaling_factor=SCALING)
    by_id = dict(zip(swapped.ids, swapped.psnr))
    good = dict(zip(check.ids, check.psnr))
    for r in (a, b):
        assert by_id[r["id"]] < good[r["id"]] - 6.0
    # So does a wrong flip: the cached latent of a flipped crop against the unflipped source.
    flipped = pa.Table.from_pylist([{**r, "flip": not r["flip"]} for r in rows.to_pylist()], schema=CHUNK_SCHEMA)
    wrong = decode_check(flipped, buckets, world.posts, world.pool, vae_decoder(pool_vae), scaling_factor=SCALING)
    assert wrong.mean_psnr < check.mean_psnr - 3.0

    images = make_decoded_sheet(check, world.out)
    sheet = Image.open(world.out / images["decoded latents vs source"])
    tile_w = v.side_by_side_width(2, THUMB)
    cols = (v.MAX_WIDTH - v.PAD) // (tile_w + v.PAD)
    assert sheet.size[0] == cols * (tile_w + v.PAD) + v.PAD <= v.MAX_WIDTH


def test_builtin_tiny_vae_runs_through_the_same_path(world, tmp_path_factory):
    from tasks.models import load_sd15, resolve_model_source

    source = resolve_model_source("builtin:tiny-sd15", tmp_path_factory.mktemp("model-cache"))
    vae = load_sd15(source, components=("vae",)).vae
    paths, buckets = write_chunks(world, vae, world.tmp / "cache")
    rows = read_chunk_sample(paths, seed=1, max_items=3)
    check = decode_check(rows, buckets, world.posts, world.pool, vae_decoder(vae), scaling_factor=SCALING)
    assert len(check.ids) == 3 and all(np.isfinite(check.psnr))
    assert all(d.shape == s.shape for d, s in zip(check.decoded, check.sources))
    assert make_decoded_sheet(check, world.out)


def test_unreadable_source_is_skipped_with_a_reason(world, pool_vae):
    paths, buckets = write_chunks(world, pool_vae, world.tmp / "cache")
    (world.pool / world.post_rows[2]["image_path"]).write_bytes(b"broken")
    check = decode_check(read_chunk_sample(paths), buckets, world.posts, world.pool, vae_decoder(pool_vae),
                         scaling_factor=SCALING)
    assert [s["id"] for s in check.skipped] == [1002] and check.skipped[0]["reason"] == "decode_error"
    assert len(check.ids) == 7
    assert make_decoded_sheet(decode_check(read_chunk_sample(paths).slice(0, 0), buckets, world.posts, world.pool,
                                           vae_decoder(pool_vae), scaling_factor=SCALING), world.out) == {}
