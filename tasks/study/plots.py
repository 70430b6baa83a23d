"""The study's pictures: learning curves with bands, the arm differences, samples side by side at matched steps.

Matplotlib's object API on the Agg canvas (tasks/common/visuals.py): no pyplot state, safe in worker threads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from tasks.common.visuals import new_figure, save_figure
from tasks.study.analysis import Analysis

ARM_STYLE = {"flow": {"color": "tab:blue", "label": "flow"}, "ddpm": {"color": "tab:orange", "label": "ε (ddpm)"}}
SHEET_LABEL = {"flow": "flow", "ddpm": "eps (ddpm)"}  # the sheets' bundled font has no Greek letters
CURVES = "learning_curves"
DIFFERENCES = "differences"
SAMPLES = "samples"


def _rows(rows: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return sorted((r for r in rows if all(r.get(k) == v for k, v in match.items())), key=lambda r: r["step"])


def _band(ax, rows: list[dict[str, Any]], arm: str, label: str | None = None, linestyle: str = "-") -> None:
    if not rows:
        return
    style = ARM_STYLE.get(arm, {"color": "grey", "label": arm})
    x = [r["step"] for r in rows]
    ax.plot(x, [r["value"] for r in rows], marker="o", markersize=3, color=style["color"], linestyle=linestyle,
            label=label or style["label"])
    ax.fill_between(x, [r["lo"] for r in rows], [r["hi"] for r in rows], color=style["color"], alpha=0.2, linewidth=0)


def learning_curves(a: Analysis, out_dir: Path) -> str:
    """Mean probe hit rate of each group (new, old) and kind, per arm, with the bootstrap band; chance dashed,
    the base's own level (ε sampling, step 0) dotted on the old concepts."""
    panels = list(dict.fromkeys((r["group"], r["kind"]) for r in a.curves))
    cols = max(1, len({k for _, k in panels}))
    kinds = list(dict.fromkeys(k for _, k in panels))
    groups = [g for g in ("new", "old") if any(p[0] == g for p in panels)]
    fig = new_figure(5.0 * cols, 3.4 * max(1, len(groups)), dpi=110)
    axes = fig.subplots(max(1, len(groups)), cols, squeeze=False)
    for gi, group in enumerate(groups):
        for ki, kind in enumerate(kinds):
            ax = axes[gi][ki]
            rows = _rows(a.curves, group=group, kind=kind)
            if not rows:
                ax.set_visible(False)
                continue
            for arm in a.arms:
                _band(ax, _rows(a.curves, group=group, kind=kind, arm=arm), arm)
            ax.axhline(rows[0]["chance"], color="grey", linestyle="--", linewidth=0.8, label="chance")
            if group == "old":
                base = next((r for r in _rows(a.curves, group=group, kind=kind, arm="ddpm") if r["step"] == 0), None)
                if base is not None:
                    ax.axhline(base["value"], color="black", linestyle=":", linewidth=0.8, label="base (ε sampling)")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{group} {kind}s ({rows[0]['concepts']}): probe hit rate", fontsize=10)
            ax.set_xlabel("training step")
            ax.set_ylabel("share of images")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    return save_figure(fig, out_dir, CURVES)


def differences(a: Analysis, out_dir: Path) -> str:
    """flow − ε on the new concepts per step; forgetting of the old ones per arm; control images on new concepts."""
    fig = new_figure(15.0, 3.6, dpi=110)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    rows = sorted(a.difference, key=lambda r: r["step"])
    x = [r["step"] for r in rows]
    ax1.plot(x, [r["value"] for r in rows], marker="o", markersize=3, color="tab:purple", label="flow − ε")
    ax1.fill_between(x, [r["lo"] for r in rows], [r["hi"] for r in rows], color="tab:purple", alpha=0.2, linewidth=0)
    ax1.axhline(0.0, color="black", linewidth=0.8)
    ax1.set_title("new concepts: flow − ε (chance-corrected hit rate)", fontsize=10)
    for arm in a.arms:
        _band(ax2, _rows(a.forgetting, arm=arm), arm)
    ax2.axhline(0.0, color="black", linewidth=0.8)
    ax2.set_title("old concepts: change vs the base (corrected)", fontsize=10)
    for kind, dash in zip(dict.fromkeys(r["kind"] for r in a.control), ("-", "--", ":")):
        for arm in a.arms:
            _band(ax3, _rows(a.control, kind=kind, arm=arm), arm,
                  f"{ARM_STYLE.get(arm, {}).get('label', arm)}: {kind}s", linestyle=dash)
        share = next(r["chance_share"] for r in a.control if r["kind"] == kind)
        ax3.axhline(share, color="grey", linestyle=dash, linewidth=0.8, label=f"chance share ({kind}s)")
    ax3.set_ylim(-0.02, 1.02)
    ax3.set_title("control images on a new concept", fontsize=10)
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    return save_figure(fig, out_dir, DIFFERENCES)


def matched_steps(steps: Sequence[int], rows: int) -> list[int]:
    """At most `rows` steps, evenly spread, first and last included."""
    steps = list(steps)
    if len(steps) <= rows:
        return steps
    return [steps[round(i * (len(steps) - 1) / (rows - 1))] for i in range(rows)] if rows > 1 else steps[-1:]


def samples_sheet(samples: dict[tuple[str, int, int, str], Path], arms: Sequence[str], seed: int,
                  steps: Sequence[int], concepts: Sequence[str], out_dir: Path, max_rows: int = 6) -> str | None:
    """Rows = matched steps, columns = each arm's first image of each concept (the same image seed in both arms),
    from one training seed."""
    from tasks.sample.grid import labelled_grid
    from tasks.sample.pngmeta import save_png

    shown = matched_steps(steps, max_rows)
    rows, labels = [], []
    for step in shown:
        row = []
        for arm in arms:
            for concept in concepts:
                path = samples.get((arm, seed, step, concept))
                row.append(Image.open(path).convert("RGB") if path is not None and Path(path).is_file() else None)
        if any(im is not None for im in row):
            rows.append(row)
            labels.append(f"step {step}")
    if not rows:
        return None
    cols = [f"{SHEET_LABEL.get(arm, arm)}: {c}" for arm in arms for c in concepts]
    grid = labelled_grid(rows, labels, cols, max_cell=160,
                         title=f"training seed {seed}: each arm's first image of each new concept, same image seed "
                               "across arms and steps")
    rel = f"visuals/{SAMPLES}.png"
    save_png(Path(out_dir) / rel, grid, None)
    return rel
