"""The hash's fast PNG decode (libdeflate + the numba unfilter) against Pillow's decode, JPEG thumbnails against
Pillow's draft, the numpy DCT against scipy's, and bad PNG files as error rows."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.dedup import hashing
from tasks.dedup.hashing import DECODE_ENV, hash_files, load_grey, phash_pixels



def test_the_fast_png_decoder_is_installed():
    """numba and deflate are dependencies: without them every PNG silently takes Pillow's slower path."""
    assert hashing._png_unfilter() is not None


def picture(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields with edges and noise: every PNG filter type finds a row it wins."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(1, w - 1)), (y * 255 // max(1, h - 1)), ((x + y) * 3) % 256], -1)
    base[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)
    return np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    a, b, c = (v.astype(np.int32) for v in (a, b, c))
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png(path: Path, px: np.ndarray, colour: int, filters=(0, 1, 2, 3, 4), interlace: int = 0,
              extra: list[tuple[bytes, bytes]] = (), idat_size: int = 8192, level: int = 6) -> Path:
    """A PNG of 8-bit pixels [h, w, bpp] whose row y uses filter filters[y % len(filters)] (Pillow picks
    its own), IDAT split into idat_size pieces."""
    h, w = px.shape[:2]
    bpp = 1 if px.ndim == 2 else px.shape[2]
    rows = px.reshape(h, w * bpp).astype(np.int32)
    out = bytearray()
    for y in range(h):
        ft = filters[y % len(filters)]
        cur, prev = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        pred = {1: left, 2: prev, 3: (left + prev) // 2, 4: _paeth(left, prev, upleft)}.get(ft, 0)  # 5+: invalid
        out.append(ft)
        out += ((cur - pred) % 256).astype(np.uint8).tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    data = zlib.compress(bytes(out), level)
    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, interlace))]
    parts += [chunk(k, b) for k, b in extra]
    parts += [chunk(b"IDAT", data[i:i + idat_size]) for i in range(0, len(data), idat_size)]
    parts.append(chunk(b"IEND", b""))
    path.write_bytes(b"".join(parts))
    return path


