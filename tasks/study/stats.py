"""The study's statistics, in plain numpy: hit rates with bootstrap intervals, steps to a level, differences.

The data are counts: for each arm, training seed, checkpoint step and concept, `hits` of `n` generated images
(the probe assigned the image to its own concept). One bootstrap replicate resamples the training seeds with
replacement — the same draw for both arms, so the arms stay paired by seed (same data order, same eval image
seeds) — and then the images of each drawn seed, as Binomial(n, hits/n) (a resample of Bernoulli images is fully
described by its count). Every derived number (a group's mean curve, an arm difference, steps to a level, a drop
from the base) is computed on each replicate, and its interval is the percentile interval over the replicates.

This two-stage ("hierarchical") bootstrap is conservative when seeds agree (the image noise is counted in the
seed spread and again within seeds), and with few seeds the between-seed spread is itself only roughly known:
the intervals say how far the data pin a number down, not more (tests/study/test_stats.py measures coverage).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    value: float  # the point estimate (all seeds and images pooled)
    lo: float
    hi: float

    def excludes(self, x: float = 0.0) -> bool:
        return bool(self.lo > x or self.hi < x)

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


def pooled_rates(hits: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Rates with seeds pooled: hits, n of shape [A, S, ...] -> [A, ...] (NaN where no image)."""
    total = n.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hits.sum(axis=1) / np.maximum(total, 1), np.nan)


def seed_draws(n_seeds: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, S] seed indices drawn with replacement (shared by every arm of a replicate)."""
    return rng.integers(0, n_seeds, size=(reps, n_seeds))


def bootstrap_rates(hits: np.ndarray, n: np.ndarray, draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replicate rates [B, A, ...] of counts [A, S, ...]: the drawn seeds, then Binomial images within each."""
    h = np.moveaxis(hits[:, draws], 1, 0)  # [B, A, S, ...]
    m = np.moveaxis(n[:, draws], 1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(m > 0, h / np.maximum(m, 1), 0.0)
    resampled = rng.binomial(m, p)
    total = m.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, resampled.sum(axis=2) / np.maximum(total, 1), np.nan)


def interval(point: float, replicates: np.ndarray, confidence: float = 0.95) -> Interval:
    """Percentile interval of replicates that may hold ±inf (a level never reached) and NaN (left out).

    Quantiles are taken as observed values ("inverted_cdf"), so an infinite bound stays infinite instead of
    turning into NaN by interpolation."""
    r = np.asarray(replicates, dtype=np.float64).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        return Interval(float(point), float("nan"), float("nan"))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(r, [alpha, 1.0 - alpha], method="inverted_cdf")
    return Interval(float(point), float(lo), float(hi))


def normalise(rates: np.ndarray, chance: np.ndarray) -> np.ndarray:
    """Chance-corrected rate (rate − chance) / (1 − chance): 0 = chance, 1 = every image hits. chance [C] is
    broadcast over the last axis; a concept whose chance is 1 (the only one of its kind) gives NaN."""
    c = np.asarray(chance, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c < 1.0, (rates - c) / np.where(c < 1.0, 1.0 - c, 1.0), np.nan)


def group_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over the concepts (last axis) selected by mask, ignoring NaN; NaN when none is left."""
    sel = values[..., np.asarray(mask, dtype=bool)]
    if sel.shape[-1] == 0:
        return np.full(values.shape[:-1], np.nan)
    with np.errstate(invalid="ignore"):
        ok = ~np.isnan(sel)
        count = ok.sum(axis=-1)
        return np.where(count > 0, np.where(ok, sel, 0.0).sum(axis=-1) / np.maximum(count, 1), np.nan)


def steps_to_level(curve: np.ndarray, steps: np.ndarray, level: float) -> np.ndarray:
    """The first step at which curve [..., T] reaches `level`, linearly interpolated between the checkpoints
    around the crossing; +inf where it never does (censored at the last checkpoint). steps [T] ascending."""
    steps = np.asarray(steps, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    flat = c.reshape(-1, c.shape[-1])
    out = np.full(len(flat), np.inf)
    for i, row in enumerate(flat):
        reached = np.flatnonzero(np.nan_to_num(row, nan=-np.inf) >= level)
        if reached.size == 0:
            continue
        t = int(reached[0])
        if t == 0 or not np.isfinite(row[t - 1]) or row[t] == row[t - 1]:
            out[i] = steps[t]
            continue
        frac = (level - row[t - 1]) / (row[t] - row[t - 1])
        out[i] = steps[t - 1] + float(np.clip(frac, 0.0, 1.0)) * (steps[t] - steps[t - 1])
    return out.reshape(c.shape[:-1])


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a − b where ±inf may occur (censored steps): inf − finite = inf, inf − inf = NaN (undecided)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)


def area_under(curve: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Mean height of curve [..., T] over the step range (trapezoids): the whole learning curve in one number."""
    steps = np.asarray(steps, dtype=np.float64)
    if len(steps) < 2 or steps[-1] == steps[0]:
        return np.asarray(curve)[..., -1]
    widths = np.diff(steps)
    mids = (curve[..., 1:] + curve[..., :-1]) / 2.0
    return (mids * widths).sum(axis=-1) / (steps[-1] - steps[0])
