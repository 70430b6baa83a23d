"""A/B: the same data and step budget trained with the flow objective and with the DDPM ε objective,
then evaluated the same way (the experiment the seed recipe was built to answer).

`ab_configs` makes the two configs (they differ only in `train.objective`, so both train runs read the
same cache output and get their own fingerprints); `run_ab` trains both and runs eval on the flow run
with the DDPM run in `eval.compare`. The caller supplies `run(stage, cfg)` (flows/ runs stages through
Prefect; tests and scripts can pass `tasks.common.stage.run_stage` bound to a store).
"""
from __future__ import annotations

from typing import Any, Callable

from data_contracts.errors import ConfigError

OBJECTIVES = ("flow", "ddpm")
RunFn = Callable[[str, Any], Any]  # (stage name, PipelineConfig) -> StageOutcome


def ab_configs(cfg) -> dict[str, Any]:
    """{"flow": cfg', "ddpm": cfg''}: identical but for train.objective. The step budget must be fixed."""
    if cfg.train.max_steps is None:
        raise ConfigError("A/B needs the same step budget for both objectives: set train.max_steps")
    return {obj: cfg.model_copy(update={"train": cfg.train.model_copy(update={"objective": obj})}, deep=True)
            for obj in OBJECTIVES}


def run_ab(cfg, store, run: RunFn) -> dict[str, Any]:
    """Train flow and ddpm on the same data, then evaluate both; returns {"train": {obj: outcome}, "eval": outcome}."""
    variants = ab_configs(cfg)
    trained = {obj: run("train", c) for obj, c in variants.items()}
    # eval reads the current train output as its upstream: make it the flow run, compare the ddpm one.
    store.set_current("train", trained["flow"].manifest.fingerprint)
    ev = variants["flow"].eval
    compare = list(dict.fromkeys([*ev.compare, trained["ddpm"].manifest.fingerprint]))
    eval_cfg = variants["flow"].model_copy(update={"eval": ev.model_copy(update={"compare": compare})}, deep=True)
    return {"train": trained, "eval": run("eval", eval_cfg)}
