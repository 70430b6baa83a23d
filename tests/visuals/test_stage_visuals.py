"""Each stage's pictures from small real tables and images: expected files, sizes and contents."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from data_contracts.quality import QUALITY_LABELS
from data_contracts.tables import read_table, write_table
from data_contracts.tag import TAGS_SCHEMA
from data_contracts.train import HISTORY_SCHEMA
from tasks.bucket.visuals import make_bucket_sheets
from tasks.common import visuals as v
from tasks.ingest.visuals import make_character_sheets, make_ingest_visuals, make_rejects_sheet, make_series_sheets
from tasks.quality.visuals import make_label_sheets, make_norm_histogram, make_quality_visuals
from tasks.tag.visuals import make_tag_sheets
from tasks.train.visuals import make_train_curves
from tests.visuals import data


def sheet_size_ok(path: Path, n_tiles: int, *, thumb: int = v.THUMB, caption_rows: int = 2, tile_w: int | None = None):
    """The PNG exists and has the contact-sheet size for n tiles (title of 1..3 lines)."""
    tw = tile_w or thumb
    cols = min(n_tiles, (v.MAX_WIDTH - v.PAD) // (tw + v.PAD))
    rows = -(-n_tiles // cols)
    lh = v.line_height()
    width = max(v.MIN_WIDTH, cols * (tw + v.PAD) + v.PAD)
    heights = {t * lh + 2 * v.PAD + rows * (thumb + caption_rows * lh + 2 * v.PAD) for t in (1, 2, 3)}
    size = Image.open(path).size
    assert size[0] == width and size[1] in heights, (path.name, size, width, heights)
    assert width <= v.MAX_WIDTH


def tile(sheet: Path, i: int, n_tiles: int, *, thumb: int = v.THUMB, caption_rows: int = 2) -> np.ndarray:
    """Pixels of tile i (row-major), assuming a one-line title."""
    cols = min(n_tiles, (v.MAX_WIDTH - v.PAD) // (thumb + v.PAD))
    lh = v.line_height()
    x = v.PAD + (i % cols) * (thumb + v.PAD)
    y = lh + 2 * v.PAD + (i // cols) * (thumb + caption_rows * lh + 2 * v.PAD)
    return np.asarray(Image.open(sheet).convert("RGB"))[y:y + thumb, x:x + thumb].astype(int)


def test_ingest_character_and_series_sheets(world):
    images = make_character_sheets(world.posts, world.pool, world.out)
    assert list(images) == ["character: hatsune_miku", "character: kagamine_rin", "character: megurine_luka_(append)"]
    miku = world.out / images["character: hatsune_miku"]
    sheet_size_ok(miku, 4)
    # Best score first: post 1006 (score 55) is the first tile, 1000 (score -5) the last.
    by_id = {r["id"]: r for r in world.post_rows}
    for i, post_id in ((0, 1006), (3, 1000)):
        expected = np.asarray(v.thumbnail(world.pool / by_id[post_id]["image_path"])).astype(int)
        assert np.abs(tile(miku, i, 4) - expected).mean() < 1.0
    series = make_series_sheets(world.posts, world.pool, world.out, max_items=3, max_groups=1)
    assert list(series) == ["series: vocaloid"]
    sheet_size_ok(world.out / series["series: vocaloid"], 3)


def test_ingest_rejects_sheet_only_where_an_image_exists(world):
    rejects = data.rejects_table(world.tmp)
    rows = {r["id"]: r for r in world.post_rows}
    paths = {1003: rows[1001]["image_path"], 1005: rows[1005]["image_path"], 7777: "images/zz/gone.jpg"}
    images = make_rejects_sheet(rejects, world.pool, world.out, paths)
    sheet_size_ok(world.out / images["rejects by reason"], 2, caption_rows=4)
    assert make_rejects_sheet(rejects, world.pool, world.out, {7777: "images/zz/gone.jpg"}) == {}
    everything = make_ingest_visuals(world.posts, rejects, world.pool, world.tmp / "all", reject_image_paths=paths)
    assert len(everything) == 3 + 2 + 1
    assert all((world.tmp / "all" / rel).is_file() for rel in everything.values())


def test_tag_sheets_show_added_and_disputed(world):
    tags = data.tags_table(world.post_rows, world.tmp)
    images = make_tag_sheets(tags, world.posts, world.pool, world.out)
    assert list(images) == ["tagger additions", "disputed tags"]
    sheet_size_ok(world.out / images["tagger additions"], 5, thumb=176, caption_rows=6)  # rows 0,2,3,4,6
    sheet_size_ok(world.out / images["disputed tags"], 3, thumb=176, caption_rows=6)  # rows 0,3,6
    px = np.asarray(Image.open(world.out / images["disputed tags"]).convert("RGB"))
    assert (np.abs(px.astype(int) - v.RED).max(-1) < 40).sum() > 20  # red disputed text is drawn
    none_disputed = tags.set_column(tags.schema.get_field_index("disputed"), "disputed",
                                    pa.array([[]] * tags.num_rows, TAGS_SCHEMA.field("disputed").type))
    write_table(none_disputed, world.tmp / "t2.parquet", TAGS_SCHEMA)
    only = make_tag_sheets(read_table(world.tmp / "t2.parquet", TAGS_SCHEMA), world.posts, world.pool, world.out)
    assert list(only) == ["tagger additions"]


def test_quality_label_sheets_and_histogram(world):
    quality = data.quality_table(world.post_rows, world.tmp)
    images = make_quality_visuals(quality, world.posts, world.pool, world.out)
    assert list(images) == ["norm_score histogram", *(f"label: {label}" for label in QUALITY_LABELS)]
    assert Image.open(world.out / images["norm_score histogram"]).size == (700, 300)
    for label in QUALITY_LABELS:
        sheet_size_ok(world.out / images[f"label: {label}"], 2)
    only_two = quality.filter(pc.is_in(quality.column("label"), pa.array(["worst score", "masterpiece"])))
    assert list(make_label_sheets(only_two, world.posts, world.pool, world.out)) == ["label: worst score",
                                                                                    "label: masterpiece"]
    assert make_norm_histogram(only_two, world.out)


def test_bucket_sheets_draw_the_crop_box(world):
    buckets = data.buckets_table(world.post_rows, world.tmp)
    images = make_bucket_sheets(buckets, world.posts, world.pool, world.out)
    sizes = {}
    for r in data.bucket_rows(world.post_rows):
        sizes.setdefault(f"bucket {r['bucket_w']}x{r['bucket_h']}", []).append(r)
    assert set(images) == set(sizes)
    for caption, rows in sizes.items():
        sheet = world.out / images[caption]
        sheet_size_ok(sheet, len(rows), caption_rows=3)
        px = np.asarray(Image.open(sheet).convert("RGB")).astype(int)
        assert (np.abs(px - v.BOX).max(-1) == 0).sum() >= len(rows) * 4 * 40  # a 2-px box around every tile
    # A crop that drops part of the image dims that part: the 192x64 image (post 1003) in 80x48.
    row = next(r for r in data.bucket_rows(world.post_rows) if r["id"] == 1003)
    from tasks.bucket.visuals import crop_preview

    preview = np.asarray(crop_preview(world.pool / world.post_rows[3]["image_path"], row)).astype(int)
    plain = np.asarray(v.thumbnail(world.pool / world.post_rows[3]["image_path"])).astype(int)
    left = slice(0, 20)  # cut away on the left of the centre crop
    band = slice(80 - 10, 80 + 10)
    assert preview[band, left].mean() < 0.6 * plain[band, left].mean()
    assert np.abs(preview[band, 70:90] - plain[band, 70:90]).mean() < 2  # the kept centre is untouched


def test_train_curves(tmp_path):
    n = 120
    steps = np.arange(1, n + 1) * 10
    rows = [{"step": int(s), "epoch": int(s // 400), "loss": float(0.5 * np.exp(-s / 500) + 0.1),
             "lr": 1e-4 * min(1, s / 200),
             "grad_norm": 1.0 + (s % 7) / 10, "samples_per_s": 30.0 + (s % 5), "data_wait_frac": 0.05,
             "gpu_mem_gib": None, "skipped_steps": 0, "val_loss": 0.3 if s % 400 == 0 else None} for s in steps]
    write_table(pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA), tmp_path / "history.parquet", HISTORY_SCHEMA)
    history = read_table(tmp_path / "history.parquet", HISTORY_SCHEMA)
    images = make_train_curves(history, tmp_path)
    assert images == {"training curves": "visuals/train-curves.png"}
    assert Image.open(tmp_path / images["training curves"]).size == (1000, 620)
    assert make_train_curves(history.slice(0, 0), tmp_path) == {}


@pytest.mark.parametrize("maker", ["quality", "bucket"])
def test_same_seed_same_bytes(world, maker):
    if maker == "quality":
        table = data.quality_table(world.post_rows, world.tmp)
        run = lambda out: make_label_sheets(table, world.posts, world.pool, out, max_items=1)  # noqa: E731
    else:
        table = data.buckets_table(world.post_rows, world.tmp)
        run = lambda out: make_bucket_sheets(table, world.posts, world.pool, out, max_items=1)  # noqa: E731
    a, b = run(world.tmp / "a"), run(world.tmp / "b")
    assert a == b
    assert all((world.tmp / "a" / rel).read_bytes() == (world.tmp / "b" / rel).read_bytes() for rel in a.values())