def pillow_grey(path: Path) -> np.ndarray:
    """load_grey with Pillow decoding the file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DECODE_ENV, "pillow")
        return load_grey(path)


MODES = {"L": 0, "RGB": 2, "LA": 4, "RGBA": 6}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", [(333, 217), (64, 64), (150, 1000), (40, 30)])
def test_png_fast_decode_gives_pillows_pixels(tmp_path, mode, size):
    w, h = size
    rgb = picture(w, h, seed=w)
    alpha = np.full((h, w), 255, np.uint8)
    alpha[: h // 2, : w // 3] = np.arange(w // 3, dtype=np.uint8)  # partly transparent
    px = {"L": rgb[..., 0], "RGB": rgb, "LA": np.dstack([rgb[..., 0], alpha]), "RGBA": np.dstack([rgb, alpha])}[mode]
    path = write_png(tmp_path / f"{mode}.png", px, MODES[mode])
    with Image.open(path) as img:
        reference = img.convert("RGBA" if "A" in mode else "L")
        reference.load()
    with Image.open(path) as img:
        decoded = hashing._decode_png(img)
    assert decoded is not None
    want = reference if decoded.mode == reference.mode else reference.convert(decoded.mode)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(want))
    np.testing.assert_array_equal(load_grey(path), pillow_grey(path))


def test_opaque_rgba_png_turns_straight_to_luma(tmp_path):
    rgb = picture(300, 200, seed=3)
    path = write_png(tmp_path / "opaque.png", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]), 6)
    with Image.open(path) as img:
        decoded = hashing._decode_png(img)
    assert decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(Image.fromarray(rgb).convert("L")))
    np.testing.assert_array_equal(load_grey(path), pillow_grey(path))


@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (4, 4, 2, 1, 3, 0)])
def test_each_png_filter(tmp_path, filters):
    path = write_png(tmp_path / "f.png", picture(257, 190, seed=len(filters)), 2, filters=filters, idat_size=1000)
    with Image.open(path) as img:
        decoded = hashing._decode_png(img)
        want = np.asarray(img.convert("L"))
    np.testing.assert_array_equal(np.asarray(decoded), want)


def test_pngs_the_fast_decoder_leaves_to_pillow_still_hash_alike(tmp_path):
    rgb = picture(400, 300, seed=5)
    files = {
        "palette": tmp_path / "palette.png",
        "16bit": tmp_path / "16bit.png",
        "trns": write_png(tmp_path / "trns.png", rgb, 2, extra=[(b"tRNS", b"\x00\x01\x00\x02\x00\x03")]),
        "pillow": tmp_path / "pillow.png",
    }
    Image.fromarray(rgb).quantize(64).save(files["palette"])
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(files["16bit"])
    Image.fromarray(rgb).save(files["pillow"])
    for name, path in files.items():
        with Image.open(path) as img:
            assert (hashing._decode_png(img) is None) == (name != "pillow"), name
        np.testing.assert_array_equal(load_grey(path), pillow_grey(path), err_msg=name)
    with Image.open(write_png(tmp_path / "adam7-flag.png", rgb, 2, interlace=1)) as img:
        assert hashing._decode_png(img) is None  # interlaced: Pillow's


@pytest.mark.parametrize("size", [(1600, 1200), (600, 400), (300, 200), (200, 150), (100, 90)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpeg_fast_decode_gives_pillows_draft(tmp_path, size, mode):
    path = tmp_path / "p.jpg"
    img = Image.fromarray(picture(*size, seed=size[0]))
    (img if mode == "RGB" else img.convert("L")).save(path, quality=90)
    np.testing.assert_array_equal(load_grey(path), pillow_grey(path))


def test_cmyk_and_progressive_jpegs(tmp_path):
    img = Image.fromarray(picture(900, 700, seed=9))
    img.convert("CMYK").save(tmp_path / "cmyk.jpg")
    img.save(tmp_path / "progressive.jpg", progressive=True)
    for name in ("cmyk.jpg", "progressive.jpg"):
        np.testing.assert_array_equal(load_grey(tmp_path / name), pillow_grey(tmp_path / name), err_msg=name)


def test_bad_pngs_are_error_rows(tmp_path):
    good = write_png(tmp_path / "good.png", picture(300, 200, seed=1), 2)
    data = good.read_bytes()
    idat = data.index(b"IDAT")
    (tmp_path / "truncated.png").write_bytes(data[: idat + 2000])
    flipped = bytearray(data)
    for k in range(200, 260):  # scramble the deflate stream in the first IDAT
        flipped[idat + 4 + k] ^= 0x5A
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    write_png(tmp_path / "badfilter.png", picture(300, 200, seed=1), 2, filters=(2,) * 7 + (9,))  # no type 9
    files = [good, tmp_path / "truncated.png", tmp_path / "flipped.png", tmp_path / "badfilter.png", good]
    for path in files[1:4]:
        with Image.open(path) as img:
            assert hashing._decode_png(img) is None, path.name  # left to Pillow, which raises
    for workers in (0, 2):
        result = hash_files(files, workers=workers, chunk=2)
        assert result.ok.tolist() == [True, False, False, False, True]
        assert {e.index: e.reason for e in result.errors} == {1: "undecodable_image", 2: "undecodable_image",
                                                              3: "undecodable_image"}
        assert result.hashes[0] == result.hashes[4] != 0


def test_numpy_dct_bits_equal_scipy_even_on_ties():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.integers(-3, 4, (3000, 32, 32)), 1), 2)
    smooth = ((smooth - smooth.min((1, 2), keepdims=True)) * 255 // (np.ptp(smooth, (1, 2), keepdims=True) + 1))
    mirrored = smooth[:500].copy()
    mirrored[:, :, 16:] = mirrored[:, :, :16][:, :, ::-1]
    flat = np.repeat(np.arange(0, 256, 5)[:, None, None], 32, 1).repeat(32, 2)
    for px in (rng.integers(0, 256, (3000, 32, 32)), smooth, mirrored, flat):
        px = px.astype(np.uint8)
        np.testing.assert_array_equal(phash_pixels(px), hashing._phash_scipy(px))


def test_pool_keeps_order_over_a_jpeg_png_mix(tmp_path):
    files = []
    for k in range(12):
        img = Image.fromarray(picture(200 + k, 160, seed=k))
        path = tmp_path / (f"{k}.png" if k % 3 == 0 else f"{k}.jpg")
        img.save(path)
        files.append(path)
    inline = hash_files(files, workers=0)
    pooled = hash_files(files, workers=2, chunk=2)
    np.testing.assert_array_equal(pooled.hashes, inline.hashes)
    assert pooled.ok.all()
