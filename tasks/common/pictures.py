"""Drawing a stage's pictures without ever failing the stage over one."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from pipeline_config.secrets import redact
from tasks.common.stage import StageContext


def draw_pictures(ctx: StageContext, jobs: dict[str, Callable[[], dict[str, str]]]) -> tuple[dict[str, str], str]:
    """Run each picture job; one that raises is logged and named in the returned summary note, never fatal
    (pictures are for people: a missing one must not cost the data). Returns (images, summary note)."""
    started = time.monotonic()
    images: dict[str, str] = {}
    note = ""
    # Jobs are independent (own files) and spend their time in PIL's decode/resize/PNG code, which releases
    # the GIL: run them side by side, then collect in the given order so the report reads the same.
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1)),
                            thread_name_prefix=f"{ctx.stage}-pictures") as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        for name, future in futures.items():
            try:
                images.update(future.result())
            except Exception as exc:  # noqa: BLE001 -- whatever went wrong, the tables stand without the picture
                error = redact(f"{type(exc).__name__}: {exc}")
                ctx.log.warning("%s: %s pictures not drawn: %s", ctx.stage, name, error, exc_info=True)
                note += f"\n\n**Warning:** {name} pictures not drawn: {error}"
    ctx.log.info("%s: %d pictures in %.1fs", ctx.stage, len(images), time.monotonic() - started)
    return images, note
