"""Compare two train outputs: the exported weights tensor by tensor and the per-step history (loss, grad norm, lr).

After a kill -9 and a resume on a GPU, bitwise-different weights may come from kernel choice (cuDNN autotuning
picks per process; some backward kernels accumulate with atomics), not from a lost or repeated micro-batch:
compare the resumed run with the uninterrupted one AND two uninterrupted runs with each other (the noise floor).
A lost or repeated window shows as a different lr/step sequence or a loss curve that departs at the resume step.
Usage: python bench/compare_train.py REF_OUTPUT NEW_OUTPUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import load_file


def exported(out: Path) -> Path:
    manifest = json.loads((out / "manifest.json").read_text())
    return out / manifest["checkpoint"]


def main(ref: Path, new: Path) -> int:
    a, b = load_file(str(exported(ref))), load_file(str(exported(new)))
    if a.keys() != b.keys():
        print(f"compare_train: different tensor names ({len(a.keys() ^ b.keys())} differ)")
        return 1
    same = 0
    worst, worst_key, rel = 0.0, "", 0.0
    for k in sorted(a):
        x, y = a[k].astype(np.float32), b[k].astype(np.float32)
        if np.array_equal(x, y):
            same += 1
            continue
        d = float(np.abs(x - y).max())
        if d > worst:
            worst, worst_key = d, k
        rel = max(rel, float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)))
    print(f"compare_train: weights: {same} of {len(a)} tensors bit-identical; max |diff| {worst:.3g} ({worst_key or '-'}),"
          f" max relative L2 {rel:.3g}")
    ha, hb = (pq.read_table(o / "history.parquet").to_pandas() for o in (ref, new))
    ha, hb = (h[h["loss"].notna()].set_index("step") for h in (ha, hb))
    steps_same = list(ha.index) == list(hb.index)
    print(f"compare_train: history: steps {'identical' if steps_same else 'DIFFERENT'} ({len(ha)} vs {len(hb)} rows)")
    if steps_same:
        for col in ("lr", "loss", "grad_norm", "val_loss"):
            x, y = ha[col].to_numpy(np.float64), hb[col].to_numpy(np.float64)
            ok = ~(np.isnan(x) | np.isnan(y))
            if not ok.any():
                continue
            d = np.abs(x[ok] - y[ok])
            first = ha.index[ok][d > 0]
            print(f"  {col:9s} max |diff| {d.max():.3g}; first different step: "
                  f"{int(first[0]) if len(first) else 'none'}")
    return 0 if steps_same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
