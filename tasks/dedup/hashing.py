"""Perceptual hashes (64-bit pHash) of image files: fast decode, a process pool, bad files as data.

The hash is imagehash's `phash` (4.3; hash_size 8, highfreq_factor 4), computed without the package:
    grey   = image as 8-bit luma ("L"), resized to 32x32 with LANCZOS
    C      = scipy.fftpack.dct(scipy.fftpack.dct(grey, axis=0), axis=1)     (DCT-II, unnormalised)
    bits   = C[:8, :8] > median(C[:8, :8])
    hash   = the 64 bits row-major, the first bit most significant (== int(str(imagehash.phash(img)), 16))
One deliberate difference: an image with transparency is composited onto white before it turns grey
(imagehash's convert("L") drops alpha and hashes whatever colour the transparent pixels happen to hide, so
a transparent PNG and its white-background re-upload would hash far apart).

Decoding is where the time goes. `fast=True` (the default) shrinks the picture 1/s before the LANCZOS
step (s = 8, 4, 2 or 1, the largest that leaves both sides >= DRAFT_SIDE px): a JPEG by libjpeg's
DCT-domain scaling (`Image.draft("L", ...)`: luma plane only, no colour conversion, no full-size IDCT),
any other format by the same s x s box average (`Image.reduce`), which is what the DCT scaling computes
-- so a PNG and its JPEG re-upload take the same path. ~4x less CPU for a JPEG; a PNG still pays its full
inflate. A plain 8-bit L/RGB/LA/RGBA PNG is decoded to exactly Pillow's pixels by a faster path: inflated
whole by libdeflate (Pillow inflates a row at a time, ~2/3 of its PNG time), then unfiltered, RGB turned to
luma on the way, by a numba-compiled loop: ~6 ms of CPU instead of ~16 for a 1.5 MP PNG (anything else,
Pillow decodes; BOORUFLOW_DEDUP_DECODE=pillow forces that). Loading numba and the kernel costs a process
~0.9 s of CPU (and ~4 s once per install or edit, to compile into __pycache__): paid once a call, by the
first worker process, which then forks the others (start_workers). The DCT is two small matrix
products, redone by scipy.fftpack for a picture with a coefficient within 1e-6 of the median (a tie: flat
or mirror-symmetric pictures), so the bits are imagehash's exactly and a worker seldom imports scipy.
The fast hash is a different resampling of the picture than the reference's, so the two can
differ by a few bits: over 2,000 generated Danbooru-sized pictures (bench/bench_dedup.py) 61% are equal,
99.0% within 4 bits, 99.5% within 6; 11 lie further (up to 30). A picture whose low-frequency content
is mirror-symmetric (a figure centred on a flat background) has about half its 64 DCT coefficients near
zero, and those bits are noise along any change of resampling path: such a picture can land 20-30 bits from its own
reference (as it does when box-reduced 4x before LANCZOS). That is pHash's own fragility; near-duplicates
are found between hashes made the same way, which is what bench/bench_dedup.py measures.
`fast=False` is the reference definition exactly.

`hash_files` spreads a list of files over worker processes in chunks. A file that cannot be hashed is an
error row with a reason code (REASONS), never an exception; a decoder that kills its worker process costs
only the file that did it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as StructError  # some plugins raise it on garbage headers

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.common.transparency import on_white

HASH_SIZE = 8  # 8x8 low-frequency DCT coefficients -> 64 bits
IMG_SIZE = 32  # HASH_SIZE * highfreq_factor 4
DRAFT_SIDE = 64  # fast path: decoded/box-averaged at 1/s, s in 8..1 with both sides >= this (s = 8 from 512 px)
CHUNK = 32  # files per pool task
MAX_PIXELS = 400_000_000  # above this width*height a file is not decoded (PIL's own bomb limit is lower)
# "pillow": decode every file with Pillow alone (no libdeflate + numba shortcut for PNG; the same
# pixels, slower) -- a switch for benchmarks and for ruling the shortcuts out; workers inherit it.
DECODE_ENV = "BOORUFLOW_DEDUP_DECODE"

REASONS = {
    "image_missing": "the image file is not in the pool",  # the reason codes of tag and cache for the same faults
    "undecodable_image": "the file is not a decodable image (corrupt, truncated, unknown format)",
    "image_too_large": "width*height above the pixel limit",
    "decoder_crash": "the image decoder killed its worker process on this file",
}


@dataclass(frozen=True)
class HashError:
    index: int  # position in the list given to hash_files
    path: str
    reason: str  # a key of REASONS
    detail: str


@dataclass
class HashResult:
    hashes: np.ndarray  # uint64 [n]; 0 where ok is False
    ok: np.ndarray  # bool [n]
    errors: list[HashError] = field(default_factory=list)  # one per file that is not ok, by index
    seconds: float = 0.0
    workers: int = 0


# --- the hash -------------------------------------------------------------------------------------------
def bits_to_uint64(bits: np.ndarray) -> np.ndarray:
    """[n, 8, 8] (or [n, 64]) bool -> uint64 [n], row-major, the first bit the most significant."""
    packed = np.packbits(np.asarray(bits, bool).reshape(len(bits), 64), axis=1)  # [n, 8] bytes, MSB first
    return packed.view(">u8").reshape(-1).astype(np.uint64)


# The 8x8 low-frequency corner of the unnormalised DCT-II along both axes: C = D @ grey @ D.T with
# D[k, m] = 2 cos(pi k (2m + 1) / 64), what scipy.fftpack.dct computes (by FFT) for k < 8.
_DCT_ROWS = 2 * np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * np.arange(IMG_SIZE)[None, :] + 1) / (2 * IMG_SIZE))
# Two double-precision evaluations of these sums (each <= 2*2*255*1024 in size) differ by < 1e-7; a picture
# whose coefficients all lie further than this from their median has the same bits either way.
_TIE = 1e-6


def _phash_scipy(px: np.ndarray) -> np.ndarray:
    from scipy.fftpack import dct

    coeffs = dct(dct(px, axis=1), axis=2)[:, :HASH_SIZE, :HASH_SIZE].reshape(len(px), HASH_SIZE * HASH_SIZE)
    return bits_to_uint64(coeffs > np.median(coeffs, axis=1, keepdims=True))


def phash_pixels(grey: np.ndarray) -> np.ndarray:
    """pHash of 32x32 grey images: [n, 32, 32] (or one [32, 32]) uint8 -> uint64 [n] (or [1]).
    Per image exactly imagehash.phash's bits: the 8x8 DCT corner by two small matrix products, and any
    picture with a coefficient within _TIE of the median (ties: flat or mirror-symmetric pictures) done
    again by imagehash's own arithmetic (scipy.fftpack along the same axes). So a hash worker imports
    scipy (~0.25 s of CPU) only when it meets such a picture."""
    px = np.asarray(grey)
    if px.ndim == 2:
        px = px[None]
    if px.shape[1:] != (IMG_SIZE, IMG_SIZE):
        raise ValueError(f"expected [n, {IMG_SIZE}, {IMG_SIZE}] grey pixels, got {px.shape}")
    coeffs = (_DCT_ROWS @ px.astype(np.float64) @ _DCT_ROWS.T).reshape(len(px), HASH_SIZE * HASH_SIZE)
    med = np.median(coeffs, axis=1, keepdims=True)
    hashes = bits_to_uint64(coeffs > med)
    near = np.flatnonzero((np.abs(coeffs - med) < _TIE).any(axis=1))
    if len(near):
        hashes[near] = _phash_scipy(px[near])
    return hashes


def _flatten_to_grey(img: Image.Image) -> Image.Image:
    """8-bit luma; transparency composited onto white first."""
    img = on_white(img)
    return img if img.mode == "L" else img.convert("L")


def box_scale(width: int, height: int) -> int:
    """The 1/s shrink of the fast path: the largest s of 8, 4, 2, 1 leaving both sides >= DRAFT_SIDE -- the
    scale libjpeg's DCT-domain decode picks for draft(size=(DRAFT_SIDE, DRAFT_SIDE))."""
    fit = min(width // DRAFT_SIDE, height // DRAFT_SIDE)
    return next((s for s in (8, 4, 2, 1) if fit >= s), 1)  # a side under DRAFT_SIDE px: no shrink


def grey_thumb(img: Image.Image, fast: bool = True) -> np.ndarray:
    """The 32x32 uint8 luma the hash is taken of, from an opened (not yet loaded) image."""
    scale = box_scale(*img.size) if fast else 1
    if scale > 1 and img.format in ("JPEG", "MPO"):
        full = img.size
        img.draft("L", (DRAFT_SIDE, DRAFT_SIDE))  # DCT-domain 1/scale decode of the luma plane only
        if img.size != full:
            scale = 1  # done by the decoder
    grey = _flatten_to_grey(img)
    if scale > 1:
        # Other formats (and a JPEG the decoder could not scale): the same 1/scale box average that the
        # DCT scaling computes (an output pixel = the mean of a scale x scale block), so a PNG and its JPEG
        # re-upload take the same resampling path and hash alike.
        grey = grey.reduce(scale)
    return np.asarray(grey.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


# --- fast PNG decode ------------------------------------------------------------------------------------
_PNG_MODES = {0: ("L", 1), 2: ("RGB", 3), 4: ("LA", 2), 6: ("RGBA", 4)}  # 8-bit colour type -> (mode, bytes/px)
_png_kernel = None  # the compiled _unfilter_rows, made on the first PNG; False where numba or deflate is missing


def _unfilter_rows(raw, height, stride, bpp, pixels, grey):  # pragma: no cover - runs compiled (numba)
    """PNG's per-row filters undone: raw = `height` rows of a filter byte and `stride` filtered bytes (the
    inflated IDAT stream). Row y's pixel bytes land in pixels[y % len(pixels)] (all rows, or a ring of 2).
    With grey [height, width] (RGB or RGBA, bpp 3 or 4) also Pillow's luma of each pixel, alpha ignored:
    L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16, exactly PIL's convert("L").
    0 on a filter type above 4; 2 where an alpha byte is not 255 (grey is then not the picture); else 1."""
    zero = np.zeros(stride, np.uint8)
    ring = pixels.shape[0]
    opaque = True
    for y in range(height):
        src = raw[y * (stride + 1) + 1: (y + 1) * (stride + 1)]
        ft = raw[y * (stride + 1)]
        cur = pixels[y % ring]
        prev = pixels[(y - 1) % ring] if y else zero
        if ft == 0:  # None
            cur[:] = src
        elif ft == 1:  # Sub
            for i in range(bpp):
                cur[i] = src[i]
            for i in range(bpp, stride):
                cur[i] = np.uint8(src[i] + cur[i - bpp])
        elif ft == 2:  # Up
            for i in range(stride):
                cur[i] = np.uint8(src[i] + prev[i])
        elif ft == 3:  # Average
            for i in range(bpp):
                cur[i] = np.uint8(src[i] + (prev[i] >> 1))
            for i in range(bpp, stride):
                cur[i] = np.uint8(src[i] + ((np.uint32(cur[i - bpp]) + np.uint32(prev[i])) >> 1))
        elif ft == 4:  # Paeth
            for i in range(bpp):
                cur[i] = np.uint8(src[i] + prev[i])
            for i in range(bpp, stride):
                a = np.int32(cur[i - bpp])
                b = np.int32(prev[i])
                c = np.int32(prev[i - bpp])
                pa = abs(b - c)
                pb = abs(a - c)
                pc = abs(a + b - 2 * c)
                if pa <= pb and pa <= pc:
                    pred = a
                elif pb <= pc:
                    pred = b
                else:
                    pred = c
                cur[i] = np.uint8(np.int32(src[i]) + pred)
        else:
            return 0
        if grey.shape[0]:  # constant strides and int32 arithmetic: LLVM vectorises these loops
            out = grey[y]
            if bpp == 3:
                for x in range(out.shape[0]):
                    out[x] = (np.int32(cur[3 * x]) * 19595 + np.int32(cur[3 * x + 1]) * 38470
                              + np.int32(cur[3 * x + 2]) * 7471 + 0x8000) >> 16
            else:
                alpha = 255
                for x in range(out.shape[0]):
                    out[x] = (np.int32(cur[4 * x]) * 19595 + np.int32(cur[4 * x + 1]) * 38470
                              + np.int32(cur[4 * x + 2]) * 7471 + 0x8000) >> 16
                    alpha &= cur[4 * x + 3]
                if alpha != 255:
                    opaque = False
    return 1 if opaque else 2


def _png_unfilter():
    """The compiled unfilter kernel, or None where numba or deflate (libdeflate) is not installed. Loading
    it (cached by numba in __pycache__ after the first compile) costs a process ~0.9 s of CPU."""
    global _png_kernel
    if _png_kernel is None:
        try:
            import deflate  # noqa: F401 - libdeflate, used by _decode_png
            import numba

            kernel = numba.njit(cache=True, nogil=True, boundscheck=False)(_unfilter_rows)
            kernel(np.zeros(4, np.uint8), 1, 3, 3, np.zeros((2, 3), np.uint8), np.zeros((1, 1), np.uint8))
            _png_kernel = kernel
        except ImportError:  # pragma: no cover - optional speed-up
            _png_kernel = False
    return _png_kernel or None


def _decode_png(img: Image.Image) -> Image.Image | None:
    """The first frame of an opened (not loaded) PNG decoded by libdeflate + a compiled unfilter: a new PIL
    image with the same pixels as Pillow's own decode, or for RGB (and RGBA whose alpha is all 255) its
    luma directly, equal to img.convert("L"). Pillow spends ~2/3 of its PNG time inflating a row at a time;
    this is ~2x faster. None for anything but a plain 8-bit L/RGB/LA/RGBA image without tRNS, animation or
    interlace, or where the stream does not decode cleanly: the caller then lets Pillow decode it (and
    raise its own errors)."""
    if img.format != "PNG" or "transparency" in img.info or getattr(img, "n_frames", 1) != 1:
        return None
    kernel = _png_unfilter()
    if kernel is None or img.fp is None:
        return None
    import deflate

    img.fp.seek(0)
    data = img.fp.read()
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, compression, filtering, interlace = data[24:29]
    mode, bpp = _PNG_MODES.get(colour, ("", 0))
    if (width, height) != img.size or mode != img.mode or depth != 8 or compression or filtering or interlace:
        return None
    idat: list[memoryview] = []
    view, pos = memoryview(data), 8
    while pos + 8 <= len(data):  # the chunks: length, type, body, CRC (not checked, as Pillow skips IDAT's)
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat.append(view[pos + 8:pos + 8 + length])
        elif kind == b"IEND" or idat:
            break  # one run of IDAT chunks is the image
        pos += 12 + length
    stride = width * bpp
    size = height * (stride + 1)
    try:
        raw = np.frombuffer(deflate.zlib_decompress(b"".join(idat), size), np.uint8)  # checks the adler32
    except deflate.DeflateError:
        return None
    if raw.size != size:
        return None
    if bpp == 3:  # RGB: luma only, the pixel rows in a ring of two
        grey = np.empty((height, width), np.uint8)
        done = kernel(raw, height, stride, bpp, np.empty((2, stride), np.uint8), grey)
        return Image.frombuffer("L", (width, height), grey, "raw", "L", 0, 1) if done == 1 else None
    pixels = np.empty((height, stride), np.uint8)
    grey = np.empty((height, width) if bpp == 4 else (0, 0), np.uint8)
    done = kernel(raw, height, stride, bpp, pixels, grey)
    if done == 0:
        return None
    if done == 1 and bpp == 4:  # opaque RGBA: on_white would change nothing
        return Image.frombuffer("L", (width, height), grey, "raw", "L", 0, 1)
    return Image.frombuffer(mode, (width, height), pixels, "raw", mode, 0, 1)


def load_grey(path: str | Path, fast: bool = True, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """grey_thumb of an image file (first frame). Raises FileNotFoundError / OSError / ValueError.
    fast=True decodes a plain 8-bit PNG through libdeflate + a compiled unfilter to Pillow's pixels
    (_decode_png, ~2.8x faster than Pillow's decode); anything it does not take, Pillow decodes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise Image.DecompressionBombError(f"{img.width}x{img.height} above {max_pixels:,} px")
            fast_decode = fast and os.environ.get(DECODE_ENV) != "pillow"
            decoded = _decode_png(img) if fast_decode and img.format == "PNG" else None
            return grey_thumb(decoded if decoded is not None else img, fast)


def phash_image(img: Image.Image, fast: bool = False) -> int:
    """pHash of a PIL image as a Python int (fast=False: the reference definition)."""
    return int(phash_pixels(grey_thumb(img, fast))[0])


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, FileNotFoundError):
        return "image_missing", str(exc)[:200]
    if isinstance(exc, Image.DecompressionBombError):
        return "image_too_large", str(exc)[:200]
    return "undecodable_image", f"{type(exc).__name__}: {str(exc)[:200]}"


def hash_chunk(paths: Sequence[str], fast: bool = True, max_pixels: int = MAX_PIXELS
               ) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """Hash a few files in this process: (uint64 hashes [len], [(position, reason, detail)] of failures)."""
    grey = np.zeros((len(paths), IMG_SIZE, IMG_SIZE), np.uint8)
    failed: list[tuple[int, str, str]] = []
    for i, path in enumerate(paths):
        try:
            grey[i] = load_grey(path, fast, max_pixels)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                MemoryError, IndexError, TypeError, StructError) as exc:
            failed.append((i, *_classify(exc)))
    hashes = phash_pixels(grey)
    for i, _, _ in failed:
        hashes[i] = 0
    return hashes, failed


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def chunk_bounds(n: int, chunk: int, workers: int) -> list[int]:
    """Where the chunks of n files start (and n): `chunk` files each, but the last ~2 chunks a worker
    shrink to a quarter, so the workers run out of files at about the same time (no core idles through
    a whole chunk at the end)."""
    small = max(1, chunk // 4)
    tail = min(n, 2 * max(1, workers) * chunk)  # the files handed out in small chunks
    bounds = list(range(0, n - tail, chunk)) + list(range(n - tail, n, small))
    return sorted(set(bounds)) + [n]


def worker_command() -> list[str]:
    return [sys.executable, "-m", "tasks.dedup.hashing"]


class _Worker:
    """One hash worker at the end of a socket: a JSON request a line in, a JSON answer a line out. It says
    `{"ready": true, "pid": N}` first, once its imports are done."""

    def __init__(self, sock: socket.socket, starter: subprocess.Popen, cmd: Sequence[str]) -> None:
        self.sock = sock
        self.reader = sock.makefile("r", encoding="utf-8")
        self.writer = sock.makefile("w", encoding="utf-8")
        self.starter = starter  # the process that started it (it, or the one it was forked from)
        self.cmd = cmd
        self.pid: int | None = None

    def wait_ready(self) -> None:
        try:
            hello = self.reader.readline()
        except OSError:
            hello = ""
        if not hello.startswith('{"ready"'):
            try:
                code = self.starter.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            raise RuntimeError(f"hash worker {' '.join(self.cmd)} did not start (exit code {code}); "
                               "its stderr is above")
        self.pid = int(json.loads(hello).get("pid") or 0) or None

    def ask(self, request: dict) -> dict:
        """The answer, or ConnectionError when the process died (a decoder crash, an OOM kill)."""
        try:
            self.writer.write(json.dumps(request) + "\n")
            self.writer.flush()
            line = self.reader.readline()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise ConnectionError(f"hash worker died: {exc}") from exc
        if not line:
            raise ConnectionError("hash worker closed its socket")
        return json.loads(line)

    def close(self) -> None:
        for stream in (self.writer, self.reader, self.sock):
            try:
                stream.close()  # the worker's loop ends at EOF
            except OSError:
                pass


def start_workers(count: int, cmd: Sequence[str], warm_png: bool) -> tuple[subprocess.Popen, list[_Worker]]:
    """`count` hash workers for the price of one start: ONE process (`cmd --fds ...`) does the imports (and,
    with warm_png, loads numba's compiled PNG kernel: ~0.9 s of CPU a process), then forks a copy of itself
    for every socket but the last, which it serves itself. Forking a process that has not started threads
    is safe; the caller's own process (Prefect, its threads) is never forked."""
    pairs = [socket.socketpair() for _ in range(count)]
    theirs = [b.fileno() for _, b in pairs]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")  # a process a core already: BLAS threads would only compete
    args = [*cmd, "--fds", ",".join(map(str, theirs))] + (["--warm-png"] if warm_png else [])
    try:
        # its own process group (it and its forks): an early stop kills the family with one killpg, no pids
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, pass_fds=theirs, env=env, start_new_session=True)
    finally:
        for _, b in pairs:
            b.close()
    return proc, [_Worker(a, proc, cmd) for a, _ in pairs]


def hash_files(
    paths: Sequence[str | Path],
    *,
    workers: int | None = None,
    fast: bool = True,
    chunk: int = CHUNK,
    max_pixels: int = MAX_PIXELS,
    worker_cmd: Sequence[str] | None = None,
) -> HashResult:
    """pHash every file; the result is in the order of `paths`.

    workers: worker processes (default: the usable cores; 0 = in this process, as is a list of at most
    `chunk` files). Workers are a subprocess (`python -m tasks.dedup.hashing`, like ingest's verify
    workers) and copies it forks of itself once its imports are done (start_workers): no fork of the
    caller's process (its threads), no re-import of its __main__, the imports paid once. One thread here
    feeds each worker chunks of `chunk` files (smaller ones at the end: chunk_bounds), over a socket. A
    worker that dies takes only its chunk down: the chunk is split in halves and retried on a fresh
    worker, down to the single file that did it (`decoder_crash`).
    `worker_cmd` replaces the worker's command line (tests)."""
    started = time.perf_counter()
    paths = [str(p) for p in paths]
    n = len(paths)
    hashes = np.zeros(n, np.uint64)
    ok = np.ones(n, bool)
    errors: list[HashError] = []
    workers = default_workers() if workers is None else max(0, int(workers))
    chunk = max(1, int(chunk))
    lock = threading.Lock()

    def take(idx: np.ndarray, hs: Sequence[int] | np.ndarray, failed: Sequence[Sequence]) -> None:
        with lock:
            hashes[idx] = np.asarray(hs, np.uint64)
            for pos, reason, detail in failed:
                i = int(idx[int(pos)])
                ok[i] = False
                hashes[i] = 0
                errors.append(HashError(i, paths[i], str(reason), str(detail)))

    def finish(used: int) -> HashResult:
        errors.sort(key=lambda e: e.index)
        return HashResult(hashes, ok, errors, time.perf_counter() - started, used)

    if workers == 0 or n <= chunk:
        for lo in range(0, n, chunk):
            idx = np.arange(lo, min(n, lo + chunk))
            take(idx, *hash_chunk([paths[i] for i in idx], fast, max_pixels))
        return finish(0)

    queue: deque[np.ndarray] = deque(np.split(np.arange(n), chunk_bounds(n, chunk, workers)[1:-1]))
    open_chunks = [len(queue)]  # queued or in flight; a thread stops when it is 0
    cmd = list(worker_cmd or worker_command())
    count = min(workers, open_chunks[0])
    warm_png = any(p[-4:].lower() == ".png" for p in paths)
    starters: list[subprocess.Popen] = []
    live: list[_Worker] = []
    failures: list[BaseException] = []

    def kill_family() -> None:  # the workers may be busy (or hung) on a file: nothing should wait for them
        with lock:
            family = list(starters)
        for p in family:  # a started process not yet waited for: its process group id is still its own
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def spawn_one() -> _Worker:  # a replacement for a worker that died: started on its own
        proc, (worker,) = start_workers(1, cmd, warm_png)
        with lock:
            starters.append(proc)
            live.append(worker)
        worker.wait_ready()
        return worker

    def drive(worker: _Worker | None) -> None:
        try:
            if worker is not None:
                worker.wait_ready()
            while True:
                with lock:
                    if open_chunks[0] == 0 or failures:
                        return
                    idx = queue.popleft() if queue else None
                if idx is None:  # others still work; a crash may yet give back halves of a chunk
                    time.sleep(0.005)
                    continue
                if worker is None:
                    worker = spawn_one()
                try:
                    answer = worker.ask({"paths": [paths[i] for i in idx], "fast": fast, "max_pixels": max_pixels})
                except ConnectionError:  # it died: nothing left to kill (its pid may be another's by now)
                    worker.close()
                    worker = None
                    with lock:
                        if len(idx) > 1:
                            half = len(idx) // 2
                            queue.extendleft([idx[half:], idx[:half]])
                            open_chunks[0] += 1  # one chunk became two
                            continue
                        i = int(idx[0])
                        ok[i] = False
                        errors.append(HashError(i, paths[i], "decoder_crash", "the hash worker died on this file"))
                        open_chunks[0] -= 1
                    continue
                if "error" in answer:
                    raise RuntimeError(f"hash worker: {answer['error']}")
                take(idx, [int(h, 16) for h in answer["hashes"]], answer["failed"])
                with lock:
                    open_chunks[0] -= 1
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            with lock:
                failures.append(exc)
            kill_family()  # the other threads may wait on a worker's answer
        finally:
            if worker is not None:
                worker.close()

    proc, first = start_workers(count, cmd, warm_png)
    starters.append(proc)
    live.extend(first)
    threads = [threading.Thread(target=drive, args=(w,), name=f"dedup-hash-{k}", daemon=True)
               for k, w in enumerate(first)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        with lock:
            early = bool(open_chunks[0])
            if early:
                failures.append(RuntimeError("hashing stopped early"))
        if early:  # interrupted (Ctrl-C, a cancelled flow run) or failed
            kill_family()
        for t in threads:
            t.join()
        for w in live:
            w.close()
        for p in starters:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if failures and open_chunks[0]:
        raise failures[0]
    return finish(len(threads))


def _serve(fd: int) -> None:
    """Answer one socket's requests: {"paths", "fast", "max_pixels"} a line -> {"hashes": [hex], "failed":
    [[position, reason, detail]]} a line; ends at EOF."""
    sock = socket.socket(fileno=fd)
    reader, out = sock.makefile("r", encoding="utf-8"), sock.makefile("w", encoding="utf-8")
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in reader:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            hs, failed = hash_chunk(request["paths"], bool(request.get("fast", True)),
                                    int(request.get("max_pixels", MAX_PIXELS)))
            answer: dict = {"hashes": [to_hex(h) for h in hs], "failed": failed}
        except Exception as exc:  # noqa: BLE001 - report it, keep serving
            answer = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def worker_main(argv: Sequence[str] | None = None) -> None:
    """`python -m tasks.dedup.hashing --fds A,B,... [--warm-png]`: the imports (and the PNG kernel) once, then
    a forked copy of this process serving each socket but the last, which this one serves."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fds = [int(f) for f in argv[argv.index("--fds") + 1].split(",")]
    if "--warm-png" in argv:
        _png_unfilter()
    forked = []
    for k, fd in enumerate(fds[:-1]):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for other in fds[k + 1:]:  # the other workers' sockets: their EOF must not wait for this one
                    os.close(other)
                _serve(fd)
                code = 0
            finally:  # a fork never unwinds into the code (atexit handlers) of the process it copies
                os._exit(code)
        forked.append(pid)
        os.close(fd)
    _serve(fds[-1])
    for pid in forked:  # reaped here, so their CPU time counts in this process's children (the caller's rusage)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


# --- distances ------------------------------------------------------------------------------------------
if hasattr(np, "bitwise_count"):  # numpy >= 2.0

    def popcount(x: np.ndarray) -> np.ndarray:
        """Set bits per uint64 element, as uint8."""
        return np.bitwise_count(np.asarray(x, np.uint64))

else:  # pragma: no cover - numpy 1.26
    _POP8 = np.array([i.bit_count() for i in range(256)], np.uint8)

    def popcount(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.uint64)
        return _POP8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bitwise Hamming distance of uint64 hashes (broadcasting), as uint8."""
    return popcount(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def to_hex(h: int | np.integer) -> str:
    """16 hex digits, as str(imagehash.phash(...)) writes it."""
    return f"{int(h):016x}"


if __name__ == "__main__":
    worker_main()
