"""Publish a stage outcome to Prefect as artifacts with stable keys (`fm-<stage>-...`).

Per stage: `fm-<stage>-report` (one markdown page: the summary, the pictures inline as small thumbnails,
the tables, the manifest path), `fm-<stage>-summary` (the summary alone), `fm-<stage>-manifest` (a link)
and the stage's main table (its first one, under `fm-<stage>-<table name>`); plus `fm-<stage>-progress`
while it runs. The thumbnails are data: URIs inside the markdown, so they render from the Prefect server's
own origin: they survive the data file server stopping, a data_root it does not serve and a browser that
reaches only the UI's port.
"""
from __future__ import annotations

import base64
import io
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from data_contracts.manifest import MANIFEST_NAME
from pipeline_config.secrets import redact
from tasks.common.stage import StageOutcome

MAX_TABLE_ROWS = 500  # the keyed main table
REPORT_TABLE_ROWS = 25  # each table inside the report
REPORT_CELL_CHARS = 80
# The Prefect server sets no size limit on artifacts, but every artifact page and run page loads the whole
# markdown into the browser: keep one report near a large web page.
REPORT_MAX_BYTES = 1_500_000
THUMB_WIDTH = 640
THUMB_MAX_HEIGHT = 1600  # a tall contact sheet is scaled down to this

OpenFn = Callable[[str], Path]  # rel path in the output folder -> a local file


