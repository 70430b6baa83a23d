"""Train pictures: loss, learning-rate and throughput curves from the history table.

Input: history.parquet (data_contracts/train.py HISTORY_SCHEMA; one row per logged step, validation
rows merged in). The sample grids are written by training itself (TrainManifest.samples).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.common.visuals import new_figure, save_figure, smooth


def _col(history: pa.Table, name: str) -> np.ndarray:
    return history.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN


def make_train_curves(history: pa.Table, out_dir: Path, *, smooth_window: int = 0) -> dict[str, str]:
    """One 1000 x 620 px figure: loss (raw, moving average, held-out val_loss), learning rate,
    samples/s (with the data-wait fraction), gradient norm. {} when the history has no rows.

    smooth_window: moving-average length in logged steps (0: about 1/20 of the run, at least 1)."""
    if history.num_rows == 0:
        return {}
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
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    ok = np.isfinite(lr)
    ax.plot(step[ok], lr[ok], color="#117733")
    ax.set_title("learning rate", fontsize=10)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

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
    fig.tight_layout()
    return {"training curves": save_figure(fig, out_dir, "train-curves")}
