"""The fast path: files -> batched decode -> pad/resize on the device -> bf16 model, overlapped.

Every function takes a `device` and runs on CPU too (tests), only faster on a GPU:
- reader threads read the files; complete JPEGs stay encoded (decoded in batches by nvJPEG through
  torchvision.io.decode_jpeg(list, device='cuda')), everything else (PNG, WebP, GIF, CMYK or truncated
  JPEGs...) is decoded by PIL in the reader thread, alpha composited on white like the reference;
- pad to a centred white square and bicubic resize (antialiased, PIL's kernel) on the device, grouped by
  image shape so one call serves many images; values rounded to 0–255 like PIL's uint8 output;
- a decode thread prepares batch k+1 on its own CUDA stream while the model runs batch k, and results
  come back through pinned memory without a blocking copy per batch.

A file that cannot be decoded becomes an ImageError for its item (a rejects row), never an exception.
"""
from __future__ import annotations

import queue
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tasks.common.nvjpeg import decode_jpegs
from tasks.tag.preprocess import MISSING, ImageError, composite_white, open_image, pad_offsets

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
# Pixels (after padding) processed in one interpolate call, to bound device memory with huge originals.
PIXEL_BUDGET = 256 * 1024 * 1024

Loaded = torch.Tensor | np.ndarray | ImageError  # encoded JPEG bytes (uint8 1-D) | decoded RGB HWC | error


def is_complete_jpeg(data: bytes) -> bool:
    """JPEG with an end-of-image marker near the end; anything else goes through PIL (which names the fault)."""
    return data[:3] == JPEG_SOI and JPEG_EOI in data[-64:]