def artifact_key(*parts: str) -> str:
    """Prefect keys: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def reserved_keys(stage: str) -> set[str]:
    """The artifact keys every stage publishes itself; its main table must not take them."""
    return {artifact_key("fm", stage, kind) for kind in ("report", "summary", "manifest", "progress")}


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


# ---------------------------------------------------------------------------------------------- report
def _cell(value: Any) -> str:
    text = "" if value is None else _fmt(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= REPORT_CELL_CHARS else text[:REPORT_CELL_CHARS - 1] + "…"


def markdown_table(rows: list[dict[str, Any]], max_rows: int = REPORT_TABLE_ROWS) -> str:
    """A markdown table of the first `max_rows` rows; columns empty in every shown row are left out."""
    shown = rows[:max_rows]
    columns: list[str] = []
    for row in shown:
        columns += [k for k in row if k not in columns]
    columns = [c for c in columns if any(r.get(c) not in (None, "") for r in shown)]
    if not columns:
        return "_(empty)_"
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in shown]
    if len(rows) > max_rows:
        lines.append(f"\n_first {max_rows} of {len(rows)} rows_")
    return "\n".join(lines)


def _encode(img, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
    else:
        img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def thumbnail_uri(path: Path, max_bytes: int, width: int = THUMB_WIDTH) -> str | None:
    """A data: URI of the picture scaled to at most `width` px wide, PNG or JPEG (the smaller), no longer
    than `max_bytes`; narrower and lower-quality versions are tried before giving up (None)."""
    from PIL import Image

    with Image.open(path) as src:
        src.load()
        img = src.convert("RGBA" if src.mode in ("RGBA", "LA", "P") else "RGB")
    if img.mode == "RGBA" and img.getextrema()[3][0] == 255:
        img = img.convert("RGB")  # opaque: JPEG can take it
    for w in (width, width * 3 // 4, width // 2, width * 3 // 8):
        scale = min(1.0, w / img.width, THUMB_MAX_HEIGHT * w / width / img.height)
        small = img if scale >= 1.0 else img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                                    Image.Resampling.LANCZOS)
        candidates = [("png", _encode(small, "PNG", 0))]
        if small.mode == "RGB":
            candidates += [("jpeg", _encode(small, "JPEG", q)) for q in (85, 65)]
        for kind, data in sorted(candidates, key=lambda c: len(c[1])):
            uri = f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")
            if len(uri) <= max_bytes:
                return uri
    return None


def _local_open(outcome: StageOutcome) -> OpenFn:
    return lambda rel: Path(outcome.output_path) / rel


def report_markdown(outcome: StageOutcome, open_file: OpenFn | None = None, files: tuple[str, str] | None = None,
                    max_bytes: int = REPORT_MAX_BYTES) -> str:
    """The stage's one report page: summary, pictures inline (thumbnails within the size budget), its
    tables (first rows), the manifest path; `files` adds full-size links through the data file server."""
    open_file = open_file or _local_open(outcome)
    report = outcome.report
    manifest_line = f"- manifest: `{outcome.output_path}/{MANIFEST_NAME}`"
    if files:
        manifest_line += f" ([open]({file_link(outcome, MANIFEST_NAME, files)}))"
    head = [summary_markdown(outcome), "", manifest_line, ""]
    tables = [f"### {redact(name)} ({len(rows)} rows)\n\n{redact(markdown_table(rows))}\n"
              for name, rows in report.tables.items() if rows]
    text = "\n".join(head + (["## Tables", ""] + tables if tables else []))
    images = [(redact(caption).replace("[", "(").replace("]", ")"), rel) for caption, rel in report.images.items()]
    wheres = [f"[full size]({file_link(outcome, rel, files)})" if files else f"`{rel}`" for _, rel in images]
    # What the page holds besides the data: URIs (captions twice, a note's words, the section heading).
    frame = sum(2 * len(label.encode()) + len(where.encode()) + 80 for (label, _), where in zip(images, wheres)) + 40
    budget = max_bytes - len(text.encode()) - frame
    pictures: list[str] = []
    for i, ((label, rel), where) in enumerate(zip(images, wheres)):
        why = "over the page's size budget"
        try:
            uri = thumbnail_uri(open_file(rel), max(0, budget // (len(images) - i)))
        except Exception as exc:  # a missing or unreadable picture is a note on the page, not a failed stage
            uri, why = None, f"unreadable ({type(exc).__name__})"
        if uri is None:
            pictures.append(f"**{label}** — not inlined, {why}: {where}\n")
            continue
        budget -= len(uri)
        pictures.append(f"**{label}** · {where}\n\n![{label}]({uri})\n")
    if pictures:
        at = text.find("\n## Tables") if tables else len(text)
        text = text[:at] + "\n## Pictures\n\n" + "\n".join(pictures) + text[at:]
    return text


def publish_outcome(outcome: StageOutcome, files: tuple[str, str] | None = None,
                    open_file: OpenFn | None = None) -> dict[str, str]:
    """The stage's artifacts (see the module docstring); key -> artifact type.

    files: (base URL, served root folder) of the data-root file server, when one runs (full-size links);
    open_file: a local path for a file of the output (object storage: the store's download), default the
    output folder itself."""
    stage = outcome.manifest.stage
    made: dict[str, str] = {}
    key = artifact_key("fm", stage, "report")
    create_markdown_artifact(report_markdown(outcome, open_file, files), key=key, description=f"{stage} report")
    made[key] = "markdown"
    key = artifact_key("fm", stage, "summary")
    create_markdown_artifact(summary_markdown(outcome), key=key, description=f"{stage} summary")
    made[key] = "markdown"
    key = artifact_key("fm", stage, "manifest")
    create_link_artifact(file_link(outcome, MANIFEST_NAME, files),
                         link_text=f"{stage} manifest {outcome.manifest.fingerprint}", key=key)
    made[key] = "link"
    main = next(((name, rows) for name, rows in outcome.report.tables.items() if rows), None)
    if main is not None:  # the stage's main distribution, as a sortable table (every table is in the report)
        key = artifact_key("fm", stage, main[0])
        if key in reserved_keys(stage):
            key = artifact_key("fm", stage, "table", main[0])
        create_table_artifact(main[1][:MAX_TABLE_ROWS], key=key, description=f"{stage}: {main[0]}")
        made[key] = "table"
    return made


class ProgressReporter:
    """The stage's progress artifact (updated at most every `interval` s), plus a rich progress bar on the
    terminal when `fm run` runs the flow in-process (BOORUFLOW_CLI_PROGRESS=1).

    Made once per stage run (`artifact_id` attaches to one made elsewhere, e.g. by the flow for its task);
    it ends at 100 % (`done`) or says "failed" (`failed`), never stays at its last update."""

    def __init__(self, stage: str, interval: float = 2.0, artifact_id: UUID | None = None,
                 bar: bool = True) -> None:
        self.stage = stage
        self.interval = interval
        self._last = 0.0
        self.artifact_id = artifact_id or create_progress_artifact(
            0.0, key=artifact_key("fm", stage, "progress"), description=f"{stage}: starting")
        self._bar = None
        if bar and os.environ.get("BOORUFLOW_CLI_PROGRESS") == "1" and sys.stderr.isatty():
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
        update_progress_artifact(self.artifact_id, min(pct, 99.0), description=redact(f"{self.stage}: {message}"))

    def note(self, message: str) -> None:
        """A new description at the current percentage (e.g. what the stage waits for)."""
        self._quiet_update(None, f"{self.stage}: {message}")

    def _quiet_update(self, pct: float | None, description: str) -> None:
        """pct None keeps the bar where the stage left it (another reporter of the same artifact may have
        moved it). For notes and failures: an unreachable API must not hide a wait or replace the stage's
        own error."""
        try:
            if pct is not None:
                update_progress_artifact(self.artifact_id, pct, description=redact(description)[:500])
                return
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import ArtifactUpdate

            with get_client(sync_client=True) as client:
                client.update_artifact(self.artifact_id, ArtifactUpdate(description=redact(description)[:500]))
        except Exception:
            pass

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def done(self, cached: bool = False) -> None:
        self.close()
        update_progress_artifact(self.artifact_id, 100.0,
                                 description=f"{self.stage}: {'cached (reused a complete output)' if cached else 'done'}")

    def failed(self, error: BaseException | str) -> None:
        self.close()
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}".rstrip(": ")
        self._quiet_update(None, f"{self.stage}: **failed** — {reason}")
