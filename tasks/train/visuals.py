"""Train pictures: loss, learning-rate and throughput curves from the history table.

Input: history.parquet (data_contracts/train.py HISTORY_SCHEMA; one row per logged step, validation
rows merged in). The sample grids are written by training itself (TrainManifest.samples).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.common.visuals import new_figure, save_figure, smooth

TABLE_DIGITS = 4  # significant digits of the floats in the report's history table


def _round_sig(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def report_table_rows(rows: list[dict[str, Any]], digits: int = TABLE_DIGITS) -> list[dict[str, Any]]:
    """Rows for a report table: floats to ``digits`` significant digits (a loss of 0.9228016138076782
    reads 0.9228), and columns empty in every row left out (the history's gpu_mem_gib on a CPU run,
    val_loss when validation is off)."""
    keep = [k for k in dict.fromkeys(k for r in rows for k in r) if any(r.get(k) is not None for r in rows)]
    return [{k: _round_sig(r[k], digits) if isinstance(r.get(k), float) else r.get(k) for k in keep}
            for r in rows]


def tick_label(x: float, step: float) -> str:
    """A tick label that stands alone: as many decimals as the tick step needs, "1.0025e-4" style below
    1e-3 (never matplotlib's shared "1e-4" / "+1.0001e-4" text above the axis)."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    mantissa_text, exp_text = f"{abs(step) or abs(x):.6e}".split("e")  # 9.9999999e-6 (float noise) -> 1e-5
    mantissa, step_exp = float(mantissa_text), int(exp_text)
    decimals = -step_exp + (0 if mantissa.is_integer() else 1)  # 2.5e-7 needs one digit more than 1e-7
    exp = math.floor(math.log10(abs(x)))
    if -3 <= exp < 6:
        return f"{x:.{max(0, decimals)}f}"
    return f"{x / 10 ** exp:.{max(0, decimals + exp)}f}e{exp}"


def plain_formatter():
    """A linear-axis formatter labelling ticks by ``tick_label``: no offset, no shared multiplier.
    (Built on call: matplotlib is imported only when a picture is drawn.)"""
    from matplotlib.ticker import Formatter

    class PlainFormatter(Formatter):
        step = 0.0  # the tick spacing, set with the ticks (0: unknown, a tick labels itself)

        def set_locs(self, locs) -> None:
            super().set_locs(locs)
            finite = np.sort(np.asarray([v for v in locs if np.isfinite(v)], dtype=np.float64))
            steps = np.diff(finite)
            steps = steps[steps > 0]
            self.step = float(steps.min()) if len(steps) else 0.0

        def __call__(self, x: float, pos: int | None = None) -> str:
            return tick_label(float(x), self.step or abs(float(x)))

        def get_offset(self) -> str:
            return ""

    return PlainFormatter()


def _col(history: pa.Table, name: str) -> np.ndarray:
    return history.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN


def make_train_curves(history: pa.Table, out_dir: Path, *, smooth_window: int = 0) -> dict[str, str]:
    """One 1000 x 620 px figure: loss (raw, moving average, held-out val_loss), learning rate,
    samples/s (with the data-wait fraction), gradient norm. {} when the history has no rows.

    smooth_window: moving-average length in logged steps (0: about 1/20 of the run, at least 1)."""
    if history.num_rows == 0:
        return {}
    return {"training curves": save_figure(train_curves_figure(history, smooth_window), out_dir, "train-curves")}


def train_curves_figure(history: pa.Table, smooth_window: int = 0):
    """The matplotlib Figure behind ``make_train_curves`` (history with at least one row); axes in the
    order loss, learning rate, throughput, gradient norm."""
    history = history.sort_by("step")
    step = _col(history, "step")
    loss, val, lr = _col(history, "loss"), _col(history, "val_loss"), _col(history, "lr")
    speed, wait, grad = _col(history, "samples_per_s"), _col(history, "data_wait_frac"), _col(history, "grad_norm")
    window = smooth_window or max(1, int(np.isfinite(loss).sum()) // 20)

    fig = new_figure(10.0, 6.2)
    axes = fig.subplots(2, 2, sharex=True)
    ax = axes[0, 0]
    ok = np.isfinite(loss)
    ax.plot(step[ok], loss[ok], color="#99bbdd", lw=0.8, label="loss")
    if window > 1:
        ax.plot(step[ok], smooth(loss[ok], window), color="#225588", lw=1.5, label=f"mean of {window}")
    vok = np.isfinite(val)
    if vok.any():
        ax.plot(step[vok], val[vok], "o-", color="#cc4411", ms=3, lw=1.2, label="val_loss (held out)")
    ax.set_title("loss", fontsize=10)
    ax.yaxis.set_major_formatter(plain_formatter())  # a flat loss (0.6001..0.6004) gets no offset either
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    ok = np.isfinite(lr)
    ax.plot(step[ok], lr[ok], color="#117733")
    ax.set_title("learning rate", fontsize=10)
    ax.yaxis.set_major_formatter(plain_formatter())  # each tick reads as is: 1.5e-4, not 1.5 + "1e-4" on top

    ax = axes[1, 0]
    ok = np.isfinite(speed)
    ax.plot(step[ok], speed[ok], color="#882255", label="samples/s")
    ax.set_title("throughput", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s")
    if ok.any():
        ax.set_ylim(0, 1.1 * float(np.nanmax(speed[ok])) or 1.0)  # from 0: small wobbles stay small
    wok = np.isfinite(wait)
    if wok.any():
        twin = ax.twinx()
        twin.plot(step[wok], 100 * wait[wok], color="#999933", lw=0.8, ls="--", label="data wait %")
        twin.set_ylabel("data wait %")
        twin.set_ylim(0, 100)

    ax = axes[1, 1]
    ok = np.isfinite(grad)
    ax.plot(step[ok], grad[ok], color="#444444", lw=0.8)
    ax.set_title("gradient norm", fontsize=10)
    ax.set_xlabel("step")
    if ok.any() and np.nanmin(grad[ok]) > 0:
        ax.set_yscale("log")
        from matplotlib.ticker import LogFormatter

        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # "2", "0.5", not "2×10⁰"
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    fig.tight_layout()
    return fig
