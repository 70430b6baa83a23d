"""Decode + bucket crop: the PIL path, the torch path (same function the GPU runs), and bad images."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.cache.images import (Geometry, ImageError, crop_pil, crop_tensor, decode_tensors, load_pil, open_rgb,
                                prepare, uint8_to_pixels)
from tests.cache.data import geometry, picture


def _geo(w, h, bw, bh, flip=False) -> Geometry:
    g = geometry(w, h, bw, bh)
    return Geometry(w, h, g["resize_w"], g["resize_h"], (g["crop_left"], g["crop_top"], g["crop_right"],
                                                          g["crop_bottom"]), flip)


def _jpeg(img: Image.Image, path) -> None:
    img.save(path, "JPEG", quality=95)


def test_pil_crop_is_resize_then_box_then_flip(tmp_path):
    img = picture(150, 100, 1)
    geo = _geo(150, 100, 128, 64, flip=True)
    out = crop_pil(img, geo)
    assert out.shape == (64, 128, 3) and out.dtype == np.uint8
    expected = np.asarray(img.resize((geo.resize_w, geo.resize_h), Image.Resampling.BICUBIC).crop(geo.box))[:, ::-1]
    np.testing.assert_array_equal(out, expected)


def test_torch_path_matches_pil_path(tmp_path):
    path = tmp_path / "a.jpg"
    _jpeg(picture(200, 170, 2), path)
    geo = _geo(200, 170, 64, 64, flip=True)
    ref = uint8_to_pixels(load_pil(path, geo)[None])[0]
    [decoded] = decode_tensors([prepare(path)], torch.device("cpu"), [str(path)])
    ours = crop_tensor(decoded, geo)
    assert ours.shape == ref.shape == (3, 64, 64)
    diff = (ours - ref).abs()
    # Same geometry; the decoders and resamplers differ only in rounding (PIL rounds to uint8 after
    # resizing, libjpeg-turbo vs PIL's libjpeg upsampling): under ~2/255 on average, 12/255 at worst.
    assert diff.mean() < 2 / 127.5, diff.mean()
    assert diff.max() < 12 / 127.5, diff.max()


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    img = open_rgb(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    png = tmp_path / "x.png"
    png.write_bytes(buf.getvalue())
    [decoded] = decode_tensors([prepare(png)], torch.device("cpu"), [str(png)])
    assert decoded[:, 0, 0].tolist() == [255, 255, 255]


def test_bad_images_raise_reasons(tmp_path):
    with pytest.raises(ImageError) as missing:
        load_pil(tmp_path / "nope.jpg", _geo(64, 64, 64, 64))
    assert missing.value.reason == "image_missing"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(ImageError) as corrupt:
        load_pil(bad, _geo(64, 64, 64, 64))
    assert corrupt.value.reason == "decode_error"
    [err] = decode_tensors([prepare(bad)], torch.device("cpu"), [str(bad)])
    assert isinstance(err, ImageError) and err.reason == "decode_error"
    ok = tmp_path / "ok.jpg"
    _jpeg(picture(80, 80, 3), ok)
    with pytest.raises(ImageError) as size:
        load_pil(ok, _geo(90, 80, 64, 64))
    assert size.value.reason == "size_mismatch"
