"""Near-duplicate groups from 64-bit perceptual hashes: a multi-index Hamming search, union-find, one
representative per group.

Search (`near_pairs`): multi-index hashing. The 64 bits are cut into m chunks of b_i bits and every chunk
gets a radius r_i with sum(r_i + 1) >= d + 1, so by the pigeonhole principle two hashes within Hamming
distance d agree to within r_i bits on at least one chunk i. Per chunk, a bucket table over the chunk's
value (a counting sort, 2^b_i buckets) is probed with every flip of at most r_i bits of each hash's own
chunk value; what a probe finds is verified with a popcount of the full 64-bit XOR. A pair is kept only by
the first chunk where it is within radius, so each pair comes out exactly once, without a global unique.
`plan_chunks` picks m and the radii from a cost model (probes ~ n * sum V(b_i, r_i), candidates
~ n^2 * sum V(b_i, r_i) / 2^b_i); for 260k hashes and d = 8 that is 3 chunks of 21-22 bits with radius 2
(~230 probes a hash and chunk, ~2e7 candidates): 1-2 s on one core where all pairs would be 3.4e10 XORs
(~80 s). d = 6 takes ~1 s, d = 10 ~6 s, d = 12 ~15 s.

Groups (`find_groups`): the pairs within `max_distance`, plus Danbooru parent/child links within the looser
`parent_distance` (a child that its uploader or a gardener linked to its parent is a known relative, so a
bigger difference -- a crop, a revision, a resize with a new border -- is still the same picture), are the
edges of a graph whose connected components are the groups (single linkage, as union-find over the edges
forms them; scipy's connected_components does the union-find in C). A chain a~b~c can put two posts further
apart than max_distance in one group: each post's `distance` to its representative says how far.

Representative of a group (the one post kept): the highest score, then the larger resolution
(width * height), then the newest post (the highest id). Posts without a hash are singletons.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from tasks.dedup.hashing import hamming, popcount

# pHash bits (of 64). Measured with bench/bench_dedup.py (150 generated pictures, fast path, original PNG vs
# edited re-upload; 11,175 distinct pairs), share of pairs within 4 / 6 / 8 / 10 bits:
#   re-encodes (JPEG q92..q40), resizes, hue shifts, desaturation   >= 99.3% at every one of them
#   crop 2% off one edge                                            80 / 91 / 94 / 97%
#   crop 4% off one edge                                            48 / 80 / 93 / 99%
#   crop 3% off every edge                                          39 / 71 / 88 / 99%
#   crop 6% off one edge                                            15 / 29 / 57 / 75%   (at 12 bits: 93%)
#   distinct pictures                                            0.036 / 0.089 / 0.134 / 0.206%
# Distinct pictures that close are the same silhouette in the same place (one character, same composition,
# flat background): pHash's 64 bits are mostly the low-frequency layout. False pairs grow with n^2 and
# chain through union-find, while a re-upload (re-encode, resize, recolour) stays within 4-6 bits, so the
# search distance is 6. Edited versions (crops, revisions) are usually linked on Danbooru as parent/child;
# a linked pair may differ by up to 12 bits (crops of 3-4%: 99-100%, of 6%: 93%).
DEFAULT_MAX_DISTANCE = 6
DEFAULT_PARENT_DISTANCE = 12
MAX_PROBES = 100_000  # flips a chunk: a plan above this is refused (plan_chunks never makes one)
MAX_TABLE_BITS = 24  # a chunk wider than this is looked up by binary search instead of a bucket table
# cost model, ns on one core of a 2020s x86 (measured at 260k hashes): a probe pass costs per hash ~4 ns
# when the bucket table fits in L2 (<= 2^18 buckets), ~8 ns above, ~50 ns by binary search (wide chunks);
# a candidate pair ~12 ns to expand and verify; all pairs ~2.5 ns a pair
_PROBE_COST_SMALL, _PROBE_COST_LARGE, _PROBE_COST_WIDE = 4.0, 8.0, 50.0
_CANDIDATE_COST = 12.0
_BRUTE_COST = 2.5

# --- planning -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    shift: int  # the chunk is (h >> shift) & ((1 << bits) - 1)
    bits: int
    radius: int

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


def ball_size(bits: int, radius: int) -> int:
    """Number of values within Hamming distance `radius` of a `bits`-bit value."""
    return sum(math.comb(bits, k) for k in range(min(radius, bits) + 1))


def _chunks(m: int, d: int) -> list[Chunk]:
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    need = d + 1 - m  # sum of radii so that sum(r_i + 1) >= d + 1
    radii = [need // m + (1 if i < need % m else 0) for i in range(m)]  # wider chunks get the extra bit
    out, shift = [], 64
    for b, r in zip(widths, radii):
        shift -= b
        out.append(Chunk(shift, b, r))
    return out


def chunk_cost(n: int, chunks: list[Chunk]) -> float:
    """Estimated ns to search n uniform random hashes with this plan."""
    cost = 0.0
    for c in chunks:
        probes = ball_size(c.bits, c.radius)
        per_hash = (_PROBE_COST_SMALL if c.bits <= 18 else _PROBE_COST_LARGE if c.bits <= MAX_TABLE_BITS
                    else _PROBE_COST_WIDE)
        cost += probes * (per_hash * n + _CANDIDATE_COST * n * n / 2.0**c.bits)
        cost += 2.0**c.bits if c.bits <= MAX_TABLE_BITS else 0.0
    return cost


def plan_chunks(n: int, max_distance: int) -> list[Chunk] | None:
    """The cheapest chunking for n hashes and distance d, or None when all pairs is cheaper (small n)."""
    d = int(max_distance)
    best, best_cost = None, _BRUTE_COST * n * (n - 1) / 2.0
    for m in range(1, min(d + 1, 16) + 1):
        chunks = _chunks(m, d)
        if any(ball_size(c.bits, c.radius) > MAX_PROBES for c in chunks):
            continue
        cost = chunk_cost(n, chunks)
        if cost < best_cost:
            best, best_cost = chunks, cost
    return best


def _flips(bits: int, radius: int) -> np.ndarray:
    """All values of weight <= radius within `bits` bits (0 first)."""
    vals = [0]
    for k in range(1, min(radius, bits) + 1):
        vals += [sum(1 << p for p in pos) for pos in combinations(range(bits), k)]
    return np.array(vals, dtype=np.uint64)


# --- search ---------------------------------------------------------------------------------------------
def _pairs_out(i: list[np.ndarray], j: list[np.ndarray], dist: list[np.ndarray]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    ii, jj, dd = np.concatenate(i), np.concatenate(j), np.concatenate(dist)
    order = np.lexsort((jj, ii))
    return ii[order], jj[order], dd[order]


def brute_force_pairs(hashes: np.ndarray, max_distance: int, block: int = 64
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with hamming(h_i, h_j) <= d, by blockwise all-pairs XOR (O(n^2); reference and
    small inputs). Returns (i, j, distance) sorted by (i, j)."""
    h = np.ascontiguousarray(hashes, np.uint64)
    n = len(h)
    out_i, out_j, out_d = [], [], []
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        dist = hamming(h[lo:hi, None], h[None, lo + 1:])  # [rows, n - lo - 1]; column c is index lo + 1 + c
        r, c = np.nonzero(dist <= max_distance)
        i, j = lo + r, lo + 1 + c
        keep = j > i
        out_i.append(i[keep])
        out_j.append(j[keep])
        out_d.append(dist[r[keep], c[keep]])
    return _pairs_out(out_i, out_j, out_d)


