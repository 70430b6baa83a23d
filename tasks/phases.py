"""Training in phases (`train.phases`): each phase is a bucket, cache and train output of its own, in order,
each phase after the first starting from the previous phase's exported weights.

A phase's config is the run's config with the phase's overrides applied (`phase_config`): its own data
selection and bucket resolution make its own bucket and cache fingerprints (a cache per resolution, reused
across runs), its own train settings and starting weights make its own train fingerprint. `train.phases`
itself is in no fingerprint, so adding a third phase leaves the first two cached.

`run_phases` walks the phases with a caller-supplied `run(stage, cfg, force) -> info` (flows/fm.py runs
each stage through Prefect; tests pass tasks.common.stage.run_stage bound to a store). Stage selection:
a selected stage of a selected phase runs (forced with `force`); a train that runs first has its phase's
bucket and cache run (cached when built) and every earlier phase's train (the weights it starts from);
eval runs once, on the last phase, comparing every phase's train output.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from data_contracts.errors import ConfigError
from pipeline_config.load import set_dotted, validate_config
from pipeline_config.schema import PipelineConfig
from pipeline_config.train import PhaseConfig

PHASE_STAGES = ("bucket", "cache", "train")
RunFn = Callable[[str, PipelineConfig, bool], dict[str, Any]]  # (stage, config, force) -> info with "fingerprint"
InitFn = Callable[[dict[str, Any]], str]  # a train run's info -> the path of its exported single file


def has_phases(cfg: PipelineConfig) -> bool:
    return bool(cfg.train.phases)


def phase_names(cfg: PipelineConfig) -> list[str]:
    return [p.name for p in cfg.train.phases]


def check_phase(cfg: PipelineConfig, name: str | None) -> None:
    if name is None:
        return
    if not has_phases(cfg):
        raise ConfigError(f"--phase {name!r}: this config has no train.phases (it trains in one phase)")
    if name not in phase_names(cfg):
        raise ConfigError(f"--phase {name!r}: the phases are {', '.join(phase_names(cfg))}")


def phase_config(cfg: PipelineConfig, phase: PhaseConfig, init_model: str | None = None) -> PipelineConfig:
    """The config a phase runs with: its overrides applied, `train.phases` emptied, `train.phase` set, the
    run name suffixed with the phase (its exports are told apart), and `train.model` the previous phase's
    export when `init_model` is given."""
    from tasks.train.export import resolve_run_name

    tree = cfg.model_dump(mode="json")
    tree["train"]["phases"] = []
    tree["train"]["phase"] = phase.name
    tree["train"]["run_name"] = f"{resolve_run_name(cfg.train, cfg.name)}-{phase.name}"
    for key, value in phase.overrides.items():
        set_dotted(tree, key, value)
    if init_model is not None:
        tree["train"]["model"] = init_model
    return validate_config(tree, f"train.phases[{phase.name}]")


def check_phases(cfg: PipelineConfig) -> None:
    """Every phase's overrides make a valid config (a typo fails before anything runs)."""
    for phase in cfg.train.phases:
        phase_config(cfg, phase, init_model=None)


@dataclass
class PhaseRun:
    results: list[dict[str, Any]] = field(default_factory=list)  # every stage run's info, in order
    trains: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase name -> its train run's info
    last_config: PipelineConfig | None = None


def plan(cfg: PipelineConfig, todo: list[str], only: str | None) -> list[dict[str, bool | None]]:
    """Per phase: stage -> None (not run), False (run, cached when built) or True (run as selected: forced
    with --force). A phase's cache reads its bucket and its train both, so they run first; a train starts
    from every earlier phase's train; eval (all phases) needs every train."""
    phases = phase_names(cfg)
    last = phases.index(only) if only is not None else len(phases) - 1
    steps: list[dict[str, bool | None]] = [dict.fromkeys(PHASE_STAGES) for _ in phases]
    for k, name in enumerate(phases[: last + 1]):
        for stage in PHASE_STAGES:
            if stage in todo and (only is None or name == only):
                steps[k][stage] = True
    if "eval" in todo and only is None:
        steps[last]["train"] = steps[last]["train"] or False
    for k in range(last, -1, -1):
        if k < last and steps[k + 1]["train"] is not None and steps[k]["train"] is None:
            steps[k]["train"] = False  # the weights phase k+1 starts from
        needs = PHASE_STAGES[: PHASE_STAGES.index(_latest(steps[k]))] if _latest(steps[k]) else ()
        for stage in needs:
            if steps[k][stage] is None:
                steps[k][stage] = False
    return steps


def _latest(steps: dict[str, bool | None]) -> str | None:
    run = [s for s in PHASE_STAGES if steps[s] is not None]
    return run[-1] if run else None


def run_phases(cfg: PipelineConfig, todo: list[str], run: RunFn, init_path: InitFn, *, force: bool = False,
               only: str | None = None) -> PhaseRun:
    """Run the phase stages (bucket, cache, train) of every phase as `plan` says, chaining the weights."""
    check_phase(cfg, only)
    out = PhaseRun()
    init: str | None = None
    for phase, steps in zip(cfg.train.phases, plan(cfg, todo, only)):
        pcfg = phase_config(cfg, phase, init)
        for stage in PHASE_STAGES:
            if steps[stage] is None:
                continue
            info = run(stage, pcfg, bool(steps[stage]) and force)
            out.results.append({**info, "phase": phase.name})
            if stage == "train":
                out.trains[phase.name] = info
                init = init_path(info)
        out.last_config = pcfg  # a phase whose train does not run hands no weights on: no later train runs
    return out


def eval_config(cfg: PipelineConfig, trains: dict[str, dict[str, Any]]) -> PipelineConfig:
    """The last phase's config with every earlier phase's train output in `eval.compare`."""
    fps = [info["fingerprint"] for info in trains.values()]
    compare = list(dict.fromkeys([*cfg.eval.compare, *fps[:-1]]))
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"compare": compare})}, deep=True)
