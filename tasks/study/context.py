"""What the study's report says about how the numbers were made: data, model, training, eval, samplers, cost.

Filled by the runner from the configs and manifests of the stage outputs it used; plain data (JSON-able), so the
report can be written again from `study.json` alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# One H100, SD1.5 UNet at 512², the default regional compile on the 17-bucket stream (BENCHMARKS.md, README
# "Scale"): what the seed-scale projection divides by. Not measured by the study itself.
SD15_512_SAMPLES_PER_S = 96.8
SD15_512_SOURCE = "BENCHMARKS.md: SD1.5 UNet, 512² 17-bucket stream, regional compile, one H100"


@dataclass
class RunFacts:
    """One train output: what it trained and how fast."""

    label: str  # base | flow-s0 | ddpm-s0 ...
    fingerprint: str
    objective: str
    steps: int
    samples_seen: int | None = None
    wall_s: float | None = None
    samples_per_s: float | None = None


@dataclass
class ReportContext:
    config_name: str
    fingerprint: str = ""  # the study output's
    model: str = ""  # train.model as given
    unet_params: float | None = None  # millions
    text_params: float | None = None
    resolution: int = 0  # bucket resolution of the arms (px, square area)
    posts: dict[str, int] = field(default_factory=dict)  # "base" / "new" -> posts selected
    concept_posts: dict[str, dict[str, int]] = field(default_factory=dict)  # concept -> {"base": n, "new": n}
    new_characters: list[str] = field(default_factory=list)
    new_artists: list[str] = field(default_factory=list)
    base_train: dict[str, Any] = field(default_factory=dict)  # steps, batch, lr, optimizer, objective
    arm_train: dict[str, Any] = field(default_factory=dict)  # epochs, steps, batch, grad_accum, lr, optimizer, shift
    seeds: list[int] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)  # images per concept, steps, cfg, size, probe space, controls
    samplers: dict[str, str] = field(default_factory=dict)  # arm -> what sampled it (from the PNG parameters)
    runs: list[RunFacts] = field(default_factory=list)
    evals: dict[str, str] = field(default_factory=dict)  # seed -> eval fingerprint
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReportContext":
        runs = [RunFacts(**r) for r in data.get("runs", [])]
        return cls(**{**data, "runs": runs})

    def arm_cost(self) -> dict[str, float] | None:
        """Mean wall seconds and samples of one arm run (None before any arm ran with timings)."""
        arms = [r for r in self.runs if r.label != "base" and r.wall_s]
        if not arms:
            return None
        return {"wall_s": sum(r.wall_s or 0 for r in arms) / len(arms),
                "samples": sum(r.samples_seen or 0 for r in arms) / len(arms),
                "samples_per_s": sum(r.samples_per_s or 0 for r in arms) / len(arms)}
