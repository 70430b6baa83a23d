"""The norm_score histogram: the legend never covers the cut labels."""
import numpy as np
import pyarrow as pa
from PIL import Image

from data_contracts.quality import QUALITY_LABELS
from tasks.quality.visuals import make_norm_histogram, norm_histogram_figure


def _quality(n: int = 240) -> pa.Table:
    """Four labels whose norm_score ranges overlap a little (kmeans-like), the cuts near 0.2, 0.4 and 0.65."""
    rng = np.random.default_rng(0)
    norm = np.sort(rng.uniform(0, 1, n))
    cluster = np.searchsorted([0.22, 0.45, 0.7], norm)
    cluster[np.flatnonzero(cluster == 1)[:3]] = 0  # overlaps: "bad score from …" labels
    return pa.table({"norm_score": norm, "cluster": cluster})


def test_legend_sits_beside_the_plot_and_covers_no_cut_label(tmp_path):
    fig = norm_histogram_figure(_quality())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(QUALITY_LABELS)
    cuts = [t for t in ax.texts if "score" in t.get_text() or "masterpiece" in t.get_text()]
    assert len(cuts) == 3
    for text in cuts:
        box = text.get_window_extent(renderer)
        assert not legend.overlaps(box), text.get_text()
        assert box.x1 <= fig.bbox.x1 and box.y0 >= 0  # inside the picture
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # right of the plot, not over the bars
    assert legend.x1 <= fig.bbox.x1  # and not cut off
    images = make_norm_histogram(_quality(), tmp_path)
    assert Image.open(tmp_path / images["norm_score histogram"]).size == (700, 300)
