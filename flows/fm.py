"""The Prefect flow `fm`: runs the requested stages in DAG order, each as a task with its own state."""
from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_contracts.errors import ConfigError
from data_contracts.store import ArtifactStore
from flows.publish import ProgressReporter, publish_outcome
from pipeline_config.load import load_config
from pipeline_config.schema import PipelineConfig
from pipeline_config.secrets import install_redaction, register_secret
from tasks.common.stage import run_stage
from tasks.registry import DAG_ORDER, implemented_stages, stage_spec


def select_stages(stages: list[str] | None) -> list[str]:
    """Requested stages in DAG order; unknown or not-yet-implemented names are config errors."""
    available = implemented_stages()
    if not stages or stages == ["all"] or stages == "all":
        return available
    unknown = [s for s in stages if s not in available]
    if unknown:
        planned = [s for s in unknown if s in DAG_ORDER]
        extra = f" ({', '.join(planned)} not implemented yet)" if planned else ""
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}{extra}; available: {', '.join(available)}")
    return [s for s in available if s in stages]


def secret_env_names(cfg: PipelineConfig) -> list[str]:
    """Every `*_env` field in the config names an environment variable holding a secret."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str) and value:
                    names.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(cfg.model_dump(mode="json"))
    return names


def load_prefect_secrets(cfg: PipelineConfig) -> None:
    """Fill secret env vars that are unset from Prefect Secret blocks of the same name (lowercase, dashes)."""
    for env_name in secret_env_names(cfg):
        if os.environ.get(env_name):
            register_secret(os.environ[env_name])
            continue
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(env_name.lower().replace("_", "-")).get()
        except Exception:  # no such block (or no server): the stage reports the missing credential
            continue
        os.environ[env_name] = value
        register_secret(value)


def file_server(cfg: PipelineConfig) -> tuple[str, str] | None:
    """(base URL, served root) of the data-root file server: set by `fm up`/`fm serve --files`."""
    url, root = os.environ.get("BOORUFLOW_FILES_URL"), os.environ.get("BOORUFLOW_FILES_ROOT")
    if url and root:
        return url, root
    fs = cfg.runtime.file_server
    return (f"http://{fs.host}:{fs.port}", cfg.data_root) if fs.enabled else None


@task(name="stage", retries=0, cache_policy=NO_CACHE)
def stage_task(stage: str, cfg: PipelineConfig, force: bool) -> dict[str, Any]:
    log = get_run_logger()
    install_redaction()
    store = ArtifactStore(cfg.data_root, cfg.runtime.cache_dir)
    progress = ProgressReporter(stage)
    outcome = run_stage(stage_spec(stage), cfg, store, force=force, progress=progress, log=log)  # type: ignore[arg-type]
    progress.done()
    publish_outcome(outcome, file_server(cfg))
    log.info("%s %s: %s", stage, "cached" if outcome.cached else "built", outcome.output_path)
    return {
        "stage": stage,
        "fingerprint": outcome.manifest.fingerprint,
        "cached": outcome.cached,
        "output": outcome.output_path,
        "row_counts": outcome.manifest.row_counts,
    }


@flow(name="fm", log_prints=True)
def fm(
    config: str = "demo",
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run `stages` (default: all implemented, in DAG order) of the pipeline described by `config`.

    config: a preset name (demo, nai-v2-fm) or a YAML path; overrides: ["train.lr=1e-5", ...];
    force: rebuild the selected stages even when a complete output with their fingerprint exists.
    """
    cfg = load_config(config, overrides)
    todo = select_stages(stages)
    load_prefect_secrets(cfg)
    results = []
    for stage in todo:
        results.append(stage_task.with_options(name=stage, task_run_name=stage)(stage, cfg, force))
    return results
