"""Grids that explain themselves: captions wrapped inside their tile, small tiles enlarged, rows/columns labelled."""
import numpy as np
import pytest
from PIL import Image

from tasks.common.visuals import font, text_width
from tasks.sample.grid import MIN_CELL, labelled_grid, make_grid, wrap_label

LONG_TAG = "character_with_a_very_long_name_(series_name)_and_more_words"


def _dark(px: np.ndarray) -> np.ndarray:
    """Text pixels: clearly darker than the white background."""
    return px.min(-1) < 200


def _text_line_count(region: np.ndarray) -> int:
    rows = _dark(region).any(1)
    return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0])  # runs of rows holding ink


def test_wrap_label_breaks_long_tags_after_underscores_and_fits_the_width():
    fnt = font()
    lines = wrap_label(LONG_TAG, 120, fnt)
    assert len(lines) > 1 and all(text_width(line, fnt) <= 120 for line in lines)
    assert "".join(lines) == LONG_TAG  # nothing lost, no spaces added
    assert all(line.endswith("_") for line in lines[:-1])  # broke where the tag allows it
    cut = wrap_label(LONG_TAG, 120, fnt, max_lines=2)
    assert len(cut) == 2 and cut[-1].endswith("…") and text_width(cut[-1], fnt) <= 120


def test_a_long_label_wraps_inside_its_tile():
    white = [Image.new("RGB", (64, 64), (255, 255, 255))] * 2  # blank tiles: every dark pixel is text
    grid = make_grid(white, cols=2, labels=[LONG_TAG, ""], pad=4, label_lines=3)
    px = np.asarray(grid).astype(int)
    cell = MIN_CELL  # 64 px images are enlarged to 128
    assert grid.width == 2 * cell + 3 * 4
    strip = px[4 + cell:, :]
    first_tile_end = 4 + cell
    assert not _dark(strip[:, first_tile_end:]).any()  # no text past the first tile's edge
    assert _dark(strip[:, 4:first_tile_end]).any()
    assert _text_line_count(strip[:, 4:first_tile_end]) == 3  # wrapped onto all three caption lines


def test_small_images_are_enlarged_by_whole_pixels():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    grid = np.asarray(make_grid([small], pad=0))
    assert grid.shape[:2] == (MIN_CELL, MIN_CELL)
    np.testing.assert_array_equal(grid, np.asarray(small).repeat(4, 0).repeat(4, 1))  # nearest: model's pixels


def test_labelled_grid_labels_rows_and_columns_and_keeps_text_in_its_column():
    rng = np.random.default_rng(1)
    ims = [[Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)] for _ in range(2)]
    sheet = labelled_grid(ims, [LONG_TAG + "\ncharacter, 12 training images", "kagamine_rin"],
                          ["seed 0", "seed 1", "seed 2"], title="step 120", pad=4)
    px = np.asarray(sheet).astype(int)
    label_w = MIN_CELL
    first_col = 4 + label_w + 4
    assert sheet.width == first_col + 3 * (MIN_CELL + 4)  # tiles >= 128 px
    # the first image sits below the title and column labels, enlarged 2x
    top = next(y for y in range(px.shape[0]) if (px[y, first_col:first_col + MIN_CELL] != 255).any(-1).all())
    np.testing.assert_array_equal(px[top:top + MIN_CELL, first_col:first_col + MIN_CELL],
                                  np.asarray(ims[0][0]).repeat(2, 0).repeat(2, 1))
    labels = px[top:top + MIN_CELL, :first_col]
    assert not _dark(labels[:, 4 + label_w - 4:]).any()  # the row label never runs into the images
    assert _text_line_count(labels) >= 4  # the long tag wrapped, and the grey second paragraph below it
    header = px[:top, first_col:first_col + MIN_CELL]
    assert _dark(header).any()  # "seed 0" above the first column


def test_bad_label_counts_are_errors():
    im = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError):
        make_grid([im], labels=["a", "b"])
    with pytest.raises(ValueError):
        labelled_grid([[im]], ["a", "b"], ["seed 0"])
