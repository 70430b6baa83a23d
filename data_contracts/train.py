"""Contract of the train stage: the exported checkpoint, samples and training record."""
from __future__ import annotations

import pyarrow as pa

from data_contracts.manifest import StageManifest

CONTRACT_VERSION = 2  # 2: history gains gpu_mem_gib, skipped_steps, val_loss
STAGE = "train"

# One row per logged optimiser step (also in TensorBoard); the flow plots it.
HISTORY_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32()),
        pa.field("loss", pa.float32()),
        pa.field("lr", pa.float32()),
        pa.field("grad_norm", pa.float32()),
        pa.field("samples_per_s", pa.float32()),
        pa.field("data_wait_frac", pa.float32()),
        pa.field("gpu_mem_gib", pa.float32()),  # peak allocated so far (null on CPU)
        pa.field("skipped_steps", pa.int64()),  # non-finite steps skipped so far
        pa.field("val_loss", pa.float32()),  # held-out loss over the fixed σ grid (rows where it ran)
    ]
)
SCHEMAS = {"history": HISTORY_SCHEMA}


class TrainManifest(StageManifest):
    STAGE = STAGE
    CONTRACT_VERSION = CONTRACT_VERSION
    CONTENT = ("*.safetensors", "diffusers/*")  # the weights (history.parquet holds wall-clock rates)
    objective: str  # flow | ddpm
    base_model_identity: str
    steps: int
    epochs: int
    checkpoint: str  # relative path of the single-file safetensors
    diffusers_dir: str | None = None
    recommended_shift: float | None = None
    samples: list[str] = []
    phase: str = ""  # the phase of a run in phases (train.phases) this output is; "" for a one-phase run
