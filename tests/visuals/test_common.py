import numpy as np
import pytest
from PIL import Image

from tasks.common import visuals as v


def test_pick_is_deterministic_order_independent_and_stable_under_removal():
    ids = np.arange(5000, 6000)
    chosen = ids[v.pick(ids, 20, seed=3)]
    assert len(set(chosen)) == 20
    assert list(chosen) == list(ids[v.pick(ids, 20, seed=3)])
    shuffled = np.random.default_rng(0).permutation(ids)
    assert list(shuffled[v.pick(shuffled, 20, seed=3)]) == list(chosen)  # row order does not matter
    assert set(ids[v.pick(ids, 20, seed=4)]) != set(chosen)  # the seed does
    # Removing rows that were not shown keeps the same selection (a growing table keeps its samples).
    kept = np.setdiff1d(ids, np.setdiff1d(ids, chosen)[:300])
    assert set(kept[v.pick(kept, 20, seed=3)]) == set(chosen)
    assert len(v.pick(ids[:5], 20)) == 5 and len(v.pick([], 3)) == 0


def test_slug_is_safe_and_distinct():
    a, b = v.slug("miku_(append)"), v.slug("miku (append)")
    assert a != b and all(c.isalnum() or c in "_-" for c in a + b)


def test_letterbox_keeps_aspect_and_pads():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    out = np.asarray(v.letterbox(img, 160))
    assert out.shape == (160, 160, 3)
    assert (out[:39] == v.LETTERBOX).all() and (out[41:119] == (255, 0, 0)).all() and (out[121:] == v.LETTERBOX).all()
    assert v.letterbox(img, (300, 100)).size == (300, 100)


def test_open_rgb_composites_alpha_on_white_and_tolerates_bad_files(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    rgba.save(tmp_path / "a.png")
    assert np.asarray(v.open_rgb(tmp_path / "a.png")).min() == 255
    (tmp_path / "bad.jpg").write_bytes(b"<html>not an image</html>")
    assert v.open_rgb(tmp_path / "bad.jpg") is None and v.open_rgb(tmp_path / "missing.png") is None
    assert v.thumbnail(tmp_path / "missing.png") is None


def test_wrap_fits_width_and_keeps_every_word():
    text = "+long_hair .91, +twintails .62, +a_very_long_tag_name_that_cannot_fit_on_one_line_at_all .50"
    lines = v.wrap(text, 120)
    assert len(lines) > 2 and all(v.text_width(line) <= 120 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_contact_sheet_layout_and_pixels():
    colours = [(i * 20, 255 - i * 20, 90) for i in range(9)]
    tiles = [v.Tile(Image.new("RGB", (100, 50), c), [f"#{i}", v.Line("x " * 80, v.MUTED)])
             for i, c in enumerate(colours)]
    tiles.append(v.Tile(None, ["missing"]))
    sheet = v.contact_sheet(tiles, "title", thumb=128, caption_rows=2, max_width=800)
    cols = (800 - v.PAD) // (128 + v.PAD)  # 5
    lh = v.line_height()
    title_h = lh + 2 * v.PAD
    cell_h = 128 + 2 * lh + v.PAD
    assert sheet.size == (cols * (128 + v.PAD) + v.PAD, title_h + 2 * (cell_h + v.PAD))
    px = np.asarray(sheet)
    for i in (0, 4, 8):  # each tile's centre shows its own image
        x = v.PAD + (i % cols) * (128 + v.PAD) + 64
        y = title_h + (i // cols) * (cell_h + v.PAD) + 64
        assert tuple(px[y, x]) == colours[i]
    x, y = v.PAD + 4 * (128 + v.PAD) + 5, title_h + cell_h + v.PAD + 5  # tile 9: the placeholder
    assert tuple(px[y, x]) == v.LETTERBOX
    narrow = v.contact_sheet(tiles[:1], "a title long enough to need more than one line " * 3, thumb=128)
    assert narrow.size[0] == v.MIN_WIDTH and narrow.size[1] > sheet.size[1] // 2 - 10


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert v.psnr(a, a) == float("inf")
    assert v.psnr(a, a + 10) == pytest.approx(10 * np.log10(255**2 / 100))


def test_save_png_and_histogram_are_atomic_and_deterministic(tmp_path):
    rel = v.save_png(Image.new("RGB", (10, 10)), tmp_path, "x")
    assert rel == "visuals/x.png" and (tmp_path / rel).is_file()
    values = np.random.default_rng(0).uniform(0, 1, 500)
    values[3] = np.nan
    mask = values > 0.5
    rel = v.histogram(values, tmp_path, "h", vlines=[(0.5, "cut")], groups=[("lo", ~mask), ("hi", mask)])
    first = (tmp_path / rel).read_bytes()
    assert Image.open(tmp_path / rel).size == (700, 300)
    v.histogram(values, tmp_path, "h", vlines=[(0.5, "cut")], groups=[("lo", ~mask), ("hi", mask)])
    assert (tmp_path / rel).read_bytes() == first
    assert not [p for p in (tmp_path / "visuals").iterdir() if p.name.endswith(".tmp")]


def test_smooth_matches_a_trailing_mean_skipping_nan():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0])
    out = v.smooth(x, 3)
    expected = [1.0, 1.5, 1.5, 3.0, 4.5, 5.0]
    assert np.allclose(out, expected)
