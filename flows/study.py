"""The flow-vs-ε study as a Prefect flow (deployment `fm/ab-study`) and as a command (`fm study`).

tasks/study/ runs the study through a caller-supplied `run(stage, cfg)`; here each stage run is the flow `fm`'s own
(flows/fm.py `_run_one`: a task per stage, the stage lock, the GPU slot, progress and the stage's artifacts), so the
study's stages look in the UI like any run's. The report is published as `fm-ab-study-report` (markdown, pictures
inline), `fm-ab-study-concepts` (the per-concept table) and `fm-ab-study-folder` (a link to report.md).

    python -m flows.study -c ab-study [-o key=value ...] [--write-doc]     # what `fm study` calls
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from prefect import flow, get_run_logger

from data_contracts.errors import BooruflowError
from pipeline_config.load import load_config
from pipeline_config.schema import PipelineConfig
from tasks.study.runner import REPORT_NAME, StudyResult, run_study

DOC = Path(__file__).resolve().parents[1] / "docs" / "flow_vs_ddpm.md"
STUDY_STAGES = ["ingest", "dedup", "tag", "quality", "bucket", "cache", "train", "eval"]
REPORT_MAX_BYTES = 1_500_000  # as the stages' reports (flows/publish.py)
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def stage_runner(cfg: PipelineConfig):
    """run(stage, cfg) -> an outcome with .manifest and .cached, each stage run as the flow `fm` runs it."""
    from data_contracts.registry import manifest_class
    from flows.fm import _run_one, _store

    store = _store(cfg)

    def run(stage: str, stage_cfg: PipelineConfig) -> SimpleNamespace:
        info = _run_one(stage, stage_cfg, False)
        return SimpleNamespace(manifest=store.read_manifest(manifest_class(stage), info["fingerprint"]),
                               cached=bool(info["cached"]))

    return store, run


def inline_pictures(markdown: str, folder: Path, max_bytes: int = REPORT_MAX_BYTES) -> str:
    """The report with its pictures as data: URIs (thumbnails within the page budget), as the stages' reports."""
    from flows.publish import thumbnail_uri

    found = _IMAGE.findall(markdown)
    budget = max_bytes - len(markdown.encode())
    for i, (caption, rel) in enumerate(found):
        try:
            uri = thumbnail_uri(folder / rel, max(0, budget // (len(found) - i)), width=900)
        except Exception:  # a missing picture is a note on the page, never a failed flow
            uri = None
        if uri is None:
            markdown = markdown.replace(f"]({rel})", f"]() (not inlined: `{folder / rel}`)")
            continue
        budget -= len(uri)
        markdown = markdown.replace(f"![{caption}]({rel})", f"![{caption}]({uri})")
    return markdown


def publish_study(result: StudyResult, cfg: PipelineConfig) -> None:
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    from flows.fm import file_server
    from flows.publish import MAX_TABLE_ROWS

    head = (f"- study output: `{result.folder}` ({'reused' if result.cached else 'written'}); stage runs: "
            f"{sum(r['cached'] for r in result.runs)} of {len(result.runs)} reused\n\n")
    create_markdown_artifact(inline_pictures(head + result.markdown, result.folder), key="fm-ab-study-report",
                             description="flow vs ε study: report")
    if result.tables.get("concepts"):
        create_table_artifact(result.tables["concepts"][:MAX_TABLE_ROWS], key="fm-ab-study-concepts",
                              description="flow vs ε study: per concept (last step)")
    report = (result.folder / REPORT_NAME).resolve()
    link = report.as_uri()
    served = file_server(cfg)
    if served and report.is_relative_to(Path(served[1]).resolve()):
        link = f"{served[0].rstrip('/')}/{report.relative_to(Path(served[1]).resolve()).as_posix()}"
    create_link_artifact(link, link_text=f"study {result.fingerprint}: report.md", key="fm-ab-study-folder")


def summary(result: StudyResult) -> dict[str, Any]:
    return {"folder": str(result.folder), "fingerprint": result.fingerprint, "cached": result.cached,
            "doc": str(result.doc) if result.doc else None, "runs": result.runs}


@flow(name="fm", log_prints=True)
def ab_study(config: str = "ab-study", overrides: list[str] | None = None, write_doc: bool = False
             ) -> dict[str, Any]:
    """The flow-vs-ε study of `config` (issue 19): the ε base on the old concepts, a flow and an ε arm per
    `study.seeds` on the new ones from the base's export, eval of every checkpoint, the report (written to
    docs/flow_vs_ddpm.md with write_doc). Every stage output is cached: a rerun goes on where the last stopped."""
    from flows.fm import load_prefect_secrets

    log = get_run_logger()
    try:
        cfg = load_config(config, overrides)
        load_prefect_secrets(cfg)
        store, run = stage_runner(cfg)
        result = run_study(cfg, store, run, doc=DOC if write_doc else None, log=log)  # type: ignore[arg-type]
        publish_study(result, cfg)
        log.info("study: %s (%s)", result.folder / REPORT_NAME, "reused" if result.cached else "written")
        return summary(result)
    except BooruflowError as exc:
        log.error("study failed: %s", exc)
        raise


def study_main(config: str, overrides: Sequence[str], write_doc: bool = False, preflight: bool = True) -> int:
    """What `fm study` does: build the random model the config asks for, preflight, run the flow in-process."""
    from flows.cli import quiet_third_party_output, run_preflight
    from tasks.study.models import ensure_random_model
    from tasks.study.plan import check_study

    cfg = load_config(config, list(overrides))
    check_study(cfg)
    ensure_random_model(cfg, lambda line: print(line, file=sys.stderr))  # before the preflight looks for it
    if preflight and not run_preflight(cfg, STUDY_STAGES):
        return 2
    quiet_third_party_output()  # `fm study` set Prefect's defaults before Prefect was imported (flows/cli.py)
    out = ab_study(config=config, overrides=list(overrides), write_doc=write_doc)
    print(f"study: {out['folder']}/{REPORT_NAME} ({'reused' if out['cached'] else 'written'}; "
          f"{sum(r['cached'] for r in out['runs'])} of {len(out['runs'])} stage runs reused)")
    if out["doc"]:
        print(f"doc:   {out['doc']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fm study", description="the flow-vs-ε study (issue 19): base, arms, eval, report")
    p.add_argument("-c", "--config", default="ab-study", help="preset name or YAML path (default: ab-study)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. -o train.model=/models/nai-v2.safetensors (repeatable)")
    p.add_argument("--write-doc", action="store_true", help=f"also write the report to {DOC.relative_to(DOC.parents[1])}")
    p.add_argument("--no-preflight", action="store_true", help="skip the preflight checks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return study_main(args.config, args.override, args.write_doc, preflight=not args.no_preflight)
    except BooruflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
