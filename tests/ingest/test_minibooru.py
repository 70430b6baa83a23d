"""The generated mini-booru: determinism, Danbooru-exact records, metadata realism, learnable characters, dump."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from statistics import median

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from minibooru import CHARACTERS, MiniBooru, generate_minibooru, write_dump
from minibooru.generate import MARKER, _plan_posts
from minibooru.render import COLOURS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "danbooru"
CURRENT_POST = json.loads((FIXTURES / "post_show_9969513_2025_booruhs.json").read_text())
OLD_TAGS = json.loads((FIXTURES / "tags_index_2020_grabber.json").read_text())
HIDDEN_FIELDS = ("md5", "file_url", "large_file_url", "preview_file_url")
IMAGE_EXTS = ("jpg", "png", "webp", "gif")


def _file_bytes(booru: MiniBooru, post: dict) -> bytes:
    return booru.image_path(post["md5"], post["file_ext"]).read_bytes()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, minibooru: MiniBooru) -> None:
    a = generate_minibooru(tmp_path / "a", 24, 5, max_side=96)
    b = generate_minibooru(tmp_path / "b", 24, 5, max_side=96)
    c = generate_minibooru(tmp_path / "c", 24, 6, max_side=96)
    assert a.posts_path.read_bytes() == b.posts_path.read_bytes()
    assert a.tags_path.read_bytes() == b.tags_path.read_bytes()
    md5s = lambda m: sorted(p["md5"] for p in m.load_posts() if "md5" in p)  # noqa: E731
    assert md5s(a) == md5s(b)
    assert sorted(x.name for x in a.images_dir.iterdir()) == sorted(x.name for x in b.images_dir.iterdir())
    assert not set(md5s(a)) & set(md5s(c))


def test_existing_generation_is_reused_and_other_params_regenerate(tmp_path: Path) -> None:
    a = generate_minibooru(tmp_path, 12, 1, max_side=80)
    marker_mtime = (tmp_path / MARKER).stat().st_mtime_ns
    posts_mtime = a.posts_path.stat().st_mtime_ns
    again = generate_minibooru(tmp_path, 12, 1, max_side=80)
    assert again.posts_path.stat().st_mtime_ns == posts_mtime
    assert (tmp_path / MARKER).stat().st_mtime_ns == marker_mtime
    other = generate_minibooru(tmp_path, 14, 1, max_side=80)
    assert len(other.load_posts()) == 14
    # no stale image from the first generation is left behind
    listed = {f"{p['md5']}.{p['file_ext']}" for p in other.load_posts() if "md5" in p}
    assert {x.name for x in other.images_dir.iterdir()} <= listed


def test_interrupted_generation_is_not_reused(tmp_path: Path) -> None:
    generate_minibooru(tmp_path, 10, 2, max_side=80)
    (tmp_path / MARKER).unlink()  # as if killed before the marker was written
    (tmp_path / "posts.jsonl").write_text("garbage\n")
    booru = generate_minibooru(tmp_path, 10, 2, max_side=80)
    assert len(booru.load_posts()) == 10


def test_records_have_the_current_danbooru_field_set_and_types(minibooru: MiniBooru) -> None:
    posts = minibooru.load_posts()
    assert len(posts) == 60
    for p in posts:
        hidden = "md5" not in p
        expected = set(CURRENT_POST) - (set(HIDDEN_FIELDS) if hidden else set())
        assert set(p) == expected, p["id"]
        for k, v in p.items():
            ref = CURRENT_POST[k]
            if v is not None and ref is not None:
                assert type(v) is type(ref), (k, v, ref)
        asset_keys = set(CURRENT_POST["media_asset"]) - ({"md5", "variants"} if hidden else set())
        assert set(p["media_asset"]) == asset_keys
        if not hidden:
            for v in p["media_asset"]["variants"]:
                assert set(v) == set(CURRENT_POST["media_asset"]["variants"][0])
        # tag strings: per-category strings partition tag_string; counts match
        cats = ("general", "character", "copyright", "artist", "meta")
        parts = {c: p[f"tag_string_{c}"].split() for c in cats}
        assert sorted(sum(parts.values(), [])) == p["tag_string"].split()
        for c in cats:
            assert p[f"tag_count_{c}"] == len(parts[c])
        assert p["tag_count"] == len(p["tag_string"].split())
        assert p["score"] == p["up_score"] + p["down_score"] and p["down_score"] <= 0
        assert p["rating"] in "gsqe"
        assert 2005 <= int(p["created_at"][:4]) <= 2026 and p["updated_at"] >= p["created_at"][:10]
    ids = [p["id"] for p in posts]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_file_metadata_matches_the_bytes(minibooru: MiniBooru) -> None:
    posts = [p for p in minibooru.load_posts() if "md5" in p]
    rgba_seen = False
    for p in posts:
        data = _file_bytes(minibooru, p)
        assert hashlib.md5(data).hexdigest() == p["md5"] == p["media_asset"]["md5"]
        assert len(data) == p["file_size"] == p["media_asset"]["file_size"]
        assert p["file_url"] == f"/data/original/{p['md5'][:2]}/{p['md5'][2:4]}/{p['md5']}.{p['file_ext']}"
        original = p["media_asset"]["variants"][-1]
        assert original["type"] == "original" and original["url"] == p["file_url"]
        assert (original["width"], original["height"]) == (p["image_width"], p["image_height"])
        if p["file_ext"] in IMAGE_EXTS:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                assert im.size == (p["image_width"], p["image_height"])
                assert im.format.lower().replace("jpeg", "jpg") == p["file_ext"]
                if im.mode == "RGBA" and np.asarray(im)[..., 3].min() < 255:
                    rgba_seen = True
                    assert "transparent_background" in minibooru.load_truth()["posts"][str(p["id"])]["general"]
        else:
            with pytest.raises(Exception):
                Image.open(io.BytesIO(data)).load()
    assert rgba_seen


def test_the_special_posts_are_all_present(minibooru: MiniBooru) -> None:
    posts = minibooru.load_posts()
    exts = Counter(p["file_ext"] for p in posts)
    assert exts["jpg"] > len(posts) / 2
    for ext in ("png", "webp", "gif", "mp4", "zip", "swf"):
        assert exts[ext] >= 1, ext
    hidden = [p for p in posts if "md5" not in p]
    assert any(p["is_banned"] for p in hidden) and any(not p["is_banned"] for p in hidden)  # banned + restricted
    assert all(not minibooru.image_path(minibooru.load_truth()["posts"][str(p["id"])]["md5"], p["file_ext"]).exists()
               for p in hidden)
    assert sum(p["is_deleted"] for p in posts) >= 2
    assert any("md5" in p and p["is_deleted"] for p in posts)  # deleted posts stay visible
    tags = Counter(t for p in posts for t in p["tag_string"].split())
    assert tags["comic"] >= 1 and tags["animated"] >= 3
    dims = [(p["image_width"], p["image_height"]) for p in posts if p["file_ext"] in IMAGE_EXTS]
    assert any(max(d) < 256 for d in dims)
    assert any(h > 2.5 * w for w, h in dims) and any(w > 2.5 * h for w, h in dims)
    assert sum(h > w for w, h in dims) > sum(w > h for w, h in dims)  # portrait most common
    assert max(max(d) for d in dims) <= 320
    assert tags["highres"] >= 1 and (tags["commentary"] + tags["commentary_request"]) >= 1
    by_id = {p["id"]: p for p in posts}
    children = [p for p in posts if p["parent_id"] is not None]
    for c in children:
        assert by_id[c["parent_id"]]["has_children"] and c["parent_id"] < c["id"]
    assert {p["rating"] for p in posts} >= {"g", "s"}


def test_tags_are_incomplete_but_truthful(minibooru: MiniBooru) -> None:
    truth = minibooru.load_truth()["posts"]
    dropped = 0
    for p in minibooru.load_posts():
        t = truth[str(p["id"])]
        general = set(p["tag_string_general"].split())
        assert general <= set(t["general"])
        dropped += len(set(t["general"]) - general)
        assert set(p["tag_string_character"].split()) <= set(t["characters"])
        assert p["tag_string_artist"] == t["artist"]
    assert dropped > 20
    names = {c.tag for c in CHARACTERS}
    assert all(n.endswith(")") and "_(" in n for n in names)  # Danbooru's character_(series) spelling


def test_tags_json_counts_and_categories(minibooru: MiniBooru) -> None:
    posts = minibooru.load_posts()
    tags = minibooru.load_tags()
    assert set(tags[0]) == (set(OLD_TAGS[0]) - {"is_locked"}) | {"is_deprecated", "words"}
    counts = Counter(t for p in posts for t in p["tag_string"].split())
    by_name = {t["name"]: t for t in tags}
    assert set(by_name) == set(counts)
    cat_num = {"general": 0, "artist": 1, "copyright": 3, "character": 4, "meta": 5}
    for p in posts:
        for cat, num in cat_num.items():
            for name in p[f"tag_string_{cat}"].split():
                assert by_name[name]["category"] == num
    for name, n in counts.items():
        assert by_name[name]["post_count"] == n
    assert by_name["aoi_kanata_(starlit_stage)"]["words"] == ["aoi", "kanata", "starlit", "stage"]


def test_scores_drift_upward_by_year_and_are_heavy_tailed() -> None:
    plans = _plan_posts(4000, 0, 256)  # metadata only: no rendering
    early = [p for p in plans if p["created"].year <= 2011]
    late = [p for p in plans if p["created"].year >= 2021]
    assert len(early) >= 30 and len(late) > len(early)  # more uploads in later years
    assert median(p["score"] for p in late) >= 5 * max(1, median(p["score"] for p in early))
    assert median(p["fav"] for p in late) > 3 * max(1, median(p["fav"] for p in early))
    scores = np.array([p["score"] for p in late])
    assert scores.max() > 8 * np.median(scores)  # heavy tail
    ratings = Counter(p["rating"] for p in plans)
    assert ratings["g"] + ratings["s"] > 0.7 * len(plans) and ratings["e"] > 0
    assert all(p["down"] <= 0 and p["score"] == p["up"] + p["down"] for p in plans)
    assert {p["created"].year for p in plans} == set(range(2005, 2027))


def test_characters_are_visually_consistent_and_learnable(tmp_path: Path) -> None:
    """Each character's hair colour dominates its pictures, and a nearest-centroid colour-histogram classifier
    trained on older posts names the character of newer ones far above chance."""
    booru = generate_minibooru(tmp_path, 240, 3, max_side=128)
    truth = booru.load_truth()["posts"]
    look = {c.tag: c.look for c in CHARACTERS}
    feats, labels, hair_frac = [], [], []
    for p in booru.load_posts():
        t = truth[str(p["id"])]
        if len(t["characters"]) != 1 or not t["has_file"] or t["file_ext"] not in ("jpg", "png", "webp") \
                or "comic" in t["general"]:
            continue
        im = np.asarray(Image.open(booru.image_path(t["md5"], t["file_ext"])).convert("RGB"), dtype=np.int32)
        q = im // 64
        hist = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64).astype(float)
        feats.append(np.sqrt(hist / hist.sum()))
        labels.append(t["characters"][0])
        hair_frac.append({c: float((np.sqrt(((im - np.array(COLOURS[c])) ** 2).sum(-1)) < 60).mean())
                          for c in {lk.hair for lk in look.values()}})
        assert hair_frac[-1][look[labels[-1]].hair] > 0.005, (p["id"], labels[-1])
    y = np.array(labels)
    x = np.array(feats)
    cut = int(len(y) * 0.7)
    classes = sorted(set(y[:cut]))
    centroids = np.array([x[:cut][y[:cut] == c].mean(0) for c in classes])
    pred = np.array([classes[int(np.argmin(((centroids - f) ** 2).sum(1)))] for f in x[cut:]])
    accuracy = float((pred == y[cut:]).mean())
    assert accuracy > 0.5, accuracy  # 14 characters: chance is ~0.1
    # chromatic hair colours: the character's own colour covers clearly more of its pictures than of others'
    for colour in ("blue", "pink", "red", "aqua", "orange", "green", "blonde"):
        mine = [f[colour] for f, lab in zip(hair_frac, labels) if look[lab].hair == colour]
        others = [f[colour] for f, lab in zip(hair_frac, labels) if look[lab].hair != colour]
        assert mine and median(mine) > 2 * median(others), colour


@pytest.mark.parametrize("fmt,images", [("jsonl", "folder"), ("parquet", "tar")])
def test_dump_round_trip(minibooru: MiniBooru, tmp_path: Path, fmt: str, images: str) -> None:
    out = write_dump(minibooru.root, tmp_path / "dump", fmt=fmt, images=images, shard_size=16)
    manifest = json.loads((out / "dump.json").read_text())
    posts = sorted(minibooru.load_posts(), key=lambda p: p["id"])
    assert manifest["n_posts"] == len(posts)
    rows: list[dict] = []
    for rel in manifest["metadata"]:
        if fmt == "jsonl":
            rows += [json.loads(line) for line in (out / rel).read_text().splitlines()]
        else:
            rows += pq.read_table(out / rel).to_pylist()

    def strip_nulls(d):
        if isinstance(d, dict):
            return {k: strip_nulls(v) for k, v in d.items() if v is not None}
        if isinstance(d, list):
            return [strip_nulls(v) for v in d]
        return d

    assert [strip_nulls(r) for r in rows] == [strip_nulls(p) for p in posts]
    files: dict[str, bytes] = {}
    if images == "folder":
        for f in (out / "images").iterdir():
            files[f.name] = f.read_bytes()
        expect = {f"{p['md5']}.{p['file_ext']}" for p in posts if "md5" in p and p["file_ext"] in IMAGE_EXTS}
    else:
        assert len(manifest["image_shards"]) == -(-len(posts) // 16)
        for rel in manifest["image_shards"]:
            with tarfile.open(out / rel) as tf:
                for m in tf.getmembers():
                    files[m.name] = tf.extractfile(m).read()
        expect = {f"{p['id']}.{p['file_ext']}" for p in posts if "md5" in p and p["file_ext"] in IMAGE_EXTS}
    assert set(files) == expect and manifest["n_images"] == len(expect)
    by_key = {(f"{p['md5']}.{p['file_ext']}" if images == "folder" else f"{p['id']}.{p['file_ext']}"): p
              for p in posts if "md5" in p}
    for name, data in files.items():
        assert hashlib.md5(data).hexdigest() == by_key[name]["md5"]


def test_the_product_runs_without_the_demo_package(tmp_path):
    """The mini-booru is a demo/test package: every stage imports without it, the dump reader parses queries
    with the ingest's own tag-query module, and the embedded source says what to install."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    code = """
import sys
sys.modules["minibooru"] = None  # not installed
from tasks.registry import implemented_stages, stage_spec
for name in implemented_stages():
    stage_spec(name)
from tasks.ingest.dump_reader import compile_queries
compile_queries(["1girl -comic rating:g,s"])
from data_contracts.errors import ConfigError
from pipeline_config.load import load_config
from tasks.ingest.stage import fingerprint_extra
try:
    fingerprint_extra(load_config("demo"))
except ConfigError as exc:
    print("CONFIG ERROR:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CONFIG ERROR:" in proc.stdout and "pip install -e packages/minibooru" in proc.stdout
