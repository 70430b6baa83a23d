"""The end of a run (rank 0): the final export and result.json, the numbers the stage and launcher read."""
from __future__ import annotations

import json
from typing import Any

from data_contracts.store import atomic_write_text
from tasks.train.parts import TrainParts

RESULT_NAME = "result.json"


def finish(p: TrainParts, val: dict[str, float], wall: float) -> dict[str, Any]:
    """Every rank calls it; rank 0 returns the result, the others {}."""
    result: dict[str, Any] = {}
    if p.acc.is_main_process:
        written = p.exporter.final(p.state)
        result = summary(p, val, wall, written)
        atomic_write_text(p.work / RESULT_NAME, json.dumps(result, indent=1))
        p.log.emit({"event": "done", **result})
    p.acc.wait_for_everyone()
    return result


def summary(p: TrainParts, val: dict[str, float], wall: float, written: dict[str, Any]) -> dict[str, Any]:
    cfg, s, history = p.cfg, p.state, p.log.history
    rows = [r for r in history.rows if "loss" in r] if history else []
    if not val and history:  # none from this attempt: the newest the history has
        val = next((r for r in reversed(history.rows) if "val_loss" in r), {})
        val = {k: v for k, v in val.items() if k.startswith("val_")}
    speeds = [r["samples_per_s"] for r in rows if r.get("samples_per_s")]
    waits = [r["data_wait_frac"] for r in rows if r.get("data_wait_frac") is not None]
    return {
        "objective": cfg.objective, "base_model_identity": p.models.source.identity, "steps": s.step,
        "epochs": s.epoch + 1, "samples_seen": s.samples_seen, "skipped_steps": s.skipped_steps,
        "world_size": p.acc.num_processes, "wall_s": wall,
        "mean_samples_per_s": sum(speeds) / len(speeds) if speeds else None,
        "mean_data_wait_frac": sum(waits) / len(waits) if waits else None,
        "final_loss": rows[-1]["loss"] if rows else None, "validation": val,
        # every grid in the folder: a resumed run keeps the grids rendered before the kill
        "samples": sorted(q.relative_to(p.work).as_posix() for q in (p.work / "samples").glob("*.png")),
        "recommended_shift": cfg.recommended_shift if p.objective.prediction == "flow" else None,
        **written,  # run_name, exports, latest, checkpoint (, diffusers_dir)
    }
