"""Compare two cache outputs chunk by chunk: same rows (ids, buckets, captions) and how far the latents differ.

Bitwise-different chunks after a kill + resume on a GPU may come from kernel choice (cuDNN autotuning picks
per process), not from lost or duplicated rows: this tells the two apart.
Usage: python bench/compare_chunks.py REF_OUTPUT NEW_OUTPUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def main(ref: Path, new: Path) -> int:
    worst = 0.0
    bad = 0
    for a in sorted(ref.glob("chunks/**/*.parquet")):
        b = new / a.relative_to(ref)
        ta, tb = pq.read_table(a), pq.read_table(b)
        other = [c for c in ta.column_names if c not in ("latent_mean", "latent_std")]
        same_rows = ta.select(other).equals(tb.select(other))
        diffs = []
        for col in ("latent_mean", "latent_std"):
            if col in ta.column_names:
                xa = np.frombuffer(b"".join(v.as_py() for v in ta[col]), np.float16).astype(np.float32)
                xb = np.frombuffer(b"".join(v.as_py() for v in tb[col]), np.float16).astype(np.float32)
                diffs.append(float(np.abs(xa - xb).max()) if xa.size == xb.size else float("inf"))
                if col == "latent_mean":
                    rel = float(np.abs(xa - xb).mean() / (np.abs(xa).mean() + 1e-12))
        worst = max([worst, *diffs])
        bad += not same_rows
        print(f"{a.relative_to(ref)}: rows {ta.num_rows} {'same' if same_rows else 'DIFFERENT'}; "
              f"max |Δ| mean/std {diffs}, mean |Δ|/mean |x| {rel:.2e}")
    print(f"chunks with different rows: {bad}; worst latent difference {worst}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
