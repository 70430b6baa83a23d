"""The mini-booru's planted near-duplicates (`near_duplicates`): off by default with today's exact output; when on,
Danbooru-like colour variants, crops and re-encodes of earlier posts, recorded in truth.json, that the dedup
stage's own hashing and grouping find."""
from __future__ import annotations

import hashlib
import json
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from minibooru import MiniBooru, generate_minibooru, serve_minibooru
from minibooru.generate import MARKER, VARIANT_KINDS, planned_sizes

from pipeline_config.ingest import EmbeddedConfig
from tasks.dedup.groups import find_groups
from tasks.dedup.hashing import DRAFT_SIDE, hamming, hash_files
from tests.ingest.test_gpu_check_preset import _digest  # the generator's files, hashed

N_POSTS, SEED, MAX_SIDE, FRACTION = 160, 0, 384, 0.15
# The demo's recommended dedup.max_distance (pHash bits; a 64-bit pHash always has 32 bits set, so distances are
# even and 4 behaves as 5). Measured at 300/600 posts, max_side 768: catches ~96 % of colour variants, ~98 % of
# re-encodes, 30-50 % of crops; 8-13 distinct (template-alike) pairs of a 300-post booru are that close.
DEMO_MAX_DISTANCE = 4
PARENT_DISTANCE = 12  # dedup's default
IMAGE_EXTS = ("jpg", "png", "webp", "gif")


def _when(post: dict) -> datetime:
    return datetime.fromisoformat(post["created_at"])


@pytest.fixture(scope="module")
def booru(tmp_path_factory: pytest.TempPathFactory) -> MiniBooru:
    return generate_minibooru(tmp_path_factory.mktemp("nd"), N_POSTS, SEED, max_side=MAX_SIDE,
                              near_duplicates=FRACTION)


@pytest.fixture(scope="module")
def variants(booru: MiniBooru) -> dict[int, dict]:
    """variant id -> its truth record."""
    return {int(k): t for k, t in booru.load_truth()["posts"].items() if "variant_of" in t}


# ------------------------------------------------------------------------------------------------- off


def test_default_is_todays_output_byte_for_byte(tmp_path: Path) -> None:
    omitted = generate_minibooru(tmp_path / "omitted", 30, 4, max_side=128)
    zero = generate_minibooru(tmp_path / "zero", 30, 4, max_side=128, near_duplicates=0.0)
    assert _digest(omitted.root) == _digest(zero.root)
    posts = zero.load_posts()
    # values of the generator before the option existed (rng-only values; the md5 also pins the encoders)
    assert [(p["id"], p["score"], p["rating"], p["tag_string_character"]) for p in posts[:6]] == [
        (1030, 1, "g", "kuroe_rin_(houkago_diary)"), (1069, 8, "s", "elenore_(verdant_saga)"),
        (1094, 0, "s", "vex_(neon_district_77)"), (1141, 2, "g", "tachibana_mei_(houkago_diary)"),
        (1180, 2, "g", "vex_(neon_district_77)"), (1231, 7, "s", "sylph_(verdant_saga)")]
    assert posts[0]["md5"] == "8486a13eaeb9c7d424cb722b6e8ec4e5"
    meta = json.loads((zero.root / MARKER).read_text())
    assert "near_duplicates" not in meta and "variants" not in meta and zero.near_duplicates == 0.0
    truth = zero.load_truth()["posts"]
    assert not any(k.startswith("variant") for t in truth.values() for k in t)
    assert planned_sizes(30, 4, max_side=128, near_duplicates=0.0) == planned_sizes(30, 4, max_side=128)


def test_near_duplicates_is_part_of_the_cache_key_and_the_marker(tmp_path: Path) -> None:
    plain = _digest(generate_minibooru(tmp_path, 20, 2, max_side=96).root)
    nd = generate_minibooru(tmp_path, 20, 2, max_side=96, near_duplicates=0.2)  # regenerates
    meta = json.loads((tmp_path / MARKER).read_text())
    assert meta["near_duplicates"] == 0.2 and nd.near_duplicates == 0.2
    assert sum(meta["variants"].values()) == 4 and set(meta["variants"]) == set(VARIANT_KINDS)
    assert _digest(tmp_path) != plain
    mtime = (tmp_path / MARKER).stat().st_mtime_ns
    generate_minibooru(tmp_path, 20, 2, max_side=96, near_duplicates=0.2)  # reused
    assert (tmp_path / MARKER).stat().st_mtime_ns == mtime
    assert _digest(generate_minibooru(tmp_path, 20, 2, max_side=96).root) == plain
    for bad in (-0.1, 0.6, float("nan")):
        with pytest.raises(ValueError, match="near_duplicates"):
            generate_minibooru(tmp_path / "x", 20, 2, max_side=96, near_duplicates=bad)


