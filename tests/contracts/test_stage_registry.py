"""The stage list is kept once (tasks/registry.py + each stage's SPEC); everything else agrees with it, and a
stage's code does not change without a decision about its code version.

Code versions: tests/contracts/stage_code.json records, per stage, its CODE_VERSION and a digest of its package's
sources (tasks/<stage>/*.py). A change to those sources fails this test until the record is renewed:
bump the stage's code_version when its outputs change (old outputs are then rebuilt), or keep it when they do not
(logging, refactors) — then renew the record:

    .venv/bin/python -m tests.contracts.test_stage_registry --update
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_name("stage_code.json")


def source_digest(stage: str) -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "tasks" / stage).glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def current() -> dict[str, dict[str, str]]:
    from tasks.registry import implemented_stages, stage_spec

    return {s: {"code_version": stage_spec(s).code_version, "sources": source_digest(s)}
            for s in implemented_stages()}


def test_dag_order_follows_upstream_and_every_list_agrees():
    from data_contracts.registry import CONTRACT_MODULES, manifest_class
    from pipeline_config.schema import PipelineConfig
    from tasks.registry import DAG_ORDER, implemented_stages, stage_spec

    stages = implemented_stages()
    assert tuple(stages) == DAG_ORDER
    for i, stage in enumerate(stages):
        spec = stage_spec(stage)
        assert spec.name == stage
        assert all(stages.index(u) < i for u in spec.upstream), f"{stage} runs before one of {spec.upstream}"
        assert manifest_class(stage).STAGE == stage
    assert list(CONTRACT_MODULES) == stages  # data_contracts' list, in DAG order
    assert [s for s in PipelineConfig.model_fields if s in stages] == stages  # one config section per stage


def test_gpu_stages_come_from_the_specs():
    from flows.fm import GPU_STAGES
    from tasks.registry import implemented_stages, stage_spec

    assert GPU_STAGES == frozenset(s for s in implemented_stages() if stage_spec(s).gpu)
    assert {"tag", "cache", "train", "eval"} <= GPU_STAGES and not GPU_STAGES & {"ingest", "quality", "bucket"}


def test_a_changed_stage_has_a_decided_code_version():
    recorded = json.loads(RECORD.read_text())
    now = current()
    problems = []
    for stage, state in now.items():
        old = recorded.get(stage)
        if old == state:
            continue
        if old is None:
            problems.append(f"{stage}: not recorded")
        elif old["sources"] != state["sources"] and old["code_version"] == state["code_version"]:
            problems.append(f"{stage}: tasks/{stage}/ changed but CODE_VERSION is still {state['code_version']!r}: "
                            "bump it if the stage's outputs change, then renew the record")
        else:
            problems.append(f"{stage}: code version {old['code_version']!r} -> {state['code_version']!r}: renew the "
                            "record")
    assert not problems, "\n".join(problems) + "\nrenew: .venv/bin/python -m tests.contracts.test_stage_registry --update"


if __name__ == "__main__":
    if sys.argv[1:] == ["--update"]:
        RECORD.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD}")
    else:
        print(json.dumps(current(), indent=1))