def load_file(path: Path) -> Loaded:
    """Reader-thread work: bytes of a complete JPEG, else PIL-decoded RGB (alpha on white), else the error."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return ImageError(MISSING, f"{path} does not exist")
    except OSError as exc:
        return ImageError("unreadable_image", str(exc))
    if is_complete_jpeg(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_pil(data)


def decode_pil(data: bytes) -> np.ndarray | ImageError:
    try:
        return np.array(composite_white(open_image(data)), dtype=np.uint8)  # writable: torch shares it
    except ImageError as err:
        return err


def decode_batch(loaded: Sequence[Loaded], device: str | torch.device) -> list[torch.Tensor | ImageError]:
    """Loaded items -> uint8 RGB CHW tensors on `device` (or the item's ImageError), order kept."""
    out: list[torch.Tensor | ImageError | None] = [None] * len(loaded)
    jpeg_idx = [i for i, item in enumerate(loaded) if isinstance(item, torch.Tensor)]
    if jpeg_idx:
        datas = [loaded[i] for i in jpeg_idx]
        try:
            decoded = decode_jpegs(datas, device)
        except RuntimeError:  # one bad stream fails the batch: decode one by one to isolate it
            decoded = [_decode_one_jpeg(d, device) for d in datas]
        for i, img in zip(jpeg_idx, decoded):
            out[i] = img
    for i, item in enumerate(loaded):
        if isinstance(item, np.ndarray):
            out[i] = torch.from_numpy(item).to(device, non_blocking=True).permute(2, 0, 1)
        elif isinstance(item, ImageError):
            out[i] = item
    return out  # type: ignore[return-value]


def _decode_one_jpeg(data: torch.Tensor, device: str | torch.device) -> torch.Tensor | ImageError:
    try:
        return decode_jpegs(data, device)
    except RuntimeError:  # nvJPEG / libjpeg refused it: PIL decides (CMYK is fine there, corrupt is not)
        pixels = decode_pil(data.numpy().tobytes())
        if isinstance(pixels, ImageError):
            return pixels
        return torch.from_numpy(pixels).to(device).permute(2, 0, 1)


def pad_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8/float RGB [N, 3, H, W] (one shape) -> float32 [N, 3, size, size] in 0–255.

    Centred white square (left = (side − w) // 2, top = (side − h) // 2), then bicubic with antialias
    (PIL's kernel), rounded to integers like PIL's uint8 output; no resize when the square is size.
    """
    _, _, h, w = images.shape
    side, left, top = pad_offsets(w, h)
    x = images.float()
    if (h, w) != (side, side):
        x = F.pad(x, (left, side - w - left, top, side - h - top), value=255.0)
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 255.0).round_()
    return x


def prepare_batch(decoded: Sequence[torch.Tensor | ImageError], size: int,
                  device: str | torch.device) -> tuple[torch.Tensor, list[int]]:
    """Decoded images -> ([M, 3, size, size] float 0–255 RGB, indices of the M good items)."""
    good = [i for i, img in enumerate(decoded) if isinstance(img, torch.Tensor)]
    out = torch.empty((len(good), 3, size, size), dtype=torch.float32, device=device)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for slot, i in enumerate(good):
        groups[tuple(decoded[i].shape[1:])].append(slot)
    for (h, w), slots in groups.items():
        side = max(h, w)
        per_call = max(1, PIXEL_BUDGET // (side * side * 3))
        for start in range(0, len(slots), per_call):
            chunk = slots[start:start + per_call]
            stack = torch.stack([decoded[good[s]] for s in chunk])
            result = pad_resize(stack, size)
            if chunk == list(range(chunk[0], chunk[0] + len(chunk))):
                out[chunk[0]:chunk[0] + len(chunk)] = result
            else:
                out[torch.tensor(chunk, device=device)] = result
    return out, good


@dataclass
class BatchResult:
    keys: list  # keys of the items that were tagged, in input order
    probs: np.ndarray  # float32 [len(keys), C]
    errors: list[tuple[object, ImageError]]  # (key, error) of the items that could not be decoded


def _batched(items: Sequence, n: int) -> Iterator[Sequence]:
    for start in range(0, len(items), n):
        yield items[start:start + n]


def run_pipeline(
    items: Sequence[tuple[object, Path]],
    predict: Callable[[torch.Tensor], torch.Tensor],
    size: int,
    device: str | torch.device,
    batch_size: int = 64,
    workers: int = 8,
    prefetch: int = 3,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[BatchResult]:
    """Tag (key, path) items; `predict` maps RGB NCHW 0–255 on `device` to probabilities on `device`.

    `transform` (optional) runs on the decode stream after resizing (e.g. normalise + bf16 cast), so the
    model stream only runs the model.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    batches = list(_batched(list(items), batch_size))
    prepared: queue.Queue = queue.Queue(maxsize=max(1, prefetch - 1))
    stop = threading.Event()

    def producer() -> None:
        stream = torch.cuda.Stream(dev) if cuda else None
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tag-read") as pool:
                pending = [pool.map(load_file, [p for _, p in b]) for b in batches[:prefetch]]
                for n, batch in enumerate(batches):
                    if stop.is_set():
                        return
                    loaded = list(pending.pop(0))
                    if n + prefetch < len(batches):
                        pending.append(pool.map(load_file, [p for _, p in batches[n + prefetch]]))
                    with torch.cuda.stream(stream) if cuda else nullcontext():
                        decoded = decode_batch(loaded, dev)
                        x, good = prepare_batch(decoded, size, dev)
                        if transform is not None and len(good):
                            x = transform(x)
                        event = torch.cuda.Event() if cuda else None
                        if event is not None:
                            event.record(stream)
                    errors = [(batch[i][0], d) for i, d in enumerate(decoded) if isinstance(d, ImageError)]
                    prepared.put(([batch[i][0] for i in good], x, errors, event))
            prepared.put(None)
        except BaseException as exc:  # surface in the consumer, never hang it
            prepared.put(exc)

    thread = threading.Thread(target=producer, name="tag-decode", daemon=True)
    thread.start()
    in_flight: tuple | None = None  # (keys, host probs, errors, event) of the previous batch
    try:
        while True:
            item = prepared.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                break
            keys, x, errors, event = item
            if keys:
                if event is not None:
                    torch.cuda.current_stream(dev).wait_event(event)
                    x.record_stream(torch.cuda.current_stream(dev))
                probs = predict(x)
                if cuda:
                    host = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
                    host.copy_(probs, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                else:
                    host, done = probs.cpu(), None
            else:
                host, done = torch.zeros((0, 0)), None
            if in_flight is not None:
                yield _finish(*in_flight)
            in_flight = (keys, host, errors, done)
        if in_flight is not None:
            yield _finish(*in_flight)
    finally:
        stop.set()
        while thread.is_alive():  # drain so a blocked producer can see the stop flag
            try:
                prepared.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _finish(keys: list, host: torch.Tensor, errors: list, done) -> BatchResult:
    if done is not None:
        done.synchronize()
    probs = host.numpy() if keys else np.zeros((0, 0), np.float32)
    return BatchResult(keys=keys, probs=probs.astype(np.float32, copy=False), errors=errors)
