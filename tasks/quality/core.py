"""Pure quality logic: within-year normalisation of popularity signals and the four-label split.

Inputs are numpy arrays of equal length (rows sorted by id by the caller, so results do not depend
on input order). Nothing here reads or writes files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from data_contracts.quality import QUALITY_LABELS

K = len(QUALITY_LABELS)


@dataclass(frozen=True)
class YearGroup:
    first: int
    last: int
    count: int

    @property
    def name(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def pool_years(years: np.ndarray, min_posts: int) -> list[YearGroup]:
    """Group consecutive years so every group has >= min_posts rows (when the data allows).

    The smallest group (earliest on ties) merges with its smaller neighbour (earlier on ties),
    until every group is large enough or one group is left.
    """
    uniq, counts = np.unique(np.asarray(years), return_counts=True)
    groups = [[int(y), int(y), int(c)] for y, c in zip(uniq, counts)]
    while len(groups) > 1:
        i = min(range(len(groups)), key=lambda j: (groups[j][2], j))
        if groups[i][2] >= min_posts:
            break
        if i == 0:
            j = 1
        elif i == len(groups) - 1:
            j = i - 1
        else:
            j = i - 1 if groups[i - 1][2] <= groups[i + 1][2] else i + 1
        a, b = sorted((i, j))
        groups[a] = [groups[a][0], groups[b][1], groups[a][2] + groups[b][2]]
        del groups[b]
    return [YearGroup(*g) for g in groups]


def group_index(years: np.ndarray, groups: list[YearGroup]) -> np.ndarray:
    """The index into `groups` of every row's year."""
    lasts = np.array([g.last for g in groups])
    return np.searchsorted(lasts, np.asarray(years), side="left")


def percentile_rank(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Mid-rank percentile (rank - 0.5) / n within each group, in (0, 1); ties share their mean rank."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty(len(values), dtype=np.float64)
    for g in np.unique(group):
        mask = group == g
        out[mask] = (rankdata(values[mask], method="average") - 0.5) / mask.sum()
    return out


@dataclass
class Normalised:
    ranks: dict[str, np.ndarray]  # signal or extra feature -> within-year percentile rank
    norm_score: np.ndarray  # within-year percentile of the weighted mean of the signal ranks
    features: np.ndarray  # (n, d) weighted ranks, the kmeans input
    feature_names: list[str]


def normalise(
    signals: dict[str, np.ndarray],
    weights: dict[str, float],
    group: np.ndarray,
    extras: dict[str, np.ndarray] | None = None,
    extra_weights: dict[str, float] | None = None,
) -> Normalised:
    extras, extra_weights = extras or {}, extra_weights or {}
    ranks = {name: percentile_rank(signals[name], group) for name in weights}
    ranks.update({name: percentile_rank(extras[name], group) for name in extra_weights})
    total = sum(weights.values())
    popularity = sum(weights[name] * ranks[name] for name in weights) / total
    norm_score = percentile_rank(popularity, group)
    names = [*weights, *extra_weights]
    all_weights = {**weights, **extra_weights}
    features = np.stack([all_weights[n] * ranks[n] for n in names], axis=1)
    return Normalised(ranks, norm_score, features, names)


@dataclass
class Labelling:
    method: str  # the method actually used (kmeans falls back to percentile on degenerate input)
    cluster: np.ndarray  # int, 0 = worst .. 3 = best
    centres: list[dict[str, float]] = field(default_factory=list)  # per cluster, feature -> centre
    note: str = ""


def percentile_clusters(norm_score: np.ndarray, cuts: tuple[float, float, float]) -> np.ndarray:
    """0 below cuts[0], 1 in [cuts[0], cuts[1]), 2 in [cuts[1], cuts[2]), 3 at or above cuts[2]."""
    return np.searchsorted(np.asarray(cuts), norm_score, side="right").astype(np.int8)


def kmeans_clusters(
    features: np.ndarray, norm_score: np.ndarray, feature_names: list[str], seed: int, n_init: int
) -> Labelling:
    """KMeans(k=4) on the weighted ranks; clusters renumbered by mean norm_score (0 = worst)."""
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=K, random_state=seed, n_init=n_init)
    raw = model.fit_predict(features)
    means = np.array([norm_score[raw == c].mean() for c in range(K)])
    order = sorted(range(K), key=lambda c: (means[c], float(model.cluster_centers_[c].sum()), c))
    remap = np.empty(K, dtype=np.int8)
    remap[order] = np.arange(K, dtype=np.int8)
    centres = [
        {name: float(v) for name, v in zip(feature_names, model.cluster_centers_[c])} for c in order
    ]
    return Labelling("kmeans", remap[raw], centres)


def label_samples(
    norm: Normalised, method: str, cuts: tuple[float, float, float], seed: int, n_init: int
) -> Labelling:
    if method == "percentile":
        return Labelling("percentile", percentile_clusters(norm.norm_score, cuts))
    distinct = len(np.unique(norm.features, axis=0))
    if distinct < K:
        # KMeans cannot make four clusters out of fewer distinct points: say so and use the cuts.
        note = f"kmeans needs >= {K} distinct feature rows, found {distinct}; used percentile cuts"
        return Labelling("percentile", percentile_clusters(norm.norm_score, cuts), note=note)
    return kmeans_clusters(norm.features, norm.norm_score, norm.feature_names, seed, n_init)


def boundaries(norm_score: np.ndarray, cluster: np.ndarray) -> list[dict[str, float | int | str]]:
    """Per label: count and the min / mean / max norm_score (what a cut point would be)."""
    rows = []
    for c, label in enumerate(QUALITY_LABELS):
        vals = norm_score[cluster == c]
        rows.append(
            {
                "cluster": c,
                "label": label,
                "count": int(len(vals)),
                "norm_min": float(vals.min()) if len(vals) else None,
                "norm_mean": float(vals.mean()) if len(vals) else None,
                "norm_max": float(vals.max()) if len(vals) else None,
            }
        )
    return rows


def example_indices(norm_score: np.ndarray, cluster: np.ndarray, per_label: int) -> dict[int, list[int]]:
    """Row indices spread evenly over each label's norm_score range (deterministic)."""
    out: dict[int, list[int]] = {}
    for c in range(K):
        idx = np.flatnonzero(cluster == c)
        if per_label == 0 or len(idx) == 0:
            out[c] = []
            continue
        idx = idx[np.argsort(norm_score[idx], kind="stable")]
        picks = np.unique(np.linspace(0, len(idx) - 1, min(per_label, len(idx))).round().astype(int))
        out[c] = [int(i) for i in idx[picks][::-1]]  # best first
    return out
