"""AVIF and WebP posts end to end: a filter choice at ingest (where Pillow decodes them), truncation read as
`truncated`, and the pool files read by the tag and cache stages' loaders."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from minibooru import MiniBooru, generate_minibooru, serve_minibooru
from minibooru.generate import image_url, variant_list
from PIL import Image, features

from pipeline_config.ingest import DECODABLE_EXTS, FilterConfig
from tasks.ingest.filters import PostFilter
from tasks.ingest.parse import parse_post
from tests.ingest.test_stage import make_cfg, outputs, run

pytestmark = pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")

WITH_AVIF = ["jpg", "png", "webp", "avif"]


def _convert(booru: MiniBooru, post: dict, ext: str) -> dict:
    """Re-encode one post's image as `ext` and rewrite its record consistently (md5, size, URLs, asset)."""
    old = booru.image_path(post["md5"], post["file_ext"])
    img = Image.open(old).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, {"avif": "AVIF", "webp": "WEBP"}[ext], quality=70)
    data = buf.getvalue()
    md5 = hashlib.md5(data).hexdigest()
    booru.image_path(md5, ext).write_bytes(data)
    old.unlink()
    w, h = post["image_width"], post["image_height"]
    assert img.size == (w, h)
    url = image_url("original", md5, ext)
    post.update(md5=md5, file_ext=ext, file_size=len(data), file_url=url, large_file_url=url,
                preview_file_url=image_url("180x180", md5, "jpg"), has_large=False)
    post["media_asset"].update(md5=md5, file_ext=ext, file_size=len(data),
                               variants=variant_list(md5, ext, w, h, False))
    return post


@pytest.fixture(scope="module")
def booru(tmp_path_factory) -> tuple[MiniBooru, int, int]:
    """A small mini-booru whose first two acceptable JPEG posts became one AVIF and one WebP post."""
    b = generate_minibooru(tmp_path_factory.mktemp("booru-formats"), 24, 5, max_side=192)
    posts = b.load_posts()
    flt = PostFilter(FilterConfig(min_width=0, min_height=0), need_file_url=True)
    jpgs = [p for p in posts if p.get("file_ext") == "jpg" and flt.check(parse_post(p)) is None]
    avif, webp = _convert(b, jpgs[0], "avif"), _convert(b, jpgs[1], "webp")
    b.posts_path.write_text("".join(json.dumps(p, separators=(",", ":")) + "\n" for p in posts), encoding="utf-8")
    return b, avif["id"], webp["id"]


def _run(tmp: Path, url: str, file_exts: list[str] | None):
    filters = {"min_width": 0, "min_height": 0}
    if file_exts is not None:
        filters["file_exts"] = file_exts
    cfg = make_cfg(tmp, url, filters=filters, queries=[
        {"tags": "filetype:avif", "quota": 1000, "name": "avif"}, {"tags": "", "quota": 1000, "name": "rest"}])
    outcome, store = run(cfg)
    return outputs(outcome, store)


def test_avif_is_decodable_here_and_refused_with_a_reason_only_where_pillow_lacks_it():
    assert "avif" in DECODABLE_EXTS
    assert FilterConfig(file_exts=[".AVIF", "jpg"]).file_exts == ["avif", "jpg"]
    assert FilterConfig().file_exts == ["jpg", "png", "webp"]  # default unchanged: ingest fingerprints keep
    with pytest.raises(ValueError, match="cannot be verified"):
        FilterConfig(file_exts=["heic"])


def test_choosing_avif_where_pillow_lacks_it_is_a_config_error_saying_what_to_install(monkeypatch, tmp_path):
    import pipeline_config.ingest as ingest_cfg
    from data_contracts.errors import ConfigError

    # what a Pillow without libavif computes at import
    monkeypatch.setattr(ingest_cfg, "DECODABLE_EXTS", tuple(e for e in DECODABLE_EXTS if e != "avif"))
    with pytest.raises(ConfigError) as err:
        make_cfg(tmp_path, "http://127.0.0.1:9", filters={"file_exts": WITH_AVIF})
    text = str(err.value)
    assert "file_exts" in text and "cannot decode AVIF" in text and "pillow>=11.2.1" in text, text
    assert make_cfg(tmp_path, "http://127.0.0.1:9").ingest.filters.file_exts == ["jpg", "png", "webp"]


