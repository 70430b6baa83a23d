"""Content checks of one image file: md5, full decode under a decompression-bomb limit, size vs the post.

Decoding is CPU work that would fight the crawler's event loop for the GIL, so by default it runs in
worker processes: `python -m tasks.ingest.verify` reads one JSON request a line on stdin and answers one
JSON line on stdout. Plain subprocesses (not multiprocessing) mean no re-import of the caller's __main__,
no fork next to threads, and a worker whose decoder crashes on a hostile file costs only that file (a
not_an_image reject) — the pool starts a new worker. Workers exit when their stdin closes, so a killed
stage leaves none behind.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

from tasks.ingest.parse import Post
from tasks.ingest.reasons import Reject


class Expected(NamedTuple):
    """What the post says about its file."""

    md5: str | None
    width: int | None
    height: int | None


def _sniff(path: Path, content_type: str | None) -> str:
    with open(path, "rb") as fh:
        head = fh.read(24)
    kind = f"content-type {content_type}, " if content_type else ""
    return f"{kind}starts {head[:16]!r}"


def verify_file(path: Path, post: Expected | Post, actual_md5: str, max_pixels: int,
                content_type: str | None = None) -> Reject | None:
    """All content checks of one downloaded file (CPU-bound; runs in a verify worker).

    When the md5 differs, decoding still runs so the reason says what arrived: an HTML page
    (not_an_image), a cut-off image (truncated) or another valid image (md5_mismatch).
    """
    md5_ok = actual_md5 == post.md5
    try:
        img = Image.open(path)  # header only
    except Image.DecompressionBombError as exc:
        return Reject("decompression_bomb", str(exc)[:200])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if path.stat().st_size == 0:
            return Reject("truncated", "empty body")
        return Reject("not_an_image", f"{type(exc).__name__}; {_sniff(path, content_type)}")
    with img:
        width, height = img.size
        if width * height > max_pixels:
            return Reject("decompression_bomb", f"{width}x{height} = {width * height:,} px above verify.max_pixels "
                                                f"{max_pixels:,}")
        try:
            # JPEG: DCT-domain downscaled decode. libjpeg still parses every entropy-coded block of the
            # file (truncated or corrupt data raises exactly as in a full decode) but skips the full-size
            # IDCT/colour conversion: ~1.8x less CPU per image. Other formats decode in full.
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()  # the whole stream: catches truncated and corrupt data that headers hide
        except Image.DecompressionBombError as exc:
            return Reject("decompression_bomb", str(exc)[:200])
        except (OSError, EOFError) as exc:
            text = str(exc)
            if isinstance(exc, EOFError) or "truncat" in text.lower():
                return Reject("truncated", f"{img.format} {width}x{height}: {text[:160]}")
            return Reject("not_an_image", f"{img.format} decode failed: {text[:160]}")
        except Exception as exc:  # noqa: BLE001 - any decoder failure means a broken file
            return Reject("not_an_image", f"{img.format} decode failed: {type(exc).__name__} {str(exc)[:160]}")
        if not md5_ok:
            return Reject("md5_mismatch", f"expected {post.md5}, got {actual_md5} ({img.format} {width}x{height})")
        if post.width and post.height and (width, height) != (post.width, post.height):
            return Reject("size_mismatch", f"decoded {width}x{height}, post says {post.width}x{post.height}")
    return None


# --- worker processes ------------------------------------------------------------------------------------


def _answer(request: dict) -> dict:
    expected = Expected(request["md5"], request.get("width"), request.get("height"))
    reject = verify_file(Path(request["path"]), expected, request["actual_md5"], int(request["max_pixels"]),
                         request.get("content_type"))
    return {"reason": reject.reason, "detail": reject.detail} if reject else {}


def worker_main() -> None:
    """The loop of one worker process: a JSON request per stdin line -> a JSON answer per stdout line."""
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = _answer(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            answer = {"reason": "not_an_image", "detail": f"verifier error: {type(exc).__name__} {str(exc)[:160]}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


class ThreadVerifier:
    """The same interface on threads of this process (no start-up cost; tests and tiny runs)."""

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ingest-verify")
        self.crashes = 0

    async def start(self) -> "ThreadVerifier":
        return self

    async def verify(self, path: Path, post: Expected | Post, actual_md5: str, max_pixels: int,
                     content_type: str | None = None) -> Reject | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, verify_file, path, post, actual_md5, max_pixels,
                                          content_type)

    async def close(self) -> None:
        self.executor.shutdown(wait=True)


def make_verifier(mode: str, workers: int) -> ThreadVerifier | ProcessVerifier:
    return ThreadVerifier(workers) if mode == "thread" else ProcessVerifier(workers)


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, request: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise ConnectionError("verify worker exited")
        return json.loads(line)


class ProcessVerifier:
    """A pool of verify worker processes used from one event loop."""

    def __init__(self, workers: int) -> None:
        self.n = max(1, workers)
        self.idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self.all: list[_Worker] = []
        self.crashes = 0
        self.final_peak_rss_mib: float | None = None

    async def _spawn(self) -> _Worker:
        import tasks

        root = str(Path(tasks.__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tasks.ingest.verify", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=1 << 20)
        worker = _Worker(proc)
        self.all.append(worker)
        return worker

    async def start(self) -> "ProcessVerifier":
        for _ in range(self.n):
            self.idle.put_nowait(await self._spawn())
        return self

    async def verify(self, path: Path, post: Expected | Post, actual_md5: str, max_pixels: int,
                     content_type: str | None = None) -> Reject | None:
        request = {"path": str(path), "md5": post.md5, "width": post.width, "height": post.height,
                   "actual_md5": actual_md5, "max_pixels": max_pixels, "content_type": content_type}
        worker = await self.idle.get()
        try:
            answer = await worker.ask(request)
        except (ConnectionError, BrokenPipeError, ConnectionResetError, json.JSONDecodeError):
            self.crashes += 1  # the decoder died on this file: reject it, replace the worker
            self.all.remove(worker)
            if worker.proc.returncode is None:
                worker.proc.kill()
            self.idle.put_nowait(await self._spawn())
            return Reject("not_an_image", "the image decoder crashed on this file")
        except BaseException:  # cancelled mid-request (shutdown): its answer would come out of turn
            self.all.remove(worker)
            if worker.proc.returncode is None:
                worker.proc.kill()
            raise
        self.idle.put_nowait(worker)
        return Reject(answer["reason"], answer["detail"]) if answer else None

    def peak_rss_mib(self) -> float | None:
        """The largest peak RSS of the live workers (Linux /proc; None elsewhere)."""
        peaks = []
        for worker in self.all:
            try:
                status = Path(f"/proc/{worker.proc.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(int(line.split()[1]) / 1024)
        return max(peaks) if peaks else None

    async def close(self) -> None:
        self.final_peak_rss_mib = self.peak_rss_mib()
        for worker in self.all:
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        for worker in self.all:
            try:
                await asyncio.wait_for(worker.proc.wait(), 5)
            except asyncio.TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
        self.all.clear()


if __name__ == "__main__":
    worker_main()