def near_pairs(hashes: np.ndarray, max_distance: int, chunks: list[Chunk] | None = None, *, force_index: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of `hashes` (uint64 [n]) within Hamming distance `max_distance`, by multi-index
    hashing (see the module doc). Returns (i, j, distance) sorted by (i, j); equal to brute_force_pairs.
    `chunks`: a plan (default plan_chunks; force_index: never fall back to all pairs for small n)."""
    h = np.ascontiguousarray(hashes, np.uint64)
    n = len(h)
    d = int(max_distance)
    if n < 2 or d < 0:
        return _pairs_out([], [], [])
    if chunks is None:
        chunks = plan_chunks(n, d)
        if chunks is None and force_index:
            plans = [_chunks(m, d) for m in range(1, min(d + 1, 16) + 1)]
            plans = [p for p in plans if all(ball_size(c.bits, c.radius) <= MAX_PROBES for c in p)]
            chunks = min(plans, key=lambda p: chunk_cost(n, p))
    if chunks is None:
        return brute_force_pairs(h, d)
    if sum(c.radius + 1 for c in chunks) < d + 1 or sum(c.bits for c in chunks) != 64:
        raise ValueError(f"chunk plan {chunks} does not cover distance {d}")
    if any(ball_size(c.bits, c.radius) > MAX_PROBES for c in chunks):
        raise ValueError(f"chunk plan {chunks}: more than {MAX_PROBES:,} probes a chunk")

    out_i, out_j, out_d = [], [], []
    for ci, c in enumerate(chunks):
        key = (h >> np.uint64(c.shift)) & np.uint64(c.mask)
        table = c.bits <= MAX_TABLE_BITS
        if table:
            key = key.astype(np.int64)
        # Work in key order: hash p of the sorted list is row order[p]. Probing the sorted keys (key ^ flip)
        # walks the table almost in order, which keeps the lookups in cache (~10x faster than row order).
        order = np.argsort(key, kind="stable")
        skey = key[order]
        hs = h[order]
        if table:
            counts = np.bincount(key, minlength=1 << c.bits)
            offsets = np.zeros(1 << c.bits, np.int64)
            np.cumsum(counts[:-1], out=offsets[1:])
            # one int32 a bucket: -1 empty; >= 0 the position of its only hash (the common case);
            # <= -2 a bucket of several, starting at position -2 - value
            slot = np.where(counts == 1, offsets, np.where(counts > 1, -2 - offsets, -1)).astype(np.int32)
            probe_keys = skey.astype(np.int32)
        for flip in _flips(c.bits, c.radius):
            if table:
                probe = probe_keys ^ np.int32(flip)
                found = slot[probe]
                hit = np.flatnonzero(found != -1)
                if len(hit) == 0:
                    continue
                found = found[hit].astype(np.int64)
                one = found >= 0
                pi, pj = hit[one], found[one]
                if not one.all():
                    many = hit[~one]
                    lo, count = -2 - found[~one], counts[probe[many]]
                else:
                    many = None
            else:  # a wide chunk (only a plan for d = 0 makes one): binary search in the sorted keys
                probe = skey ^ flip
                lo = np.searchsorted(skey, probe, "left")
                count = np.searchsorted(skey, probe, "right") - lo
                many = np.flatnonzero(count)
                lo, count = lo[many], count[many]
                pi = pj = np.zeros(0, np.int64)
            if many is not None and len(many):
                total = int(count.sum())
                start = np.repeat(np.cumsum(count) - count, count)  # where each run begins in the output
                pi = np.concatenate([pi, np.repeat(many, count)])
                pj = np.concatenate([pj, np.repeat(lo, count) + (np.arange(total, dtype=np.int64) - start)])
            keep = pj > pi  # each unordered pair is probed from both ends; a hash meets itself at flip 0
            pi, pj = pi[keep], pj[keep]
            x = hs[pi] ^ hs[pj]
            dist = popcount(x)
            keep = dist <= d
            for prev in chunks[:ci]:  # found by an earlier chunk already?
                if not keep.any():
                    break
                keep &= popcount((x >> np.uint64(prev.shift)) & np.uint64(prev.mask)) > prev.radius
            if keep.any():
                ri, rj = order[pi[keep]], order[pj[keep]]
                out_i.append(np.minimum(ri, rj))
                out_j.append(np.maximum(ri, rj))
                out_d.append(dist[keep])
    return _pairs_out(out_i, out_j, out_d)


# --- groups ---------------------------------------------------------------------------------------------
@dataclass
class DedupGroups:
    """Per post (the order of the input): its group, whether it is the group's kept representative,
    its pHash distance to the representative (-1: no hash) and the group's size; plus the edges."""

    ids: np.ndarray  # int64: the posts' ids, as given
    group: np.ndarray  # int64: the representative's post id (a singleton's own id)
    kept: np.ndarray  # bool: True for exactly one post per group
    distance: np.ndarray  # int16: hamming(post, representative); 0 for the representative, -1 without a hash
    size: np.ndarray  # int32: posts in the group
    pair_i: np.ndarray  # int64 row indices of the edges (i < j) ...
    pair_j: np.ndarray
    pair_distance: np.ndarray  # uint8
    pair_parent: np.ndarray  # bool: the edge came from a parent/child link (beyond max_distance)
    max_distance: int
    parent_distance: int

    @property
    def n_groups(self) -> int:
        """Groups of two or more posts."""
        return int(np.count_nonzero(self.kept & (self.size > 1)))

    @property
    def n_dropped(self) -> int:
        return int(np.count_nonzero(~self.kept))


def parent_pairs(ids: np.ndarray, parent_id: np.ndarray, hashes: np.ndarray, valid: np.ndarray,
                 parent_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (i, j), i < j, of child/parent posts that are both present and hashed, within parent_distance."""
    ids = np.asarray(ids, np.int64)
    parent = np.asarray(parent_id, np.float64)  # None -> NaN; Danbooru ids are far below 2^53
    has = np.isfinite(parent)
    parent = np.where(has, parent, -1).astype(np.int64)
    if len(ids) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids[order], parent)
    pos = np.minimum(pos, len(ids) - 1)
    found = has & (parent >= 0) & (ids[order][pos] == parent)
    child = np.flatnonzero(found)
    par = order[pos[found]]
    keep = valid[child] & valid[par] & (child != par)
    child, par = child[keep], par[keep]
    dist = hamming(hashes[child], hashes[par])
    keep = dist <= parent_distance
    i, j = np.minimum(child, par)[keep], np.maximum(child, par)[keep]
    return i, j, dist[keep]


def representative_order(score: np.ndarray, width: np.ndarray, height: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row indices best first by the representative rule: score desc, width*height desc, id desc
    (a missing score ranks below every score, a missing size as 0)."""
    s = np.asarray(score, np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)
    area = np.nan_to_num(np.asarray(width, np.float64)) * np.nan_to_num(np.asarray(height, np.float64))
    return np.lexsort((-np.asarray(ids, np.int64), -area, -s))


def find_groups(
    ids: np.ndarray,
    hashes: np.ndarray,
    score: np.ndarray,
    width: np.ndarray,
    height: np.ndarray,
    parent_id: np.ndarray | None = None,
    *,
    valid: np.ndarray | None = None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    parent_distance: int = DEFAULT_PARENT_DISTANCE,
) -> DedupGroups:
    """Near-duplicate groups of posts. One entry per post in each array: ids (unique), uint64 pHashes,
    score, width, height (None/NaN allowed: see representative_order) and Danbooru's parent_id (None/NaN
    or an id not among `ids`: no link). `valid`: posts that have a hash (default all); the others are
    singletons. See the module doc for the rule."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ids = np.asarray(ids, np.int64)
    hashes = np.asarray(hashes, np.uint64)
    n = len(ids)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if len(np.unique(ids)) != n:
        raise ValueError("post ids must be unique")
    if n == 0:
        empty = np.zeros(0, np.int64)
        return DedupGroups(ids, empty, np.zeros(0, bool), np.zeros(0, np.int16), np.zeros(0, np.int32), empty, empty,
                           np.zeros(0, np.uint8), np.zeros(0, bool), int(max_distance), int(parent_distance))
    rows = np.flatnonzero(valid)
    pi, pj, pd = near_pairs(hashes[rows], max_distance)
    pi, pj = rows[pi], rows[pj]
    via_parent = np.zeros(len(pi), bool)
    if parent_id is not None and parent_distance > max_distance:
        ci, cj, cd = parent_pairs(ids, parent_id, hashes, valid, parent_distance)
        extra = cd > max_distance  # closer pairs are edges already
        pi, pj, pd = (np.concatenate([pi, ci[extra]]), np.concatenate([pj, cj[extra]]),
                      np.concatenate([pd, cd[extra]]))
        via_parent = np.concatenate([via_parent, np.ones(int(extra.sum()), bool)])
    graph = coo_matrix((np.ones(len(pi), np.int8), (pi, pj)), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=False)

    best_first = representative_order(score, width, height, ids)
    rank = np.empty(n, np.int64)
    rank[best_first] = np.arange(n)
    # per label, the row with the smallest rank
    by_label = np.lexsort((rank, label))
    first = np.ones(n, bool)
    first[1:] = label[by_label][1:] != label[by_label][:-1]
    rep_of_label = np.empty(label.max() + 1 if n else 0, np.int64)
    rep_of_label[label[by_label][first]] = by_label[first]
    rep = rep_of_label[label]
    size = np.bincount(label, minlength=len(rep_of_label))[label].astype(np.int32)
    distance = hamming(hashes, hashes[rep]).astype(np.int16)
    distance[~valid] = -1
    return DedupGroups(ids=ids, group=ids[rep], kept=rep == np.arange(n), distance=distance, size=size,
                       pair_i=pi, pair_j=pj, pair_distance=pd.astype(np.uint8), pair_parent=via_parent,
                       max_distance=int(max_distance), parent_distance=int(parent_distance))
