"""The eval grid of one checkpoint: a row per concept, a column per seed, tiles big enough to read."""
import numpy as np
from PIL import Image

from data_contracts.eval import EvalCheckpoint
from tasks.eval.concepts import Concept
from tasks.eval.stage import _grid
from tasks.sample.grid import MIN_CELL


def test_grid_has_a_row_per_concept_and_a_column_per_seed(tmp_path):
    concepts = [Concept("character", "kurosaki_ren_(starlit_stage)", "1girl, kurosaki_ren_(starlit_stage)",
                        train_ids=list(range(12))),
                Concept("control", "control-0", "1girl, solo, looking at viewer")]
    rng = np.random.default_rng(0)
    units = {}
    for c in concepts:
        paths = []
        for i in range(4):
            rel = f"images/ck/{c.slug}/{i:05d}-{100 + i}.png"
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / rel)
            paths.append(rel)
        units[c.slug] = {"images": paths}
    ck = EvalCheckpoint(id="flow-abc", label="flow abc", spec="x", run="r", objective="flow", step=120)
    _grid(tmp_path, ck, concepts, units)
    grid = np.asarray(Image.open(tmp_path / "grids" / "flow-abc.png").convert("RGB")).astype(int)
    # 64 px samples are shown at 128 px: label column + 4 seed columns, title + seed header + 2 concept rows
    assert grid.shape[1] == 4 + MIN_CELL + 4 + 4 * (MIN_CELL + 4)
    assert grid.shape[0] > 2 * (MIN_CELL + 4)
    first = np.asarray(Image.open(tmp_path / units[concepts[1].slug]["images"][3])).repeat(2, 0).repeat(2, 1)
    x = 4 + MIN_CELL + 4 + 3 * (MIN_CELL + 4)  # the control row's last seed
    y = grid.shape[0] - (MIN_CELL + 4)
    np.testing.assert_array_equal(grid[y:y + MIN_CELL, x:x + MIN_CELL], first)