def test_avif_and_webp_posts_accepted_when_chosen(booru, tmp_path):
    b, avif_id, webp_id = booru
    with serve_minibooru(b.root) as server:
        posts, rejects, pool = _run(tmp_path, server.url, WITH_AVIF)
    rows = {r["id"]: r for r in posts.to_pylist()}
    assert avif_id in rows and webp_id in rows, {r["id"]: r["reason"] for r in rejects.to_pylist()}
    assert rows[avif_id]["query"] == "avif" and rows[avif_id]["file_ext"] == "avif"
    assert rows[avif_id]["image_path"].endswith(".avif") and rows[webp_id]["image_path"].endswith(".webp")
    for pid, fmt in ((avif_id, "AVIF"), (webp_id, "WEBP")):
        path = pool / rows[pid]["image_path"]
        data = path.read_bytes()
        assert hashlib.md5(data).hexdigest() == rows[pid]["md5"] and len(data) == rows[pid]["file_size"]
        with Image.open(path) as img:
            img.load()
            assert img.format == fmt and img.size == (rows[pid]["width"], rows[pid]["height"])


def test_default_file_exts_reject_avif_as_unsupported_and_take_webp(booru, tmp_path):
    b, avif_id, webp_id = booru
    with serve_minibooru(b.root) as server:
        posts, rejects, _ = _run(tmp_path, server.url, None)
    assert webp_id in posts.column("id").to_pylist()
    why = {r["id"]: r for r in rejects.to_pylist()}
    assert why[avif_id]["reason"] == "unsupported_ext" and "'avif'" in why[avif_id]["detail"]


def test_a_cut_avif_body_is_truncated(booru, tmp_path):
    from tasks.ingest.download import short_body
    from tasks.ingest.reasons import Reject
    from tasks.ingest.verify import verify_file

    b, avif_id, _ = booru
    raw = next(p for p in b.load_posts() if p["id"] == avif_id)
    post = parse_post(raw)
    data = b.image_path(raw["md5"], "avif").read_bytes()
    html = tmp_path / "page"
    html.write_bytes(b"<!DOCTYPE html><html><body>busy</body></html>")
    for cut in (40, len(data) // 2, len(data) - 5):  # inside the header, mid-stream, near the end
        stump = tmp_path / f"cut{cut}"
        stump.write_bytes(data[:cut])
        verdict = verify_file(stump, post, hashlib.md5(data[:cut]).hexdigest(), 10**8)
        final = short_body(verdict, post, cut, stump)
        assert final is not None and final.reason == "truncated", (cut, verdict, final)
    page = Reject("not_an_image", "UnidentifiedImageError")
    assert short_body(page, post, html.stat().st_size, html) == page  # an HTML page stays not_an_image

    # over HTTP: the server sends half the file as a complete response
    with serve_minibooru(b.root) as server:
        server.faults.truncate_ids = {avif_id}
        server.faults.truncate_mode = "short"
        posts, rejects, _ = _run(tmp_path, server.url, WITH_AVIF)
    assert avif_id not in posts.column("id").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects.to_pylist()}[avif_id] == "truncated"


def test_an_avif_pool_image_goes_through_tag_and_cache_loading(booru, tmp_path):
    from tasks.cache.images import Geometry, decode_tensors, load_pil, prepare
    from tasks.tag.cpu_pipeline import run_cpu_pipeline
    from tasks.tag.gpu_pipeline import decode_batch, load_file, prepare_batch
    from tasks.tag.preprocess import load_and_preprocess, preprocess_pil

    b, avif_id, _ = booru
    with serve_minibooru(b.root) as server:
        posts, _, pool = _run(tmp_path, server.url, WITH_AVIF)
    row = next(r for r in posts.to_pylist() if r["id"] == avif_id)
    path = pool / row["image_path"]
    w, h = row["width"], row["height"]
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape == (h, w, 3)

    # tag: the PIL reference path (CPU / ONNX) and the torch path's reader (non-JPEG goes through PIL)
    size = 64
    expected = preprocess_pil(Image.fromarray(rgb), size)
    np.testing.assert_array_equal(load_and_preprocess(path, size), expected)
    results = list(run_cpu_pipeline([(avif_id, path)], lambda x: x.reshape(len(x), -1)[:, :8].astype(np.float32),
                                    size, batch_size=4, workers=1))
    assert results[0].keys == [avif_id] and not results[0].errors
    np.testing.assert_array_equal(results[0].probs[0], expected.reshape(-1)[:8].astype(np.float32))
    loaded = load_file(path)
    assert isinstance(loaded, np.ndarray)
    np.testing.assert_array_equal(loaded, rgb)
    batch, good = prepare_batch(decode_batch([loaded], "cpu"), size, "cpu")
    assert good == [0] and batch.shape == (1, 3, size, size)

    # cache: bytes -> PIL for anything that is not a JPEG, in the PIL path and the torch path's reader
    geo = Geometry(w, h, w, h, (0, 0, w, h))
    np.testing.assert_array_equal(load_pil(path, geo), rgb)
    item = prepare(path)
    assert isinstance(item, np.ndarray)
    (tensor,) = decode_tensors([item], torch.device("cpu"), [str(path)])
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), rgb)
