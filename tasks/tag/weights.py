"""Tag-rarity loss weight: up-weight samples of rare concepts, bounded, mean exactly 1.

For sample i and each concept category k in `categories` (character, artist, copyright) where it has tags:
    c_ik = min over its tags t in k of count_k(t)        (count = samples of the final dataset with t;
                                                          the rarest concept of the category decides)
    f(c) = c ** -alpha            (method power; alpha 0.5 = inverse square root)
         = 1 / log2(1 + c)        (method log; gentler)
    raw_i = geometric mean over its present categories of f(c_ik)
A sample with none of those tags falls back to its general tags (f of the geometric mean of their
counts: general tags are weak evidence of a concept, so no single rare one decides), or — with
fallback none or no tags at all — to the median raw weight (neutral).
Then w_i = clip(s · raw_i, low, high) with the scale s found by bisection so that mean(w) = 1: this is
the fixed point of "clip, renormalise, repeat", reached exactly, so both the bounds and the mean hold.
Method none gives every sample 1.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

CONCEPT_CATEGORIES = ("character", "artist", "copyright")


@dataclass
class WeightResult:
    weights: np.ndarray  # float64 [N], mean 1, within bounds
    raw: np.ndarray  # float64 [N] before normalisation
    source: list[str]  # per sample: "concepts" | "general" | "neutral"
    counts: dict[str, Counter] = field(default_factory=dict)  # category -> tag -> samples


def log_f(count: float, method: str, alpha: float) -> float:
    """log f(count): power -> -alpha·log c; log -> -log(log2(1 + c)); none -> 0."""
    count = max(float(count), 1.0)
    if method == "power":
        return -alpha * math.log(count)
    if method == "log":
        return -math.log(math.log2(1.0 + count))
    return 0.0


def normalise_bounded(raw: np.ndarray, low: float, high: float, iters: int = 200) -> np.ndarray:
    """clip(s·raw, low, high) with mean exactly 1 (needs low <= 1 <= high and raw > 0)."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.size == 0:
        return raw.copy()
    if not (0 < low <= 1 <= high):
        raise ValueError(f"bounds must satisfy 0 < low <= 1 <= high, found ({low}, {high})")
    if np.any(raw <= 0) or not np.all(np.isfinite(raw)):
        raise ValueError("raw weights must be positive and finite")
    lo_s, hi_s = math.log(low / raw.max()), math.log(high / raw.min())  # mean = low ... mean = high
    for _ in range(iters):  # mean(clip(e^x · raw)) is continuous and non-decreasing in x
        mid = (lo_s + hi_s) / 2
        if np.clip(math.exp(mid) * raw, low, high).mean() < 1.0:
            lo_s = mid
        else:
            hi_s = mid
    w = np.clip(math.exp((lo_s + hi_s) / 2) * raw, low, high)
    # Remove the last rounding residue on the unclipped samples without leaving the bounds.
    free = (w > low) & (w < high)
    if free.any():
        w[free] = np.clip(w[free] + (len(w) - w.sum()) / free.sum(), low, high)
    return w


def compute_weights(concepts: dict[str, Sequence[Sequence[str]]], general: Sequence[Sequence[str]],
                    cfg: Any) -> WeightResult:
    """concepts: category -> per-sample tag lists (character from the merged tags, artist/copyright
    from the posts); general: per-sample merged general tags; cfg: TagWeightConfig."""
    n = len(general)
    counts = {cat: Counter(t for tags in concepts.get(cat, [[]] * n) for t in set(tags or ()))
              for cat in CONCEPT_CATEGORIES}
    counts["general"] = Counter(t for tags in general for t in set(tags or ()))
    low, high = cfg.bounds
    if cfg.method == "none" or n == 0:
        return WeightResult(np.ones(n), np.ones(n), ["neutral"] * n, counts)
    log_raw = np.full(n, np.nan)
    source = ["neutral"] * n
    per_cat = {cat: concepts.get(cat) or [[]] * n for cat in cfg.categories}
    for i in range(n):
        logs = []
        for cat in cfg.categories:
            tags = set(per_cat[cat][i] or ())
            if tags:
                rarest = min(counts[cat][t] for t in tags)
                logs.append(log_f(rarest, cfg.method, cfg.alpha))
        if logs:
            log_raw[i], source[i] = float(np.mean(logs)), "concepts"
        elif cfg.fallback == "general" and general[i]:
            geo = math.exp(np.mean([math.log(counts["general"][t]) for t in set(general[i])]))
            log_raw[i], source[i] = log_f(geo, cfg.method, cfg.alpha), "general"
    known = ~np.isnan(log_raw)
    log_raw[~known] = float(np.median(log_raw[known])) if known.any() else 0.0
    raw = np.exp(log_raw - log_raw.max())  # scale-free; keep it in (0, 1] for float safety
    return WeightResult(normalise_bounded(raw, low, high), raw, source, counts)


def weight_tables(result: WeightResult, concepts: dict[str, Sequence[Sequence[str]]], bounds: tuple[float, float],
                  top: int = 20, bins: int = 12) -> dict[str, list[dict[str, Any]]]:
    """Report tables: weight histogram and the concepts with the highest / lowest mean weight."""
    w = result.weights
    low, high = bounds
    edges = np.linspace(low, high, bins + 1)
    hist, _ = np.histogram(np.clip(w, low, high), bins=edges)
    histogram = [{"from": round(float(a), 3), "to": round(float(b), 3), "samples": int(c)}
                 for a, b, c in zip(edges[:-1], edges[1:], hist)]
    sums: dict[tuple[str, str], list[float]] = {}
    for cat in CONCEPT_CATEGORIES:
        for i, tags in enumerate(concepts.get(cat, [])):
            for t in set(tags or ()):
                acc = sums.setdefault((cat, t), [0.0, 0])
                acc[0] += float(w[i])
                acc[1] += 1
    rows = [{"concept": t, "category": cat, "samples": int(k), "mean_weight": round(s / k, 4)}
            for (cat, t), (s, k) in sums.items()]
    rows.sort(key=lambda r: (-r["mean_weight"], r["samples"], r["concept"]))
    bottom = sorted(rows, key=lambda r: (r["mean_weight"], -r["samples"], r["concept"]))[:top]
    return {"weight_histogram": histogram, "top_weight_concepts": rows[:top], "bottom_weight_concepts": bottom}


def weight_stats(result: WeightResult, bounds: tuple[float, float]) -> dict[str, Any]:
    w = result.weights
    if w.size == 0:
        return {"n": 0}
    low, high = bounds
    return {
        "n": int(w.size), "mean": float(w.mean()), "std": float(w.std()), "min": float(w.min()),
        "max": float(w.max()), "p05": float(np.quantile(w, 0.05)), "p50": float(np.median(w)),
        "p95": float(np.quantile(w, 0.95)), "at_low": int(np.sum(w <= low + 1e-9)),
        "at_high": int(np.sum(w >= high - 1e-9)),
        "source": dict(Counter(result.source)),
    }
