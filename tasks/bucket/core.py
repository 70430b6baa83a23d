"""Pure bucketing logic (kohya-compatible): bucket set, assignment, resize-to-cover, crop, merging.

Array functions take numpy arrays (one entry per image) and are vectorised, so 260k posts take well
under a second. Random choices (crop offset, flip) come from a hash of (seed, post id, purpose), so a
sample's result does not depend on row order, sharding or how many other samples there are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline_config.bucket import TAG_COLUMNS, BucketConfig, BucketSelect


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)


def make_buckets(cfg: BucketConfig) -> list[Bucket]:
    """kohya's make_bucket_resolutions: the square floor(sqrt(A)/step)*step, plus for each width
    w = min_side..max_side by step, h = min(max_side, floor(A/w/step)*step) kept if h >= min_side,
    as (w, h) and (h, w). Sorted by (width, height)."""
    area, step = cfg.area, cfg.step
    side = int(math.isqrt(area) // step) * step
    resos = {(side, side)}
    for w in range(cfg.min_side, cfg.max_side + 1, step):
        h = min(cfg.max_side, (area // w) // step * step)
        if h >= cfg.min_side:
            resos.add((w, h))
            resos.add((h, w))
    return [Bucket(w, h) for w, h in sorted(resos)]


def nearest_bucket(width: np.ndarray, height: np.ndarray, buckets: list[Bucket]) -> np.ndarray:
    """Index of the bucket with the nearest log aspect ratio (first in list order on ties)."""
    log_ar = np.log(np.asarray(width, np.float64) / np.asarray(height, np.float64))
    b_log = np.array([b.log_aspect for b in buckets])
    return np.abs(log_ar[:, None] - b_log[None, :]).argmin(axis=1)


def no_upscale_buckets(
    width: np.ndarray, height: np.ndarray, cfg: BucketConfig, upscale_to: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image bucket (w, h) that never needs upscaling: scale the image down to at most
    resolution² area and max_side per side (up only so its short side reaches `upscale_to`), then
    floor each side to step. A side of 0 means the image is too small for any bucket."""
    w = np.asarray(width, np.float64)
    h = np.asarray(height, np.float64)
    up = np.maximum(1.0, upscale_to / np.minimum(w, h))
    s = np.minimum.reduce([up, np.sqrt(cfg.area / (w * h)), cfg.max_side / w, cfg.max_side / h])
    # + 1e-9: a side that is exactly a multiple of step after scaling must not lose a step to rounding
    bw = (np.floor(w * s + 1e-9) // cfg.step * cfg.step).astype(np.int64)
    bh = (np.floor(h * s + 1e-9) // cfg.step * cfg.step).astype(np.int64)
    return bw, bh


def resize_to_cover(
    width: np.ndarray, height: np.ndarray, bucket_w: np.ndarray, bucket_h: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Smallest aspect-preserving size that covers the bucket (kohya rounding: int(x + 0.5)),
    never below the bucket on either side."""
    w = np.asarray(width, np.float64)
    h = np.asarray(height, np.float64)
    bw = np.asarray(bucket_w, np.int64)
    bh = np.asarray(bucket_h, np.int64)
    scale = np.maximum(bw / w, bh / h)
    rw = np.maximum(bw, np.floor(w * scale + 0.5).astype(np.int64))
    rh = np.maximum(bh, np.floor(h * scale + 0.5).astype(np.int64))
    return rw, rh


def crop_boxes(
    resize_w: np.ndarray,
    resize_h: np.ndarray,
    bucket_w: np.ndarray,
    bucket_h: np.ndarray,
    u_x: np.ndarray | None = None,
    u_y: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(left, top, right, bottom) in resized-image pixels, right/bottom exclusive.
    Centre crop without u; with u in [0, 1) the offset is floor(u * (slack + 1))."""
    rw, rh = np.asarray(resize_w, np.int64), np.asarray(resize_h, np.int64)
    bw, bh = np.asarray(bucket_w, np.int64), np.asarray(bucket_h, np.int64)
    slack_x, slack_y = rw - bw, rh - bh
    if u_x is None or u_y is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        left = np.minimum(np.floor(np.asarray(u_x) * (slack_x + 1)).astype(np.int64), slack_x)
        top = np.minimum(np.floor(np.asarray(u_y) * (slack_y + 1)).astype(np.int64), slack_y)
    return left, top, left + bw, top + bh


_SALTS = {"crop_x": 0x5851F42D4C957F2D, "crop_y": 0x14057B7EF767814F, "flip": 0x2545F4914F6CDD1D}


def hash_uniform(ids: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    """Uniform [0, 1) per id from splitmix64(seed, id, purpose): reproducible and order-free."""
    with np.errstate(over="ignore"):
        x = np.asarray(ids, np.int64).astype(np.uint64)
        x ^= np.uint64((seed * 0x9E3779B97F4A7C15 + _SALTS[purpose]) & 0xFFFFFFFFFFFFFFFF)
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def merge_small_buckets(
    counts: dict[Bucket, int], min_samples: int, no_upscale: bool = False
) -> dict[Bucket, Bucket]:
    """Map every bucket with samples to its final bucket so that each final bucket holds at least
    min_samples (unless everything together holds fewer).

    Repeatedly the smallest bucket below the threshold merges into the nearest other non-empty
    bucket by log aspect ratio (ties: more samples, then smaller (w, h)). With no_upscale the
    merged bucket is the side-wise minimum of the two, so no member ever needs upscaling.
    """
    live = {b: n for b, n in counts.items() if n > 0}
    mapping = {b: b for b in live}
    while len(live) > 1:
        small = [b for b, n in live.items() if n < min_samples]
        if not small:
            break
        src = min(small, key=lambda b: (live[b], b))
        dst = min(
            (b for b in live if b != src),
            key=lambda b: (abs(b.log_aspect - src.log_aspect), -live[b], b),
        )
        new = Bucket(min(src.width, dst.width), min(src.height, dst.height)) if no_upscale else dst
        total = live.pop(src) + live.pop(dst)
        live[new] = live.get(new, 0) + total
        for orig, cur in mapping.items():
            if cur in (src, dst):
                mapping[orig] = new
    return mapping


def ar_histogram(width: np.ndarray, height: np.ndarray, bins: int) -> list[dict]:
    """Counts of log2(w/h) in `bins` equal bins over [-2, 2] (1:4 .. 4:1), outer bins open-ended."""
    log2 = np.log2(np.asarray(width, np.float64) / np.asarray(height, np.float64))
    edges = np.linspace(-2.0, 2.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, log2, side="right") - 1, 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    return [
        {
            "ar_from": None if i == 0 else round(2 ** edges[i], 4),
            "ar_to": None if i == bins - 1 else round(2 ** edges[i + 1], 4),
            "count": int(counts[i]),
        }
        for i in range(bins)
    ]


@dataclass
class Assignment:
    """Per kept sample (arrays aligned with `ids`), plus rejects and the bucket bookkeeping."""

    ids: np.ndarray
    width: np.ndarray
    height: np.ndarray
    bucket_w: np.ndarray
    bucket_h: np.ndarray
    resize_w: np.ndarray
    resize_h: np.ndarray
    crop_left: np.ndarray
    crop_top: np.ndarray
    crop_right: np.ndarray
    crop_bottom: np.ndarray
    flip: np.ndarray
    rejects: list[dict]  # {"id", "reason", "detail"}
    initial_counts: dict[Bucket, int]  # before merging / dropping small buckets
    mapping: dict[Bucket, Bucket]  # initial bucket -> final bucket (dropped buckets absent)

    def final_counts(self) -> dict[Bucket, int]:
        out: dict[Bucket, int] = {}
        for w, h in zip(self.bucket_w.tolist(), self.bucket_h.tolist()):
            b = Bucket(w, h)
            out[b] = out.get(b, 0) + 1
        return dict(sorted(out.items()))


def _fmt(v: float) -> str:
    return "null" if not np.isfinite(v) else str(int(v))


def assign(ids: np.ndarray, width: np.ndarray, height: np.ndarray, cfg: BucketConfig,
           buckets: list[Bucket] | None = None) -> Assignment:
    """Bucket, resize size, crop box and flip flag for every image; bad ones become rejects.

    Reasons: bad_size (missing or non-positive size), too_small (short side < min_image_side with
    small_images=reject, or no bucket fits without upscaling), aspect_ratio (beyond
    max_log_ar_error), small_bucket (small_buckets=drop).
    """
    ids = np.asarray(ids, np.int64)
    w = np.asarray(width, np.float64)  # float so missing sizes can arrive as NaN
    h = np.asarray(height, np.float64)
    rejects: list[dict] = []
    keep = np.ones(len(ids), bool)

    def reject(mask: np.ndarray, reason: str, detail) -> None:
        nonlocal keep
        for i in np.flatnonzero(mask & keep):
            rejects.append({"id": int(ids[i]), "reason": reason, "detail": detail(i)})
        keep &= ~mask

    with np.errstate(invalid="ignore"):
        reject(~(np.isfinite(w) & np.isfinite(h) & (w > 0) & (h > 0)), "bad_size",
               lambda i: f"image size {_fmt(w[i])}x{_fmt(h[i])} is missing or not positive")
        if cfg.small_images == "reject":
            reject(np.minimum(w, h) < cfg.min_image_side, "too_small",
                   lambda i: f"{int(w[i])}x{int(h[i])}: short side below min_image_side {cfg.min_image_side}")
    ok_w = np.where(keep, w, 1.0)
    ok_h = np.where(keep, h, 1.0)

    if cfg.no_upscale:
        upscale_to = cfg.min_image_side if cfg.small_images == "upscale" else 0
        bw, bh = no_upscale_buckets(ok_w, ok_h, cfg, upscale_to)
        reject((bw < cfg.step) | (bh < cfg.step), "too_small",
               lambda i: f"{int(w[i])}x{int(h[i])}: no bucket of step {cfg.step} fits without upscaling")
    else:
        buckets = buckets or make_buckets(cfg)
        idx = nearest_bucket(ok_w, ok_h, buckets)
        bw = np.array([b.width for b in buckets], np.int64)[idx]
        bh = np.array([b.height for b in buckets], np.int64)[idx]
    if cfg.max_log_ar_error is not None:
        err = np.abs(np.log(ok_w / ok_h) - np.log(np.maximum(bw, 1) / np.maximum(bh, 1)))
        reject(err > cfg.max_log_ar_error, "aspect_ratio",
               lambda i: f"{int(w[i])}x{int(h[i])}: nearest bucket {bw[i]}x{bh[i]} is {err[i]:.3f} away in "
                         f"log aspect ratio (max_log_ar_error {cfg.max_log_ar_error})")

    initial: dict[Bucket, int] = {}
    for bwi, bhi in zip(bw[keep].tolist(), bh[keep].tolist()):
        b = Bucket(bwi, bhi)
        initial[b] = initial.get(b, 0) + 1
    initial = dict(sorted(initial.items()))
    threshold = cfg.bucket_threshold
    if cfg.small_buckets == "merge":
        mapping = merge_small_buckets(initial, threshold, cfg.no_upscale)
    elif cfg.small_buckets == "drop":
        mapping = {b: b for b, n in initial.items() if n >= threshold}
        small = np.array([Bucket(int(a), int(c)) not in mapping for a, c in zip(bw, bh)])
        reject(small, "small_bucket",
               lambda i: f"bucket {bw[i]}x{bh[i]} has {initial[Bucket(int(bw[i]), int(bh[i]))]} samples, "
                         f"fewer than {threshold} (small_buckets=drop)")
    else:
        mapping = {b: b for b in initial}
    if mapping:
        keys = list(mapping)
        lut = {(b.width, b.height): k for k, b in enumerate(keys)}
        final = [mapping[b] for b in keys]
        code = np.array([lut.get((a, c), -1) for a, c in zip(bw.tolist(), bh.tolist())])
        fw = np.array([b.width for b in final], np.int64)
        fh = np.array([b.height for b in final], np.int64)
        bw = np.where(keep, fw[np.maximum(code, 0)], bw)
        bh = np.where(keep, fh[np.maximum(code, 0)], bh)

    k = keep
    kid, kw, kh, kbw, kbh = ids[k], ok_w[k], ok_h[k], bw[k], bh[k]
    rw, rh = resize_to_cover(kw, kh, kbw, kbh)
    if cfg.crop == "random":
        box = crop_boxes(rw, rh, kbw, kbh, hash_uniform(kid, cfg.seed, "crop_x"), hash_uniform(kid, cfg.seed, "crop_y"))
    else:
        box = crop_boxes(rw, rh, kbw, kbh)
    flip = hash_uniform(kid, cfg.seed, "flip") < cfg.flip_prob
    rejects.sort(key=lambda r: r["id"])
    return Assignment(
        kid, kw.astype(np.int64), kh.astype(np.int64), kbw, kbh, rw, rh, *box, flip,
        rejects, initial, mapping,
    )


SELECT_RULES = ("quality_label", "rating", "min_pixels", "min_side", "require_tags", "exclude_tags")


@dataclass
class Selection:
    """Result of select_posts, aligned with its input rows."""

    mask: np.ndarray  # True = selected
    reasons: list[str]  # "" for a selected row, else every rule it fails, "; "-joined
    rule_counts: dict[str, int]  # rows failing each rule that is set (a row may fail several)

    @property
    def selected(self) -> int:
        return int(self.mask.sum())


def selection_columns(sel: BucketSelect) -> tuple[list[str], list[str]]:
    """(quality columns, ingest posts columns) that select_posts needs beyond id, width and height."""
    quality = ["label"] if sel.quality_labels else []
    posts = (["rating"] if sel.ratings else []) + (list(TAG_COLUMNS) if sel.require_tags or sel.exclude_tags else [])
    return quality, posts


def _in(values, allowed: list[str], n: int) -> tuple[np.ndarray, list]:
    """(value in allowed, values as a list) for a string column (pyarrow or sequence); null is never in."""
    if values is None:
        values = pa.nulls(n, pa.string())
    elif not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(list(values), pa.string())
    found = pc.fill_null(pc.is_in(values, value_set=pa.array(allowed, pa.string())), False)
    return found.to_numpy(zero_copy_only=False).astype(bool), values.to_pylist()


def _has_tag(tag_columns: list, tags: list[str], n: int) -> dict[str, np.ndarray]:
    """Per tag, whether each row lists it in any of the list<string> tag columns (nulls: no tags)."""
    has = {t: np.zeros(n, bool) for t in tags}
    for col in tag_columns:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        elif not isinstance(col, pa.Array):
            col = pa.array(list(col), pa.list_(pa.string()))
        parents = pc.list_parent_indices(col).to_numpy()
        flat = pc.list_flatten(col)
        for t in tags:
            hit = pc.fill_null(pc.equal(flat, t), False).to_numpy(zero_copy_only=False)
            has[t][parents[hit]] = True
    return has


def select_posts(
    sel: BucketSelect,
    width: np.ndarray,
    height: np.ndarray,
    label=None,
    rating=None,
    tags: list | None = None,
) -> Selection:
    """Which rows the phase's data selection keeps, and why each other row is left out.

    Arrays are aligned (one entry per post): width/height of the original (NaN when unknown; such a
    post passes the size rules and is left to the bucketing's bad_size check), the quality label,
    the rating, and the tag columns (list<string> arrays, e.g. the ingest posts' TAG_COLUMNS). A
    column only has to be given when its rule is set (see selection_columns).
    """
    w = np.asarray(width, np.float64)
    h = np.asarray(height, np.float64)
    n = len(w)
    fails: dict[str, np.ndarray] = {}  # rule -> failing rows
    details: list[tuple[str, np.ndarray, object]] = []  # (rule, failing rows, detail(i))

    def rule(name: str, failing: np.ndarray, detail) -> None:
        fails[name] = fails.get(name, np.zeros(n, bool)) | failing
        details.append((name, failing, detail))

    if sel.quality_labels:
        ok, labels = _in(label, sel.quality_labels, n)
        allowed = f"[{', '.join(sel.quality_labels)}]"
        rule("quality_label", ~ok,
             lambda i: f"quality_label {labels[i]!r} not in {allowed}")
    if sel.ratings:
        ok, ratings = _in(rating, sel.ratings, n)
        allowed_r = f"[{', '.join(sel.ratings)}]"
        rule("rating", ~ok,
             lambda i: f"rating {ratings[i]!r} not in {allowed_r}")
    known = np.isfinite(w) & np.isfinite(h)
    with np.errstate(invalid="ignore"):
        if sel.min_pixels:
            rule("min_pixels", known & (w * h < sel.min_pixels),
                 lambda i: f"{int(w[i])}x{int(h[i])} < min_pixels {sel.min_pixels}")
        if sel.min_side:
            rule("min_side", known & (np.minimum(w, h) < sel.min_side),
                 lambda i: f"{int(w[i])}x{int(h[i])}: short side < min_side {sel.min_side}")
    if sel.require_tags or sel.exclude_tags:
        if tags is None:
            raise ValueError("select_posts: require_tags/exclude_tags need the tag columns")
        has = _has_tag(tags, sel.require_tags + sel.exclude_tags, n)
        for t in sel.require_tags:
            rule("require_tags", ~has[t], lambda i, t=t: f"lacks tag {t!r}")
        for t in sel.exclude_tags:
            rule("exclude_tags", has[t], lambda i, t=t: f"has excluded tag {t!r}")

    out = np.zeros(n, bool)
    for failing in fails.values():
        out |= failing
    per_row: dict[int, list[str]] = {}
    for _, failing, detail in details:
        for i in np.flatnonzero(failing).tolist():
            per_row.setdefault(i, []).append(detail(i))
    reasons = [""] * n
    for i, texts in per_row.items():
        reasons[i] = "; ".join(texts)
    counts = {r: int(fails[r].sum()) for r in SELECT_RULES if r in fails}
    return Selection(~out, reasons, counts)
