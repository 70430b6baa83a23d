"""Publish a stage outcome to Prefect as artifacts with stable keys (`fm-<stage>-...`)."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from data_contracts.manifest import MANIFEST_NAME
from pipeline_config.secrets import redact
from tasks.common.stage import StageOutcome

MAX_TABLE_ROWS = 500


def reserved_keys(stage: str) -> set[str]:
    """The artifact keys every stage publishes itself; report tables must not take them."""
    return {artifact_key("fm", stage, kind) for kind in ("summary", "manifest", "progress", "images")}


def artifact_key(*parts: str) -> str:
    """Prefect keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def file_link(outcome: StageOutcome, rel: str, files: tuple[str, str] | None) -> str:
    """An HTTP URL through the data-root file server when it serves this output, else a file:// URL."""
    path = f"{outcome.output_path}/{rel}"
    if "://" in path:
        return path
    local = Path(path).resolve()
    if files:
        base_url, served_root = files
        root = Path(served_root).resolve()
        if local.is_relative_to(root):
            return f"{base_url.rstrip('/')}/{quote(local.relative_to(root).as_posix())}"
    return local.as_uri()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = str(value)
        return text if len(text) < 120 else text[:117] + "..."
    return str(value)


def summary_markdown(outcome: StageOutcome) -> str:
    m = outcome.manifest
    lines = [
        f"# {m.stage} — {'cached' if outcome.cached else 'built'} `{m.fingerprint}`",
        "",
        f"- contract version: {m.contract_version}, code version: {m.code_version}",
        f"- upstream: {', '.join(f'{k} `{v}`' for k, v in m.upstream.items()) or 'none'}",
        f"- output: `{outcome.output_path}`",
        f"- files: {len(m.files)} ({sum(f.size for f in m.files) / 1e6:.1f} MB)",
        f"- built in: {outcome.seconds:.1f} s" if not outcome.cached else "- reused a complete output",
        "",
        "| rows | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in m.row_counts.items()],
        "",
    ]
    scalars = {k: v for k, v in m.stats.items() if not isinstance(v, (dict, list))}
    if scalars:
        lines += ["| stat | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in scalars.items()], ""]
    if outcome.report.summary_md:
        lines += [outcome.report.summary_md]
    return redact("\n".join(lines))


def publish_outcome(outcome: StageOutcome, files: tuple[str, str] | None = None) -> dict[str, str]:
    """files: (base URL, served root folder) of the data-root file server, when one runs."""
    stage = outcome.manifest.stage
    made: dict[str, str] = {}
    key = artifact_key("fm", stage, "summary")
    create_markdown_artifact(summary_markdown(outcome), key=key, description=f"{stage} summary")
    made[key] = "markdown"
    for name, rows in outcome.report.tables.items():
        if not rows:
            continue
        key = artifact_key("fm", stage, name)
        if key in reserved_keys(stage) or key in made:  # never shadow the summary/manifest/progress artifacts
            key = artifact_key("fm", stage, "table", name)
        create_table_artifact(rows[:MAX_TABLE_ROWS], key=key, description=f"{stage}: {name}")
        made[key] = "table"
    key = artifact_key("fm", stage, "manifest")
    create_link_artifact(
        file_link(outcome, MANIFEST_NAME, files),
        link_text=f"{stage} manifest {outcome.manifest.fingerprint}",
        key=key,
    )
    made[key] = "link"
    images = outcome.report.images
    for caption, rel in images.items():
        url = file_link(outcome, rel, files)
        key = artifact_key("fm", stage, "img", caption)
        if files and url.startswith("http"):
            create_image_artifact(url, key=key, description=caption)
            made[key] = "image"
    if images and not any(v == "image" for v in made.values()):
        # Image artifacts need a URL the browser can fetch; without the file server link the paths.
        body = "\n".join(f"- {caption}: [{rel}]({file_link(outcome, rel, None)})" for caption, rel in images.items())
        key = artifact_key("fm", stage, "images")
        create_markdown_artifact(f"# {stage} images\n\n{body}", key=key, description=f"{stage} images")
        made[key] = "markdown"
    return made


class ProgressReporter:
    """A progress artifact per stage run (updated at most every `interval` s), plus a rich progress bar
    on the terminal when `fm run` runs the flow in-process (BOORUFLOW_CLI_PROGRESS=1)."""

    def __init__(self, stage: str, interval: float = 2.0) -> None:
        self.stage = stage
        self.interval = interval
        self._last = 0.0
        self._id = create_progress_artifact(0.0, key=artifact_key("fm", stage, "progress"), description=f"{stage}: starting")
        self._bar = None
        if os.environ.get("BOORUFLOW_CLI_PROGRESS") == "1" and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(f"[bold]{stage}[/bold]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TimeElapsedColumn(), TextColumn("{task.description}"), transient=True)
            self._task = self._bar.add_task("", total=100.0)
            self._bar.start()

    def __call__(self, fraction: float, message: str) -> None:
        pct = max(0.0, min(100.0, fraction * 100.0))
        if self._bar is not None:
            self._bar.update(self._task, completed=pct, description=redact(message)[:60])
        now = time.monotonic()
        if now - self._last < self.interval and fraction < 1.0:
            return
        self._last = now
        update_progress_artifact(self._id, pct, description=redact(f"{self.stage}: {message}"))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def done(self) -> None:
        self.close()
        update_progress_artifact(self._id, 100.0, description=f"{self.stage}: done")