def test_the_ingest_config_passes_it_through_and_keeps_it_out_of_the_fingerprint_at_0(tmp_path, monkeypatch):
    import minibooru

    from tasks.ingest import embedded

    assert EmbeddedConfig().fingerprint_dict() == {"posts": 300, "seed": 0, "max_side": 768}
    cfg = EmbeddedConfig(near_duplicates=0.08)
    assert cfg.fingerprint_dict()["near_duplicates"] == 0.08
    assert embedded.minibooru_dir(tmp_path, EmbeddedConfig()).name == "minibooru-300-0-768"
    assert embedded.minibooru_dir(tmp_path, cfg).name == "minibooru-300-0-768-nd0.08"
    assert embedded.minibooru_dir(tmp_path, EmbeddedConfig(aspect="danbooru", near_duplicates=0.1)).name \
        == "minibooru-300-0-768-danbooru-nd0.1"
    with pytest.raises(ValueError):
        EmbeddedConfig(near_duplicates=0.9)
    seen: dict = {}

    def fake(folder, n_posts, seed, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace(root=folder)

    monkeypatch.setattr(minibooru, "generate_minibooru", fake)
    embedded.ensure_minibooru(tmp_path, cfg)
    assert seen.get("near_duplicates") == 0.08


# -------------------------------------------------------------------------------------------------- on


def test_variants_are_later_edits_of_earlier_posts_as_documented(booru: MiniBooru, variants: dict[int, dict]) -> None:
    posts = {p["id"]: p for p in booru.load_posts()}
    truth = booru.load_truth()["posts"]
    assert len(variants) == round(FRACTION * N_POSTS)
    kinds = Counter(t["variant_kind"] for t in variants.values())
    assert set(kinds) == set(VARIANT_KINDS), kinds
    assert json.loads((booru.root / MARKER).read_text())["variants"] == {k: kinds[k] for k in VARIANT_KINDS}
    lower = linked = 0
    for vid, t in variants.items():
        v, o = posts[vid], posts[t["variant_of"]]
        assert o["id"] < v["id"] and _when(o) < _when(v)
        assert t["variant_of"] not in variants  # never a variant of a variant
        assert "md5" in o and not o["is_deleted"] and o["file_ext"] in ("jpg", "png", "webp")
        assert "md5" in v and not (v["is_deleted"] or v["is_banned"]) and v["md5"] != o["md5"]
        data = booru.image_path(v["md5"], v["file_ext"]).read_bytes()
        assert hashlib.md5(data).hexdigest() == v["md5"] and len(data) == v["file_size"]
        assert t["md5"] == v["md5"] and t["file_ext"] == v["file_ext"] and t["has_file"]
        # the same picture: same character / copyright / artist tags, rating, and mostly the same general tags
        for cat in ("character", "copyright", "artist"):
            assert v[f"tag_string_{cat}"] == o[f"tag_string_{cat}"], (vid, cat)
        assert v["rating"] == o["rating"] and t["characters"] == truth[str(o["id"])]["characters"]
        gv, go = set(v["tag_string_general"].split()), set(o["tag_string_general"].split())
        assert len(gv & go) >= 0.6 * len(gv | go), (vid, gv ^ go)
        assert gv <= set(t["general"])  # incomplete but truthful, like every post
        assert v["score"] != o["score"] and v["score"] == v["up_score"] + v["down_score"]
        lower += v["score"] < o["score"]
        edit = t["variant_edit"]
        if t["variant_kind"] == "colour":
            assert edit.startswith(("hair:", "background:"))
            assert (v["image_width"], v["image_height"], v["file_ext"]) == (o["image_width"], o["image_height"],
                                                                              o["file_ext"])
            assert v["parent_id"] == (o["id"] if t["variant_parent"] else None)
            if t["variant_parent"]:
                linked += 1
                assert o["has_children"] and o["has_active_children"]
            if edit.startswith("hair:"):
                old, new = edit[len("hair:"):].split("->")
                assert f"{new}_hair" in t["general"] and "alternate_hair_color" in t["general"]
                assert f"{old}_hair" in truth[str(o["id"])]["general"]
        else:
            assert v["parent_id"] is None and not t["variant_parent"]  # re-uploads and crops are not linked
            if t["variant_kind"] == "crop":
                assert edit.startswith("crop:")
                w, h = v["image_width"], v["image_height"]
                if not edit.endswith(";resized"):
                    assert 0.89 * o["image_width"] <= w <= o["image_width"]
                    assert 0.89 * o["image_height"] <= h <= o["image_height"]
                    assert (w, h) != (o["image_width"], o["image_height"])
            else:
                assert edit.startswith(("jpeg:", "resize:")) or "->" in edit
    colour = kinds["colour"]
    assert linked >= 0.6 * colour  # most colour variants name their original as parent
    assert lower >= 0.6 * len(variants)  # usually scored below the original
    # planned_sizes knows the variants without rendering
    plan = planned_sizes(N_POSTS, SEED, max_side=MAX_SIDE, near_duplicates=FRACTION)
    assert [(p["id"], p["width"], p["height"]) for p in plan] == [
        (p["id"], p["image_width"], p["image_height"]) for p in posts.values()]
    assert {p["id"] for p in plan if p["role"] == "variant"} == set(variants)


def test_most_variants_are_grouped_with_their_original_by_the_dedup_code(booru: MiniBooru,
                                                                          variants: dict[int, dict]) -> None:
    # pictures of at least DRAFT_SIDE px a side, as every ingest filter keeps (hashing.box_scale has no scale
    # for a smaller side)
    posts = [p for p in booru.load_posts() if "md5" in p and p["file_ext"] in IMAGE_EXTS
             and min(p["image_width"], p["image_height"]) >= DRAFT_SIDE]
    hashed = hash_files([booru.image_path(p["md5"], p["file_ext"]) for p in posts], workers=0)
    assert hashed.ok.all()
    ids = np.array([p["id"] for p in posts])
    groups = find_groups(ids, hashed.hashes, np.array([p["score"] for p in posts], float),
                         np.array([p["image_width"] for p in posts], float),
                         np.array([p["image_height"] for p in posts], float),
                         np.array([np.nan if p["parent_id"] is None else p["parent_id"] for p in posts], float),
                         max_distance=DEMO_MAX_DISTANCE, parent_distance=PARENT_DISTANCE)
    group = dict(zip(groups.ids.tolist(), groups.group.tolist()))
    hash_of = dict(zip(ids.tolist(), hashed.hashes))
    caught: dict[str, list[bool]] = {k: [] for k in VARIANT_KINDS}
    dist: dict[str, list[int]] = {k: [] for k in VARIANT_KINDS}
    for vid, t in variants.items():
        if vid not in group or t["variant_of"] not in group:
            continue
        caught[t["variant_kind"]].append(group[vid] == group[t["variant_of"]])
        dist[t["variant_kind"]].append(int(hamming(hash_of[vid], hash_of[t["variant_of"]])))
    every = [x for kind in VARIANT_KINDS for x in caught[kind]]
    assert len(every) >= 0.9 * len(variants)
    assert sum(every) >= 0.75 * len(every), (caught, dist)
    for kind in ("colour", "reencode"):  # colour variants keep the luma; re-encodes are the same picture
        assert sum(caught[kind]) >= 0.9 * len(caught[kind]), (kind, dist[kind])
        assert np.median(dist[kind]) <= 2
    assert any(caught["crop"]) and np.median(dist["crop"]) <= 10  # crops of 2-5 % move pHash the most
    # the kept post of a variant's group is the higher-scored one (usually the original)
    kept = {i for i, k in zip(groups.ids.tolist(), groups.kept.tolist()) if k}
    assert sum(t["variant_of"] in kept for t in variants.values()) >= 0.5 * len(every)


def test_the_server_serves_the_variants(booru: MiniBooru, variants: dict[int, dict]) -> None:
    linked = next(vid for vid, t in variants.items() if t["variant_parent"])
    with serve_minibooru(booru.root) as server:
        with urllib.request.urlopen(f"{server.url}/posts/{linked}.json", timeout=10) as resp:
            post = json.loads(resp.read())
        assert post["parent_id"] == variants[linked]["variant_of"]
        with urllib.request.urlopen(post["file_url"], timeout=10) as resp:
            assert hashlib.md5(resp.read()).hexdigest() == post["md5"]


def test_worker_processes_write_the_same_variants(tmp_path: Path) -> None:
    serial = generate_minibooru(tmp_path / "serial", 40, 3, max_side=160, near_duplicates=0.25, workers=1)
    pooled = generate_minibooru(tmp_path / "pooled", 40, 3, max_side=160, near_duplicates=0.25, workers=2)
    assert _digest(serial.root) == _digest(pooled.root)
    assert sum("variant_of" in t for t in serial.load_truth()["posts"].values()) == 10
