"""Near-duplicate finder: the hash against its reference definition, robustness to booru edits, the
multi-index search against brute force, groups, the representative rule, the parent hint, bad files."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.dedup.groups import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_PARENT_DISTANCE,
    _chunks,
    ball_size,
    brute_force_pairs,
    find_groups,
    near_pairs,
    plan_chunks,
    representative_order,
)
from tasks.dedup.hashing import (
    REASONS,
    bits_to_uint64,
    chunk_bounds,
    hamming,
    hash_files,
    phash_image,
    start_workers,
    to_hex,
    worker_command,
)
from tests.dedup.images import EDITS, encode, scene_image

SEEDS = (11, 12, 13, 14, 15, 16)
SIZE = (600, 800)


# --- the reference definition (imagehash 4.3.2 phash, transcribed) -----------------------------------------
def reference_phash(img: Image.Image) -> int:
    from scipy.fftpack import dct

    pixels = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    coeffs = dct(dct(pixels, axis=0), axis=1)[:8, :8]
    bits = coeffs > np.median(coeffs)
    return int("".join(str(b) for b in 1 * bits.flatten()), 2)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict:
    """Originals (PNG and JPEG files) and every EDITS variant of each, as files."""
    root = tmp_path_factory.mktemp("dedup-pictures")
    out: dict = {"png": [], "jpg": [], "edits": {}, "images": []}
    for seed in SEEDS:
        img = scene_image(seed, *SIZE)
        out["images"].append(img)
        for ext, fmt in (("png", "PNG"), ("jpg", "JPEG")):
            path = root / f"{seed}.{ext}"
            path.write_bytes(encode(img, fmt, 92))
            out[ext].append(path)
        for name, (edit, fmt, quality) in EDITS.items():
            path = root / f"{seed}-{name}.{'png' if fmt == 'PNG' else 'jpg'}"
            path.write_bytes(encode(edit(img), fmt, quality))
            out["edits"].setdefault(name, []).append(path)
    return out


def test_bits_pack_like_imagehash_hex():
    bits = np.zeros((1, 8, 8), bool)
    bits[0, 0, 0] = True  # the first bit is the most significant
    bits[0, 7, 7] = True
    assert int(bits_to_uint64(bits)[0]) == (1 << 63) | 1
    assert to_hex(bits_to_uint64(bits)[0]) == "8000000000000001"


def test_full_decode_equals_the_reference_definition(pictures):
    files = pictures["png"] + pictures["jpg"]
    result = hash_files(files, workers=0, fast=False)
    expected = []
    for path in files:
        with Image.open(path) as img:
            expected.append(reference_phash(img))
    assert result.ok.all()
    assert [int(h) for h in result.hashes] == expected
    assert [phash_image(img) for img in pictures["images"]] == [reference_phash(img) for img in pictures["images"]]


def test_full_decode_equals_imagehash_when_installed(pictures):
    imagehash = pytest.importorskip("imagehash")
    files = pictures["png"] + pictures["jpg"]
    result = hash_files(files, workers=0, fast=False)
    for path, h in zip(files, result.hashes):
        with Image.open(path) as img:
            assert to_hex(h) == str(imagehash.phash(img)), path.name


def test_fast_path_stays_close_to_the_reference(pictures):
    files = pictures["png"] + pictures["jpg"]
    fast = hash_files(files, workers=0).hashes
    full = hash_files(files, workers=0, fast=False).hashes
    d = hamming(fast, full)
    # a resampling difference flips a few bits at most (see the hashing module doc for the exception)
    assert np.mean(d <= 4) >= 0.8, d
    assert np.median(d) <= 2, d


def test_pool_gives_the_same_hashes_in_order(pictures):
    files = [str(p) for p in pictures["png"] + pictures["jpg"]]
    inline = hash_files(files, workers=0)
    pooled = hash_files(files, workers=2, chunk=3)
    assert pooled.workers == 2
    np.testing.assert_array_equal(pooled.hashes, inline.hashes)


ROBUST_EDITS = ("jpeg_q92", "jpeg_q70", "jpeg_q40", "resize_0.5", "resize_0.35_q80", "resize_0.5_png", "hue_+30",
                "hue_+90", "hue_180", "desaturate_0.3", "crop_2%_right", "crop_3%+resize_0.5_q75")


def test_booru_edits_land_within_the_default_distance(pictures):
    base = hash_files(pictures["png"], workers=0).hashes
    for name in ROBUST_EDITS:
        edited = hash_files(pictures["edits"][name], workers=0).hashes
        d = hamming(base, edited)
        assert (d <= DEFAULT_MAX_DISTANCE).all(), (name, d.tolist())


def test_different_pictures_stay_apart(pictures):
    base = hash_files(pictures["png"], workers=0).hashes
    d = hamming(base[:, None], base[None, :])[np.triu_indices(len(base), 1)]
    assert (d > DEFAULT_MAX_DISTANCE).all(), d.tolist()


def test_alpha_is_composited_onto_white(tmp_path):
    img = scene_image(21, 400, 520)
    rgba = img.convert("RGBA")
    arr = np.asarray(rgba).copy()
    white = (arr[..., :3] > 235).all(axis=2)
    arr[white] = (0, 0, 0, 0)  # transparent, hiding black
    Image.fromarray(arr, "RGBA").save(tmp_path / "alpha.png")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), Image.fromarray(arr, "RGBA"))
    flat.convert("RGB").save(tmp_path / "flat.jpg", quality=90)
    h = hash_files([tmp_path / "alpha.png", tmp_path / "flat.jpg"], workers=0).hashes
    assert hamming(h[0], h[1]) <= 4


def test_broken_files_become_reason_codes(tmp_path, pictures):
    good = pictures["jpg"][0]
    (tmp_path / "garbage.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path / "empty.png").write_bytes(b"")
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    files = [good, tmp_path / "missing.jpg", tmp_path / "garbage.jpg", tmp_path / "empty.png",
             tmp_path / "truncated.jpg", good]
    for workers in (0, 2):
        result = hash_files(files, workers=workers, chunk=2)
        assert result.ok.tolist() == [True, False, False, False, False, True]
        assert {e.index: e.reason for e in result.errors} == {1: "image_missing", 2: "undecodable_image", 3: "undecodable_image",
                                                              4: "undecodable_image"}
        assert all(e.reason in REASONS and e.detail for e in result.errors)
        assert result.hashes[0] == result.hashes[5] != 0 and (result.hashes[~result.ok] == 0).all()


def test_a_worker_crash_costs_only_its_file(tmp_path, pictures):
    files = [str(p) for p in pictures["jpg"] + pictures["png"]]
    crash = tmp_path / "CRASH.jpg"
    crash.write_bytes(pictures["jpg"][0].read_bytes())
    files.insert(5, str(crash))
    result = hash_files(files, workers=2, chunk=4,
                        worker_cmd=[sys.executable, "-m", "tests.dedup.crashy_worker"])
    assert [(e.index, e.reason) for e in result.errors] == [(5, "decoder_crash")]
    expected = hash_files([f for f in files if "CRASH" not in f], workers=0).hashes
    np.testing.assert_array_equal(np.delete(result.hashes, 5), expected)


def test_one_process_starts_and_the_other_workers_are_its_forks(pictures):
    """The imports (and numba's PNG kernel) are paid once: the started process forks the other workers, each
    on its own socket, and every one of them hashes; closing the sockets ends them all."""
    proc, workers = start_workers(3, worker_command(), warm_png=True)
    try:
        for w in workers:
            w.wait_ready()
        pids = [w.pid for w in workers]
        assert len(set(pids)) == 3 and proc.pid in pids
        parents = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in pids}
        assert sorted(parents[p] == proc.pid for p in pids) == [False, True, True]
        files = [str(p) for p in pictures["jpg"] + pictures["png"]]
        answers = [w.ask({"paths": files, "fast": True, "max_pixels": 10**8}) for w in workers]
        assert answers[0] == answers[1] == answers[2] and not answers[0]["failed"]
        assert [int(h, 16) for h in answers[0]["hashes"]] == hash_files(files, workers=0).hashes.tolist()
    finally:
        for w in workers:
            w.close()
    assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize("n, chunk, workers", [(2000, 32, 2), (100, 32, 2), (33, 32, 1), (7, 2, 4), (1, 32, 2)])
def test_chunks_cover_every_file_once_and_shrink_at_the_end(n, chunk, workers):
    bounds = chunk_bounds(n, chunk, workers)
    sizes = np.diff(bounds)
    assert bounds[0] == 0 and bounds[-1] == n and (sizes > 0).all() and (sizes <= chunk).all()
    tail = sizes[-min(len(sizes), 2 * workers):]
    assert (tail <= max(1, chunk // 4)).all()  # the last chunks a worker gets are small: no long idle tail


def test_a_failed_request_stops_every_worker_even_one_hung_on_a_file(tmp_path, pictures):
    """One worker fails its request while another is stuck on a file: hash_files raises at once (the worker
    family is killed as a process group) instead of waiting on the stuck one, and leaves no process behind."""
    import time

    hang, error = tmp_path / "HANG.jpg", tmp_path / "ERROR.jpg"
    for f in (hang, error):
        f.write_bytes(pictures["jpg"][0].read_bytes())
    files = [str(hang), str(error)] + [str(p) for p in pictures["jpg"]]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the worker itself failed"):
        hash_files(files, workers=2, chunk=1, worker_cmd=[sys.executable, "-m", "tests.dedup.crashy_worker"])
    assert time.monotonic() - started < 60
    import psutil

    left = [p for p in psutil.process_iter(["cmdline"]) if "tests.dedup.crashy_worker" in " ".join(p.info["cmdline"] or [])
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left


def test_workers_that_cannot_start_raise_instead_of_blaming_files(pictures):
    files = pictures["jpg"] + pictures["png"]
    with pytest.raises(RuntimeError, match="did not start"):
        hash_files(files, workers=2, chunk=2, worker_cmd=[sys.executable, "-c", "import sys; sys.exit(3)"])


# --- search -----------------------------------------------------------------------------------------------
def planted_hashes(n: int, d: int, seed: int) -> np.ndarray:
    """Random hashes plus near-duplicates (0..d+2 bits flipped) and a block of exact copies."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 1 << 62, n, dtype=np.int64).astype(np.uint64) << np.uint64(2)
    h ^= rng.integers(0, 4, n).astype(np.uint64)
    for t in rng.choice(np.arange(1, n), n // 4, replace=False):
        src = int(rng.integers(0, t))
        flips = rng.choice(64, int(rng.integers(0, d + 3)), replace=False)
        h[t] = h[src] ^ np.uint64(sum(1 << int(b) for b in flips))
    h[:20] = h[20]
    return h


@pytest.mark.parametrize("d", [0, 2, 5, 8, 10, 13])
def test_near_pairs_equal_brute_force(d):
    h = planted_hashes(2500, d, seed=d)
    expected = brute_force_pairs(h, d)
    assert len(expected[0]) > 50
    plans = [m for m in range(1, d + 2) if all(ball_size(c.bits, c.radius) <= 20_000 for c in _chunks(m, d))]
    for m in plans:
        got = near_pairs(h, d, _chunks(m, d))
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b, err_msg=f"d={d} m={m}")
    got = near_pairs(h, d, force_index=True)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_plans_cover_the_distance():
    for n in (10, 1000, 50_000, 260_000, 2_000_000):
        for d in range(17):
            plan = plan_chunks(n, d)
            if plan is None:
                continue
            assert sum(c.bits for c in plan) == 64
            assert sum(c.radius + 1 for c in plan) >= d + 1
    assert [(c.bits, c.radius) for c in plan_chunks(260_000, 8)] == [(22, 2), (21, 2), (21, 2)]


# --- groups -----------------------------------------------------------------------------------------------
def brute_groups(h: np.ndarray, d: int) -> list[frozenset[int]]:
    parent = list(range(len(h)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    i, j, _ = brute_force_pairs(h, d)
    for a, b in zip(i.tolist(), j.tolist()):
        parent[root(a)] = root(b)
    out: dict[int, set[int]] = {}
    for k in range(len(h)):
        out.setdefault(root(k), set()).add(k)
    return sorted(frozenset(s) for s in out.values() if len(s) > 1)


def test_groups_equal_brute_force_union_find():
    d = DEFAULT_MAX_DISTANCE
    h = planted_hashes(3000, d, seed=7)
    rng = np.random.default_rng(3)
    ids = rng.permutation(10_000)[:3000] + 1
    g = find_groups(ids, h, rng.integers(0, 50, 3000), np.full(3000, 1000), np.full(3000, 1000))
    got: dict[int, set[int]] = {}
    for k, gid in enumerate(g.group.tolist()):
        got.setdefault(gid, set()).add(k)
    assert sorted(frozenset(s) for s in got.values() if len(s) > 1) == brute_groups(h, d)
    assert g.kept.sum() == len(got)
    assert (g.size[g.kept] == [len(got[i]) for i in g.group[g.kept]]).all()
    row_of = {int(x): k for k, x in enumerate(ids)}
    np.testing.assert_array_equal(g.distance, hamming(h, h[[row_of[int(x)] for x in g.group]]))


def test_representative_rule():
    # one group of identical hashes: score first, then width*height, then the newest (highest) id
    ids = np.array([5, 9, 7, 3, 8])
    h = np.zeros(5, np.uint64)
    cases = [
        (np.array([1, 4, 4, 2, 4]), np.array([100, 100, 200, 100, 200]), np.array([100, 100, 100, 100, 100]), 8),
        (np.array([1, 4, 4, 2, 3]), np.array([100, 100, 200, 100, 900]), np.array([100, 100, 100, 100, 100]), 7),
        (np.array([9, 4, 4, 2, 3]), np.array([100, 100, 200, 100, 900]), np.array([100, 100, 100, 100, 100]), 5),
        (np.array([4, 4, 4, 4, 4]), np.array([10, 20, 20, 10, 10]), np.array([20, 10, 10, 20, 20]), 9),
    ]
    for score, w, hh, rep in cases:
        g = find_groups(ids, h, score, w, hh)
        assert (g.group == rep).all() and g.kept.tolist() == (ids == rep).tolist()
        assert (g.size == 5).all() and (g.distance == 0).all()
    # a missing score ranks below any score; a missing size counts as 0
    order = representative_order(np.array([None, -5, 3, None], dtype=object), [1, 1, None, 1], [1, 1, 1, 1],
                                 np.array([1, 2, 3, 4]))
    assert order.tolist() == [2, 1, 3, 0]


def test_parent_hint_joins_linked_pairs_within_parent_distance():
    assert DEFAULT_PARENT_DISTANCE > DEFAULT_MAX_DISTANCE
    rng = np.random.default_rng(5)
    base = rng.integers(0, 1 << 62, 6, dtype=np.int64).astype(np.uint64) << np.uint64(1)

    def flip(h, k):
        return h ^ np.uint64((1 << k) - 1)  # k low bits

    mid = DEFAULT_MAX_DISTANCE + 2  # beyond the search distance, within the parent distance
    far = DEFAULT_PARENT_DISTANCE + 2
    h = np.array([base[0], flip(base[0], mid), base[1], flip(base[1], mid), base[2], flip(base[2], far)], np.uint64)
    ids = np.array([100, 101, 200, 201, 300, 301])
    parent = np.array([None, 100, None, None, None, 300], dtype=object)  # 201 is not linked to 200
    score = np.array([1, 5, 1, 1, 1, 1])
    g = find_groups(ids, h, score, np.ones(6), np.ones(6), parent)
    assert g.group.tolist() == [101, 101, 200, 201, 300, 301]
    assert g.distance.tolist() == [mid, 0, 0, 0, 0, 0]
    assert g.pair_parent.tolist() == [True]
    # a parent that is not among the posts, or not hashed, links nothing
    g = find_groups(ids, h, score, np.ones(6), np.ones(6), np.array([np.nan, 999, np.nan, 200, np.nan, np.nan]),
                    valid=np.array([True, True, False, True, True, True]))
    assert g.group.tolist() == ids.tolist() and g.distance[2] == -1
    # without parent_id, or with parent_distance <= max_distance, no hint
    assert find_groups(ids, h, score, np.ones(6), np.ones(6)).group.tolist() == ids.tolist()
    assert find_groups(ids, h, score, np.ones(6), np.ones(6), parent,
                       parent_distance=DEFAULT_MAX_DISTANCE).group.tolist() == ids.tolist()


def test_empty_and_duplicate_ids():
    g = find_groups(np.zeros(0, np.int64), np.zeros(0, np.uint64), [], [], [])
    assert len(g.group) == 0 and g.n_groups == 0
    with pytest.raises(ValueError, match="unique"):
        find_groups(np.array([1, 1]), np.zeros(2, np.uint64), [1, 1], [1, 1], [1, 1])


# --- pictures ---------------------------------------------------------------------------------------------
def test_group_sheet_shows_largest_groups_representative_first(tmp_path, pictures):
    import pyarrow as pa

    from tasks.dedup.visuals import (
        largest_groups,
        make_distance_histogram,
        make_group_sheet,
    )

    files = pictures["png"][:2] + pictures["edits"]["jpeg_q70"][:2] + pictures["edits"]["resize_0.5"][:1]
    files += pictures["jpg"][2:4]
    hashes = hash_files(files, workers=0).hashes
    ids = np.arange(1, len(files) + 1)
    score = [3, 1, 9, 1, 2, 5, 5]
    width = [600, 600, 600, 600, 300, 600, 600]
    g = find_groups(ids, hashes, score, width, [800] * 7)
    groups = largest_groups(g, 5)
    assert [len(r) for r in groups] == [3, 2]
    assert [int(g.ids[r[0]]) for r in groups] == [3, 4]  # highest score first, kept
    posts = pa.table({"id": ids, "score": score, "width": width, "height": [800] * 7,
                      "image_path": [Path(f).name for f in files]})
    images = make_group_sheet(g, posts, Path(files[0]).parent, tmp_path)
    images.update(make_distance_histogram(g, tmp_path))
    for rel in images.values():
        with Image.open(tmp_path / rel) as img:
            assert img.width >= 480 and img.height > 200


def test_a_picture_smaller_than_the_draft_side_is_hashed_not_an_error(tmp_path):
    from PIL import Image

    from tasks.dedup.hashing import hash_files, phash_image

    path = tmp_path / "small.png"
    Image.new("RGB", (100, 50), (200, 30, 30)).save(path)
    result = hash_files([str(path)], workers=0)
    assert result.ok.tolist() == [True] and not result.errors
    with Image.open(path) as img:
        assert int(result.hashes[0]) == phash_image(img, fast=False)  # no shrink below the draft side
