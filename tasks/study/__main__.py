"""The study without Prefect, for a bare GPU box (the stages run in this process through run_stage; outputs and
fingerprints are the same as the flow's, so either can go on where the other stopped):

    python -m tasks.study -c ab-study [-o key=value ...] [--write-doc | --placeholder]
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from data_contracts.errors import BooruflowError
from data_contracts.store import ArtifactStore
from pipeline_config.load import load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "flow_vs_ddpm.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.study", description="the flow-vs-ε study without Prefect")
    p.add_argument("-c", "--config", default="ab-study")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--write-doc", action="store_true", help=f"also write the report to {DOC}")
    p.add_argument("--placeholder", action="store_true", help=f"only write {DOC} as it reads before a recorded run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        from tasks.common.stage import run_stage
        from tasks.study.runner import REPORT_NAME, run_study, write_placeholder

        cfg = load_config(args.config, args.override)
        if args.placeholder:
            print(write_placeholder(cfg, DOC))
            return 0
        store = ArtifactStore.for_config(cfg)

        def run(stage: str, stage_cfg):
            return run_stage(importlib.import_module(f"tasks.{stage}.stage").SPEC, stage_cfg, store)

        result = run_study(cfg, store, run, doc=DOC if args.write_doc else None)
        print(f"study: {result.folder / REPORT_NAME} ({'reused' if result.cached else 'written'})")
        if result.doc:
            print(f"doc:   {result.doc}")
        return 0
    except BooruflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
