"""Pre-processing against hand-computed references (tiny images, every pixel known)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tasks.tag.gpu_pipeline import decode_batch, is_complete_jpeg, load_file, pad_resize, prepare_batch
from tasks.tag.preprocess import (ImageError, load_and_preprocess, open_image, pad_offsets, preprocess_pil,
                                  to_onnx_input, to_timm_input)

R, G, B = (200, 10, 30), (20, 180, 40), (5, 60, 250)


def test_pad_offsets_centre_with_floor():
    assert pad_offsets(2, 4) == (4, 1, 0)
    assert pad_offsets(3, 6) == (6, 1, 0)  # odd slack: 1 left, 2 right (floor on the left/top)
    assert pad_offsets(6, 3) == (6, 0, 1)
    assert pad_offsets(5, 5) == (5, 0, 0)


def test_wide_image_padded_top_and_bottom_with_white_no_resize():
    # 4 wide x 2 high -> 4x4 square: rows 0 and 3 white, rows 1-2 the image (size equals side: no resize)
    img = np.array([[R, G, B, R], [B, B, G, G]], dtype=np.uint8)
    out = preprocess_pil(Image.fromarray(img), 4)
    expected = np.full((4, 4, 3), 255, np.uint8)
    expected[1:3] = img
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out, expected)


def test_tall_odd_image_padded_left_one_right_two():
    img = np.zeros((6, 3, 3), np.uint8)
    img[:] = G
    out = preprocess_pil(Image.fromarray(img), 6)
    assert (out[:, 0] == 255).all() and (out[:, 4:] == 255).all()
    assert (out[:, 1:4] == G).all()


def test_rgba_composited_on_white_and_palette_transparency():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)      # fully transparent red -> white
    rgba[0, 1] = (0, 0, 0, 128)      # half black -> 255 * (1 - 128/255) = 127
    rgba[1, 0] = (10, 20, 30, 255)   # opaque -> itself
    rgba[1, 1] = (0, 255, 0, 255)
    out = preprocess_pil(Image.fromarray(rgba, "RGBA"), 2)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (127, 127, 127)
    assert tuple(out[1, 0]) == (10, 20, 30)
    la = Image.fromarray(rgba[..., [0, 3]], "LA")  # grey + alpha goes through the same composite
    assert tuple(preprocess_pil(la, 2)[0, 0]) == (255, 255, 255)


def test_bicubic_resize_to_model_size():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    square = Image.new("RGB", (50, 50), (255, 255, 255))
    square.paste(img, (0, 10))
    expected = np.asarray(square.resize((16, 16), Image.BICUBIC))
    np.testing.assert_array_equal(preprocess_pil(img, 16), expected)


def test_onnx_layout_is_bgr_float_0_255_nhwc():
    rgb = np.array([[[R, G], [B, (0, 0, 0)]]], np.uint8)  # N=1, 2x2
    x = to_onnx_input(rgb)
    assert x.dtype == np.float32 and x.shape == (1, 2, 2, 3)
    assert tuple(x[0, 0, 0]) == (30.0, 10.0, 200.0)  # B, G, R
    assert x.min() >= 0 and x.max() <= 255 and x.max() > 1  # not normalised


def test_timm_layout_is_normalised_bgr_nchw():
    rgb = torch.tensor([[[[0.0]], [[127.5]], [[255.0]]]])  # N=1, C=3 (R=0, G=127.5, B=255), 1x1
    x = to_timm_input(rgb)
    assert x.shape == (1, 3, 1, 1)
    assert x[0, :, 0, 0].tolist() == [1.0, 0.0, -1.0]  # B first: (255/127.5 - 1) = 1; R last: -1


@pytest.mark.parametrize("w,h,size", [(37, 53, 64), (300, 200, 64), (20, 10, 64), (64, 64, 64)])
def test_device_pad_resize_matches_pil_reference(w, h, size):
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    ref = preprocess_pil(img, size).astype(np.float32)
    ours = pad_resize(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None], size)[0].permute(1, 2, 0).numpy()
    diff = np.abs(ref - ours)
    # Same kernel (PIL bicubic = torch antialiased bicubic); PIL works in fixed point, so <= 1 level apart.
    assert diff.max() <= 1.0 and diff.mean() < 0.2


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_device_decode_paths_match_pil(tmp_path):
    rng = np.random.default_rng(1)
    arr = np.asarray(Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1)))
    (tmp_path / "a.jpg").write_bytes(_jpeg(arr))
    rgba = np.dstack([arr, np.full(arr.shape[:2], 100, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    Image.fromarray(arr).save(tmp_path / "c.webp", lossless=True)
    names = ["a.jpg", "b.png", "c.webp"]
    loaded = [load_file(tmp_path / n) for n in names]
    assert isinstance(loaded[0], torch.Tensor)  # complete JPEG stays encoded for the batched decoder
    assert isinstance(loaded[1], np.ndarray) and isinstance(loaded[2], np.ndarray)
    x, good = prepare_batch(decode_batch(loaded, "cpu"), 32, "cpu")
    assert good == [0, 1, 2]
    for i, n in enumerate(names):
        ref = load_and_preprocess(tmp_path / n, 32).astype(np.float32)
        diff = np.abs(x[i].permute(1, 2, 0).numpy() - ref)
        assert diff.max() <= 2.0, n  # libjpeg-turbo vs PIL's libjpeg IDCT may differ by a level


def test_corrupt_and_truncated_images_are_typed_errors(tmp_path):
    good = _jpeg(np.full((64, 64, 3), 90, np.uint8))
    assert is_complete_jpeg(good) and not is_complete_jpeg(good[: len(good) // 2])
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all")
    (tmp_path / "badjpeg.jpg").write_bytes(good[:20] + b"\x00" * 300 + good[-2:])  # SOI ... EOI, garbage inside
    with pytest.raises(ImageError) as err:
        open_image(tmp_path / "trunc.jpg")
    assert err.value.reason == "truncated_image"
    with pytest.raises(ImageError) as err:
        open_image(tmp_path / "junk.jpg")
    assert err.value.reason == "undecodable_image"
    with pytest.raises(ImageError) as err:
        open_image(tmp_path / "missing.jpg")
    assert err.value.reason == "image_missing"
    loaded = [load_file(tmp_path / n) for n in ("trunc.jpg", "junk.jpg", "badjpeg.jpg", "missing.jpg")]
    decoded = decode_batch(loaded, "cpu")
    reasons = [d.reason if isinstance(d, ImageError) else "ok" for d in decoded]
    assert reasons[0] == "truncated_image" and reasons[1] == "undecodable_image" and reasons[3] == "image_missing"
    assert reasons[2] != "ok"
