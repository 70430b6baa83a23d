"""Pure bucketing logic: kohya's 17 buckets, assignment, resize/crop properties, merging, seeds."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_contracts.errors import ConfigError
from pipeline_config.bucket import BucketConfig
from pipeline_config.load import load_config
from tasks.bucket.core import (
    Bucket, assign, crop_boxes, hash_uniform, make_buckets, merge_small_buckets, nearest_bucket,
    no_upscale_buckets, resize_to_cover, ar_histogram,
)

KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_default_buckets_are_kohyas_17_at_512():
    buckets = make_buckets(BucketConfig())
    assert [(b.width, b.height) for b in buckets] == KOHYA_512
    assert len(buckets) == 17


@st.composite
def bucket_configs(draw):
    step = draw(st.sampled_from([8, 16, 32, 64, 128]))
    min_side = step * draw(st.integers(1, 8))
    resolution = draw(st.integers(max(min_side, step), min_side * 4))
    max_side = step * draw(st.integers(math.ceil(resolution / step), math.ceil(resolution / step) + 12))
    return BucketConfig(resolution=resolution, step=step, min_side=min_side, max_side=max_side)


@settings(max_examples=200, deadline=None)
@given(bucket_configs())
def test_every_bucket_is_a_multiple_of_step_within_area_and_sides(cfg):
    buckets = make_buckets(cfg)
    side = math.isqrt(cfg.area) // cfg.step * cfg.step
    assert Bucket(side, side) in buckets
    assert len(set(buckets)) == len(buckets)
    for b in buckets:
        assert b.width % cfg.step == 0 and b.height % cfg.step == 0
        assert b.width * b.height <= cfg.area
        assert Bucket(b.height, b.width) in buckets  # symmetric
        if b.width != b.height:
            assert cfg.min_side <= min(b.width, b.height) and max(b.width, b.height) <= cfg.max_side


def test_default_512_buckets_all_respect_kohya_limits():
    for b in make_buckets(BucketConfig()):
        assert b.width % 64 == 0 and b.height % 64 == 0 and b.width * b.height <= 512 * 512
        assert 256 <= b.width <= 1024 and 256 <= b.height <= 1024


def test_assignment_compares_log_aspect_ratios():
    buckets = make_buckets(BucketConfig())
    names = lambda w, h: [buckets[i].name for i in nearest_bucket(np.array(w), np.array(h), buckets)]
    assert names([512, 1024, 768, 3000, 100], [512, 768, 1024, 500, 380]) == [
        "512x512", "576x448", "448x576", "1024x256", "256x960"]
    # AR 1.138 lies between the geometric (1.134) and arithmetic (1.143) means of 1:1 and 576:448:
    # a linear comparison would pick 512x512, the log comparison picks 576x448.
    assert names([1138], [1000]) == ["576x448"]


sizes = st.integers(1, 6000)


@settings(max_examples=300, deadline=None)
@given(sizes, sizes, st.integers(1, 32), st.integers(1, 32), st.floats(0, 1, exclude_max=True),
       st.floats(0, 1, exclude_max=True), st.booleans())
def test_crop_box_lies_inside_resized_image_and_has_bucket_size(w, h, bw_steps, bh_steps, ux, uy, random):
    bw, bh = np.array([bw_steps * 64]), np.array([bh_steps * 64])
    rw, rh = resize_to_cover(np.array([w]), np.array([h]), bw, bh)
    assert rw[0] >= bw[0] and rh[0] >= bh[0]
    # cover: one side matches the bucket (up to kohya's rounding) and the aspect ratio is kept
    assert rw[0] == bw[0] or rh[0] == bh[0]
    assert abs(rw[0] / rh[0] - w / h) <= w / h * (1 / rh[0] + 1 / rw[0]) + 1e-9
    u = (np.array([ux]), np.array([uy])) if random else (None, None)
    left, top, right, bottom = (int(v[0]) for v in crop_boxes(rw, rh, bw, bh, *u))
    assert 0 <= left and 0 <= top and right <= rw[0] and bottom <= rh[0]
    assert right - left == bw[0] and bottom - top == bh[0]


@settings(max_examples=200, deadline=None)
@given(st.integers(64, 8000), st.integers(64, 8000))
def test_assign_properties_for_default_buckets(w, h):
    cfg = BucketConfig(min_image_side=0, crop="random", flip_prob=0.5)
    a = assign(np.array([1]), np.array([w]), np.array([h]), cfg)
    assert (a.bucket_w[0], a.bucket_h[0]) in KOHYA_512
    assert 0 <= a.crop_left[0] and a.crop_right[0] <= a.resize_w[0]
    assert 0 <= a.crop_top[0] and a.crop_bottom[0] <= a.resize_h[0]
    assert a.crop_right[0] - a.crop_left[0] == a.bucket_w[0]
    assert a.crop_bottom[0] - a.crop_top[0] == a.bucket_h[0]


@settings(max_examples=200, deadline=None)
@given(st.integers(64, 8000), st.integers(64, 8000))
def test_no_upscale_buckets_never_upscale(w, h):
    cfg = BucketConfig(no_upscale=True, min_image_side=0)
    a = assign(np.array([1]), np.array([w]), np.array([h]), cfg)
    if a.rejects:
        assert a.rejects[0]["reason"] == "too_small"
        return
    bw, bh = int(a.bucket_w[0]), int(a.bucket_h[0])
    assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= cfg.area and max(bw, bh) <= cfg.max_side
    assert a.resize_w[0] <= w and a.resize_h[0] <= h
    assert a.crop_right[0] <= a.resize_w[0] and a.crop_bottom[0] <= a.resize_h[0]


def test_no_upscale_examples():
    cfg = BucketConfig(no_upscale=True)
    bw, bh = no_upscale_buckets(np.array([300.0, 1024, 4000]), np.array([400.0, 1024, 1000]), cfg)
    assert list(zip(bw.tolist(), bh.tolist())) == [(256, 384), (512, 512), (1024, 256)]


def test_centre_crop_is_centred():
    left, top, right, bottom = crop_boxes(np.array([700]), np.array([512]), np.array([512]), np.array([512]))
    assert (left[0], top[0], right[0], bottom[0]) == (94, 0, 606, 512)


def test_random_crop_and_flip_are_reproducible_per_id_and_seed():
    rng = np.random.default_rng(0)
    ids = np.arange(5000, 7000)
    w = rng.integers(600, 3000, len(ids))
    h = rng.integers(600, 3000, len(ids))
    cfg = BucketConfig(crop="random", flip_prob=0.3, seed=11)
    a = assign(ids, w, h, cfg)
    b = assign(ids, w, h, cfg)
    perm = rng.permutation(len(ids))
    c = assign(ids[perm], w[perm], h[perm], cfg)  # same samples in another order: compare by id
    by_id = {int(i): (int(l), int(t), bool(f)) for i, l, t, f in zip(c.ids, c.crop_left, c.crop_top, c.flip)}
    assert np.array_equal(a.crop_left, b.crop_left) and np.array_equal(a.flip, b.flip)
    assert all(by_id[int(i)] == (int(l), int(t), bool(f)) for i, l, t, f in zip(a.ids, a.crop_left, a.crop_top, a.flip))
    other = assign(ids, w, h, BucketConfig(crop="random", flip_prob=0.3, seed=12))
    assert not np.array_equal(a.crop_left, other.crop_left) and not np.array_equal(a.flip, other.flip)
    assert 0.26 < a.flip.mean() < 0.34
    slack = a.resize_w - a.bucket_w
    assert len(set((a.crop_left[slack > 100] / slack[slack > 100]).round(1).tolist())) > 5  # spread, not centred
    assert not assign(ids, w, h, BucketConfig()).flip.any()


def test_hash_uniform_is_uniform_and_in_range():
    u = hash_uniform(np.arange(100_000), 0, "flip")
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 9_500 and counts.max() < 10_500


def test_merge_small_buckets_into_nearest_aspect_ratio():
    counts = {Bucket(512, 512): 40, Bucket(576, 448): 3, Bucket(448, 576): 30, Bucket(1024, 256): 2,
              Bucket(896, 256): 1, Bucket(256, 1024): 9}
    mapping = merge_small_buckets(counts, 8)
    assert mapping[Bucket(576, 448)] == Bucket(512, 512)
    # 896x256 (1) merges into 1024x256 (2) first; that pair (3) later into the nearest remaining: 512x512
    assert mapping[Bucket(896, 256)] == mapping[Bucket(1024, 256)] == Bucket(512, 512)
    assert mapping[Bucket(256, 1024)] == Bucket(256, 1024) and mapping[Bucket(448, 576)] == Bucket(448, 576)
    final: dict[Bucket, int] = {}
    for src, n in counts.items():
        final[mapping[src]] = final.get(mapping[src], 0) + n
    assert all(n >= 8 for n in final.values()) and sum(final.values()) == sum(counts.values())


def test_merge_stops_at_one_bucket_and_no_upscale_merges_to_the_sidewise_minimum():
    assert merge_small_buckets({Bucket(512, 512): 2, Bucket(576, 448): 1}, 10) == {
        Bucket(512, 512): Bucket(512, 512), Bucket(576, 448): Bucket(512, 512)}
    mapping = merge_small_buckets({Bucket(512, 512): 20, Bucket(448, 576): 2}, 10, no_upscale=True)
    assert set(mapping.values()) == {Bucket(448, 512)}


@pytest.mark.parametrize("mode", ["merge", "drop", "keep"])
def test_small_bucket_modes_in_assign(mode):
    w = np.array([1000] * 20 + [1100] * 3 + [500] * 9)
    h = np.array([1000] * 20 + [850] * 3 + [2000] * 9)  # 20 square, 3 near 576x448, 9 at 256x1024
    cfg = BucketConfig(small_buckets=mode, batch_size=4, world_size=2)
    a = assign(np.arange(len(w)), w, h, cfg)
    counts = {b.name: n for b, n in a.final_counts().items()}
    if mode == "merge":
        assert counts == {"256x1024": 9, "512x512": 23} and not a.rejects
    elif mode == "drop":
        assert counts == {"256x1024": 9, "512x512": 20}
        assert [r["reason"] for r in a.rejects] == ["small_bucket"] * 3
    else:
        assert counts == {"256x1024": 9, "512x512": 20, "576x448": 3}
    for i in range(len(a.ids)):  # merged samples are resized and cropped for their final bucket
        assert a.crop_right[i] - a.crop_left[i] == a.bucket_w[i] and a.crop_right[i] <= a.resize_w[i]


def test_min_bucket_samples_overrides_batch_times_world():
    assert BucketConfig(batch_size=12, world_size=2).bucket_threshold == 24
    assert BucketConfig(batch_size=12, world_size=2, min_bucket_samples=5).bucket_threshold == 5


def test_small_images_rejected_or_upscaled_by_config():
    w, h = np.array([200, 1000, 0, 300]), np.array([300, 1000, 10, 250])
    a = assign(np.arange(4), w, h, BucketConfig(min_image_side=256))
    assert [(r["id"], r["reason"]) for r in a.rejects] == [(0, "too_small"), (2, "bad_size"), (3, "too_small")]
    b = assign(np.arange(4), w, h, BucketConfig(min_image_side=256, small_images="upscale"))
    assert b.ids.tolist() == [0, 1, 3] and b.resize_w[0] > 200
    c = assign(np.arange(4), w, h, BucketConfig(min_image_side=256, small_images="upscale", no_upscale=True))
    assert c.ids.tolist() == [0, 1, 3] and min(c.bucket_w[0], c.bucket_h[0]) >= 192


def test_extreme_aspect_ratios_rejected_when_configured():
    w, h = np.array([4000, 1000]), np.array([500, 1000])
    assert not assign(np.arange(2), w, h, BucketConfig()).rejects
    a = assign(np.arange(2), w, h, BucketConfig(max_log_ar_error=0.5))
    assert [r["reason"] for r in a.rejects] == ["aspect_ratio"] and a.ids.tolist() == [1]


def test_ar_histogram_counts_every_image():
    rows = ar_histogram(np.array([100, 200, 100, 10000]), np.array([100, 100, 200, 1]), bins=8)
    assert sum(r["count"] for r in rows) == 4 and rows[-1]["count"] == 1 and rows[-1]["ar_to"] is None


def test_config_errors():
    with pytest.raises(ConfigError, match="multiples of step"):
        load_config({"bucket": {"min_side": 250}})
    with pytest.raises(ConfigError, match="resolution"):
        load_config({"bucket": {"resolution": 2048}})
    with pytest.raises(ConfigError, match="crop"):
        load_config({"bucket": {"crop": "top"}})
