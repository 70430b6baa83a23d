"""Train pictures and tables that read on their own: LR ticks without offset text, rounded tables without
empty columns, sample grids captioned with prompt and seed."""
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from data_contracts.train import HISTORY_SCHEMA
from tasks.train.sampling import save_grid
from tasks.train.visuals import report_table_rows, tick_label, train_curves_figure


def _history(lr_start: float = 1.0e-4, lr_slope: float = 2e-7, n: int = 10) -> pa.Table:
    rows = [{"step": 10 * (i + 1), "epoch": 0, "loss": 1.0 / (i + 1), "lr": lr_start + lr_slope * i,
             "grad_norm": 1.5 + (i % 3), "samples_per_s": 1.0 + i % 2, "data_wait_frac": 0.01, "gpu_mem_gib": None,
             "skipped_steps": 0, "val_loss": None} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)


@pytest.mark.parametrize("lr_start, lr_slope", [(1.0e-4, 2e-7), (0.0, 5e-5), (1e-6, 1e-8), (5e-4, 0.0)])
def test_lr_axis_has_no_offset_text_and_every_tick_reads_alone(lr_start, lr_slope):
    fig = train_curves_figure(_history(lr_start, lr_slope))
    fig.canvas.draw()
    lr_ax = fig.axes[1]
    assert lr_ax.get_title() == "learning rate"
    assert lr_ax.yaxis.get_offset_text().get_text() == ""
    lo, hi = lr_ax.get_ylim()
    ticks = [(t.get_position()[1], t.get_text()) for t in lr_ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
    labels = [text for _, text in ticks]
    assert len(set(labels)) == len(labels) >= 3  # neighbouring ticks are told apart
    for value, text in ticks:
        assert float(text.replace("−", "-")) == pytest.approx(value, rel=1e-6, abs=1e-12)  # the label is the value


def test_tick_labels_use_short_scientific_notation_only_for_small_values():
    assert tick_label(1.0025e-4, 2.5e-7) == "1.0025e-4"
    assert tick_label(5e-4, 1e-4) == "5e-4"
    assert tick_label(0.5, 0.1) == "0.5" and tick_label(0, 1e-4) == "0" and tick_label(120, 20) == "120"


def test_log_axis_labels_are_plain_numbers():
    fig = train_curves_figure(_history())
    fig.canvas.draw()
    grad_ax = fig.axes[3]
    assert grad_ax.get_yscale() == "log"
    texts = [t.get_text() for t in grad_ax.get_yticklabels() + grad_ax.get_yticklabels(minor=True)]
    assert any(texts) and not any("times" in t or "×" in t or "^" in t for t in texts)


def test_report_table_rounds_floats_and_drops_empty_columns():
    rows = [{"step": 10, "loss": 0.9228016138076782, "lr": 0.0005, "gpu_mem_gib": None, "val_loss": None,
             "samples_per_s": 1234.56789},
            {"step": 20, "loss": 0.5993925929069519, "lr": 0.0005, "gpu_mem_gib": None, "val_loss": 0.880433566753,
             "samples_per_s": 1.0722022361743349}]
    out = report_table_rows(rows)
    assert list(out[0]) == ["step", "loss", "lr", "val_loss", "samples_per_s"]  # gpu_mem_gib empty everywhere
    assert out[0]["loss"] == 0.9228 and out[1]["val_loss"] == 0.8804 and out[0]["val_loss"] is None
    assert out[0]["samples_per_s"] == 1235.0 and out[1]["samples_per_s"] == 1.072 and out[0]["lr"] == 0.0005
    assert out[0]["step"] == 10 and isinstance(out[0]["step"], int)
    assert report_table_rows([]) == []


def test_sample_grid_tiles_carry_seed_and_prompt(tmp_path):
    white = np.full((4, 64, 64, 3), 255, dtype=np.uint8)  # blank images: every dark pixel is caption text
    prompts = ["1girl, solo, long hair, smile, masterpiece, good score", "1boy, solo"]
    captioned = np.asarray(Image.open(save_grid(white, tmp_path / "a.png", cols=2, prompts=prompts, seeds=[0, 1])))
    bare = np.asarray(Image.open(save_grid(white, tmp_path / "b.png", cols=2)))
    assert bare.shape == (128, 128, 3)  # unchanged without prompts (rows: prompts, columns: seeds)
    assert captioned.shape[0] > 2 * 128 and captioned.shape[1] >= 2 * 128  # tiles >= 128 px plus captions
    ink = captioned.min(-1) < 200
    rows_with_ink = np.flatnonzero(ink.any(1))
    assert len(rows_with_ink) > 0
    # captions sit under the tiles of both rows: ink below the first tile row and at the bottom
    assert rows_with_ink.min() > 128 and rows_with_ink.max() > captioned.shape[0] - 40
